"""Statistics as files: save, load (checked), merge — map-reduce across jobs and clusters.

A file is safetensors: the per-layer moments as float64 tensors, the counts as int64, and JSON
metadata (hsvfast version, model name and revision, layers, pooling, hidden sizes, dtype, labels,
class counts, number of examples …) plus a SHA-256 of every tensor's bytes, so a corrupted file is
detected on load instead of being used. Writes are atomic: a temporary file in the same folder is
written, flushed and fsync'ed, then renamed over the target.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

from .statistics import LayerMoments, Statistics

FORMAT = "hsvfast-statistics/1"


def _tensors(stats: Statistics) -> Dict[str, torch.Tensor]:
    stats.flush()
    c = stats.num_classes
    out = {"counts": torch.from_numpy(stats.counts[:c].copy())}
    for position, m in enumerate(stats.moments):
        if m is None:
            continue
        prefix = f"layer{position}."
        out[prefix + "shift"] = m.shift[:c]
        out[prefix + "sums"] = m.sums[:c]
        out[prefix + "sqnorms"] = m.sqnorms[:c]
        out[prefix + "nonfinite"] = m.nonfinite
        if stats.mode == "per_class":
            out[prefix + "second"] = m.second[:c]
        elif stats.mode == "balanced":
            out[prefix + "second"] = m.second
    # Copies: layers can be views into one tensor (statistics.LayerStack), which a file must not share.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def write_text_atomically(path: "str | Path", text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`write_atomically`: an earlier file there stays whole
    until the new one is complete."""
    write_atomically(Path(path), lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, fsync, then rename over ``path``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created exclusively (the name is never someone else's file) and like any file the user writes:
    # mode 0o666 less the umask. Writers may recreate it with 0o600 (safetensors does, as mkstemp would),
    # which would leave a saved file unreadable to the user's group: the mode is set again after writing.
    while True:
        temporary = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        mode = os.stat(temporary).st_mode & 0o777
        write(temporary)
        os.chmod(temporary, mode)
        with open(temporary, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_statistics(stats: Statistics, path: "str | Path", extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``stats`` (and ``extra`` JSON metadata) to ``path`` atomically."""
    from safetensors.torch import save_file

    from . import __version__

    tensors = _tensors(stats)
    metadata = {
        "format": FORMAT,
        "hsvfast_version": __version__,
        "layers": stats.layers,
        "hidden_sizes": [m.hidden_size if m is not None else None for m in stats.moments],
        "mode": stats.mode,
        "labels": stats.labels,
        "class_counts": None if stats.class_counts is None else [[k, v] for k, v in stats.class_counts.items()],
        "num_examples": stats.num_examples,
        "num_skipped": stats.num_skipped,
        "num_batches": stats.num_batches,
        "max_memory": stats.max_memory,
        "info": stats.info,
        "extra": extra or {},
        "sha256": _digest(tensors),
    }
    write_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"hsvfast": json.dumps(metadata)}))


def load_statistics(path: "str | Path", device: "str | torch.device" = "cpu", with_extra: bool = False):
    """Read statistics written by :func:`save_statistics` (or ``report.stats.save``), checking integrity.

    Raises ValueError naming the file when it is not hsvfast statistics, is truncated or corrupted.
    With ``with_extra=True`` returns ``(stats, extra_metadata)``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"statistics file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable statistics file (truncated or corrupted?): {error}") from error
    if "hsvfast" not in header:
        raise ValueError(f"{path} is a safetensors file but not hsvfast statistics")
    meta = json.loads(header["hsvfast"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported statistics format {meta.get('format')!r} (expected {FORMAT})")
    if _digest(tensors) != meta["sha256"]:
        raise ValueError(f"{path} is corrupted: its tensors do not match their checksum")

    class_counts = None if meta["class_counts"] is None else {k: v for k, v in meta["class_counts"]}
    stats = Statistics(meta["layers"], device=device, class_counts=class_counts,
                       second_moments=meta["mode"] != "trace", max_memory=meta["max_memory"])
    stats.mode = meta["mode"]
    for label in meta["labels"]:
        stats._register(label)
    c = stats.num_classes
    stats.capacity = max(stats.capacity, c)
    stats.counts = tensors["counts"].numpy().astype(np.int64).copy()
    stats.num_skipped, stats.num_batches = meta["num_skipped"], meta["num_batches"]
    stats.info = dict(meta["info"])
    for position, hidden in enumerate(meta["hidden_sizes"]):
        if hidden is None:
            continue
        m = LayerMoments.empty(hidden, stats.capacity, stats.mode, torch.device(device))
        prefix = f"layer{position}."
        m.shift[:c] = tensors[prefix + "shift"]
        m.sums[:c] = tensors[prefix + "sums"]
        m.sqnorms[:c] = tensors[prefix + "sqnorms"]
        m.nonfinite.copy_(tensors[prefix + "nonfinite"])
        if stats.mode == "per_class":
            m.second[:c] = tensors[prefix + "second"]
        elif stats.mode == "balanced":
            m.second.copy_(tensors[prefix + "second"])
        stats.moments[position] = m
    return (stats, meta["extra"]) if with_extra else stats


def merge(parts: Iterable[Union[str, Path, Statistics]]) -> Statistics:
    """Sum statistics of parts of one corpus (files or objects) into one; inputs are not modified.

    Refuses parts from different models, layers, pooling, hidden sizes or modes, naming the difference,
    and one part given twice (the same file, or identical statistics): its examples would count twice.
    """
    merged: Optional[Statistics] = None
    seen: Dict[tuple, int] = {}  # what identifies each non-empty part -> its index
    names: List[str] = []
    for index, part in enumerate(parts):
        stats = load_statistics(part) if isinstance(part, (str, Path)) else part
        names.append(str(part) if isinstance(part, (str, Path)) else f"part {index}")
        if stats.num_examples:  # empty parts (a rank without rows) are all alike, and harmless
            info = json.dumps(stats.info, sort_keys=True, default=str)
            identity = (_digest(_tensors(stats)), repr(stats.labels), info)
            first = seen.setdefault(identity, index)
            if first != index:
                raise ValueError(f"{names[first]} and {names[index]} (parts {first} and {index}) hold identical "
                                 "statistics (one part given twice?): its examples would count twice; merge each "
                                 "part once")
        if merged is None:
            merged = _copy(stats)
            continue
        merged.merge(stats)  # refuses other layers, hidden sizes, pooling, model …
    if merged is None:
        raise ValueError("merge needs at least one statistics file or object")
    return merged


def _copy(stats: Statistics) -> Statistics:
    return copy.deepcopy(stats)
