"""Benchmark suites: score every (model, task) of a suite file, resumable, with combined tables.

A suite file (TOML) has optional ``[defaults]`` (``max_length``, ``batch_size``, ``pooling``) and
``[[task]]`` entries: ``name``, ``file`` (relative to the data folder; a glob pattern, or a list of files
of one format, reads them as one corpus), ``text_column``,
``text_pair_column``, ``label_column`` (names, or 0-based positions with ``header = false``),
optional ``delimiter`` (of delimited text; ``"tab"`` for a tab), ``labels = { name = id, ... }``
(a label mapping) and ``limit`` (N rows drawn at random; the CLI's ``--seed``).
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from .report import Report
from .storage import write_text_atomically

SHIPPED = {"glue": Path(__file__).parent / "suites" / "glue.toml"}
_TASK_KEYS = {"name", "file", "text_column", "text_pair_column", "label_column", "header", "delimiter", "labels",
              "limit", "split"}


@dataclass
class Task:
    name: str
    file: "str | List[str]"
    text_column: Any = None
    text_pair_column: Any = None
    label_column: Any = None
    header: Optional[bool] = None
    delimiter: Optional[str] = None
    labels: Dict[str, Any] = field(default_factory=dict)
    limit: Optional[int] = None
    split: Optional[str] = None


@dataclass
class Suite:
    tasks: List[Task]
    max_length: int = 128
    batch_size: int = 64
    pooling: str = "mean"


def load_suite(path: "str | Path") -> Suite:
    """Read a suite file (or the name of a shipped one: ``glue``)."""
    path = SHIPPED.get(str(path), Path(path))
    if not Path(path).is_file():
        raise ValueError(f"suite file {path} does not exist (shipped suites: {', '.join(SHIPPED)})")
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from error
    unknown_tables = set(data) - {"task", "defaults"}
    if unknown_tables:
        raise ValueError(f"{path}: unknown tables {sorted(unknown_tables)}; a suite has [defaults] and [[task]]")
    tasks = []
    for entry in data.get("task", []):
        unknown = set(entry) - _TASK_KEYS
        if unknown or "name" not in entry or "file" not in entry:
            raise ValueError(f"{path}: task {entry.get('name', '?')!r} needs 'name' and 'file'"
                             + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
        tasks.append(_checked_task(Task(**entry), path))
    if not tasks:
        raise ValueError(f"{path}: no [[task]] entries")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: task names repeat: {names}")
    defaults = data.get("defaults", {})
    unknown = set(defaults) - _DEFAULT_KEYS  # a misspelt key would silently leave its default in place
    if unknown:
        raise ValueError(f"{path}: unknown [defaults] keys {sorted(unknown)}; known: {sorted(_DEFAULT_KEYS)}")
    for key in ("max_length", "batch_size"):
        if key in defaults and not _is_positive_int(defaults[key]):
            raise ValueError(f"{path}: [defaults] {key} must be a positive integer, got {defaults[key]!r}")
    if "pooling" in defaults:
        from .pooling import POOLINGS

        if defaults["pooling"] not in POOLINGS:
            raise ValueError(f"{path}: [defaults] pooling {defaults['pooling']!r} is not one of {', '.join(POOLINGS)}")
    return Suite(tasks=tasks, **defaults)


_DEFAULT_KEYS = {"max_length", "batch_size", "pooling"}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _checked_task(task: Task, path: "str | Path") -> Task:
    """A task whose fields have the types the scoring needs; its name names its result file, so it is one
    file name (no folders: "../x" would write outside the results folder)."""
    where = f"{path}: task {task.name!r}"
    if not isinstance(task.name, str) or not task.name.strip() or task.name in (".", "..") \
            or re.search(r"[/\\\x00]", task.name):
        raise ValueError(f"{where}: a name must be a non-empty file name (no '/' or '\\'): it names the result file")
    files = task.file if isinstance(task.file, list) else [task.file]
    if not files or not all(isinstance(f, str) and f for f in files):
        raise ValueError(f"{where}: 'file' must be a path (or a list of paths) relative to the data folder")
    if task.limit is not None and not _is_positive_int(task.limit):
        raise ValueError(f"{where}: 'limit' must be a positive integer (rows drawn at random), got {task.limit!r}")
    if task.header is not None and not isinstance(task.header, bool):
        raise ValueError(f"{where}: 'header' must be true or false, got {task.header!r}")
    if not isinstance(task.labels, dict):
        raise ValueError(f"{where}: 'labels' must be a table {{ name = id, ... }}, got {task.labels!r}")
    return task


def check_model_folders(models: Sequence[str]) -> None:
    """Refuse models whose results would share a folder (two model folders of one name): the second
    model's results would be taken for the first's, or overwrite them."""
    seen: Dict[str, str] = {}
    for model in models:
        other = seen.setdefault(slug(model), model)
        if other != model:
            raise ValueError(f"models {other!r} and {model!r} would write their results to one folder "
                             f"({slug(model)!r}): give the model folders different names (a link will do)")


def slug(name: str) -> str:
    """A folder-safe name for a model path or hub name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.rstrip("/").split("/")[-1] if Path(name).exists() else name)


def pairs_of(models: Sequence[str], tasks: Sequence[Task], share: Optional[Tuple[int, int]] = None) -> list:
    """The (model, task) pairs, model by model; with ``share = (rank, world)`` the rank's contiguous block of
    them (blocks differ in length by at most one; contiguous, so a rank loads few models)."""
    pairs = [(model, task) for model in models for task in tasks]
    if share is None:
        return pairs
    rank, world = share
    return pairs[rank * len(pairs) // world : (rank + 1) * len(pairs) // world]


def result_path(out_dir: Path, model: str, task: Task) -> Path:
    """Where the report of one (model, task) pair is written."""
    return out_dir / slug(model) / f"{task.name}.json"


def run_suite(suite: Suite, models: Sequence[str], data_dir: "str | Path", out_dir: "str | Path",
              score_task: Callable[[str, Task, Suite, "Path | List[Path]"], Report],
              log: Callable[[str], None] = print, share: Optional[Tuple[int, int]] = None,
              ) -> Dict[tuple, Report]:
    """Score every (model, task) not already in ``out_dir``; write the combined tables and grid plot.

    ``score_task(model, task, suite, data_file)`` does the scoring (the CLI passes one that loads
    each model once). Finished pairs are written as ``out_dir/<model>/<task>.json`` right away, so
    an interrupted suite resumes where it stopped. ``share = (rank, world)``: score only this process's
    block of the pairs (:func:`pairs_of`) and write no summary (:func:`summarise` does, once all are done).
    """
    check_model_folders(models)
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    reports: Dict[tuple, Report] = {}
    for model, task in pairs_of(models, suite.tasks, share):
        target = result_path(out_dir, model, task)
        if target.exists():
            try:
                reports[(model, task.name)] = Report.from_dict(json.loads(target.read_text()))
                log(f"{slug(model)} / {task.name}: done before, skipped")
                continue
            except (ValueError, KeyError, json.JSONDecodeError):
                log(f"{slug(model)} / {task.name}: unreadable earlier result, scoring again")
        files = [data_dir / f for f in task.file] if isinstance(task.file, list) else data_dir / task.file
        report = score_task(model, task, suite, files)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(target, json.dumps(report.to_dict(), indent=2))  # never half a result
        reports[(model, task.name)] = report
        log(f"{slug(model)} / {task.name}: " + (f"ℓ* = {report.best_layer}" if report.has_best_layer
                                                 else "no layer separates the classes (ν = inf everywhere)"))
    if share is None or share[1] == 1:
        write_summary(reports, [t.name for t in suite.tasks], list(models), out_dir)
    return reports


def summarise(suite: Suite, models: Sequence[str], out_dir: "str | Path") -> Dict[tuple, Report]:
    """Write the combined tables and grid plot from the results in ``out_dir`` (after processes that each
    scored a share of the pairs); pairs without a result are left out."""
    check_model_folders(models)
    out_dir = Path(out_dir)
    reports: Dict[tuple, Report] = {}
    for model, task in pairs_of(models, suite.tasks):
        target = result_path(out_dir, model, task)
        if target.exists():
            reports[(model, task.name)] = Report.from_dict(json.loads(target.read_text()))
    write_summary(reports, [t.name for t in suite.tasks], list(models), out_dir)
    return reports


def write_summary(reports: Dict[tuple, Report], tasks: List[str], models: List[str], out_dir: Path) -> None:
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["model", "task", "layer", "variability", "trace_ratio", "best"])
    markdown = []
    for model in models:
        scored = [reports[(model, t)] for t in tasks if (model, t) in reports]
        if not scored:
            continue
        layers = sorted({layer for r in scored for layer in r.layers})
        markdown += [f"### {slug(model)}", "", "ν per layer; ◀ marks ℓ* (lowest ν).", "",
                     "| task | " + " | ".join(str(layer) for layer in layers) + " | ℓ* |",
                     "|---|" + "---:|" * (len(layers) + 1)]
        for task in tasks:
            report = reports.get((model, task))
            if report is None:
                continue
            nu = dict(zip(report.layers, report.metrics["variability"]))
            trace = dict(zip(report.layers, report.metrics["trace_ratio"]))
            best = report.marked_layer  # None: ν inf everywhere
            cells = []
            for layer in layers:
                if layer in nu:
                    writer.writerow([slug(model), task, layer, nu[layer], trace[layer], layer == best])
                    cells.append(f"{nu[layer]:.4g}{' ◀' if layer == best else ''}")
                else:
                    cells.append("")
            mark = " †" if report.sample_note else ""
            markdown.append(f"| {task}{mark} | " + " | ".join(cells) + f" | {'—' if best is None else best} |")
        small = [f"{task} ({min(r.class_counts.values()):,} < d = {r.hidden_size})" for task in tasks
                 for r in [reports.get((model, task))] if r is not None and r.sample_note]
        if small:
            markdown += ["", "† a class has fewer examples than the hidden size d: " + ", ".join(small) + ". ν is "
                         "biased low at such sizes; compare layers within a task, and score more examples for "
                         "decisions."]
        markdown.append("")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / "summary.csv", rows.getvalue())
    write_text_atomically(out_dir / "summary.md", "\n".join(markdown))
    try:
        from .plotting import plot_grid

        plot_grid(reports, tasks, models, str(out_dir / "grid.png"))
    except ImportError:
        pass
