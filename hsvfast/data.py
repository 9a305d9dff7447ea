"""Reading labelled text files (CSV, TSV, JSON Lines, Parquet) through 🤗 ``datasets``, offline.

Quirks handled: CRLF line ends, TSVs read with quoting off (GLUE files hold bare double quotes),
a UTF-8 byte-order mark, latin-1 files, files with or without a header row (columns then named
by position: ``--text-column 3 --label-column 1``), files without a known suffix (tab- or
comma-separated, told apart from their first lines; ``delimiter`` says it outright), compressed files
(``.gz``, ``.bz2``, ``.xz`` behind the format's suffix: ``corpus.jsonl.gz``), several files
of one format read as one (a list, or a glob pattern like ``shards/*.jsonl``). Columns are
found by name with defaults (``sentence``/``text``/``sentence1``/``question``/``tweet`` …,
``label``/``class``/``category`` …); when that fails, the error lists the columns there are.

Texts stay in Arrow's compact form, memory-mapped from a private temporary file, and become
Python strings a slice at a time (:class:`TextColumn`): a corpus held as a list of Python strings
would take about four times the file's size in memory.
"""
from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import json
import lzma
import os
import re
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterator, List, Optional, Sequence, Union

import numpy as np

from .optional import require

TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "tweet", "#1 String", "content", "review", "document",
                "description")
# A news item's title and body (AG News as a CSV: label, title, description) are read as a pair, as NLI's are.
PAIR_COLUMNS = {"sentence1": "sentence2", "question": "sentence", "#1 String": "#2 String", "premise": "hypothesis",
                "title": "description"}
LABEL_COLUMNS = ("label", "labels", "class", "category", "Quality", "target", "intent")
_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

Column = Union[str, int, None]
_MAX_COLUMNS = 1024  # columns of a delimited file read as text (pandas ignores converters of columns not there)
DataFiles = Union[str, Path, Sequence[Union[str, Path]]]


class TextColumn(Sequence[str]):
    """A read-only sequence of texts backed by an Arrow column: ``len``, indexing, iteration, and slices
    that are views (no copy). A missing value reads as ``""``, anything else as its ``str``.
    Compares equal to a list or tuple of the same strings."""

    _BLOCK = 1 << 15  # texts turned into Python strings at a time when iterating

    def __init__(self, array: Any, rows: Optional[np.ndarray] = None, keep_alive: Any = None) -> None:
        self._array = array  # a pyarrow (Chunked)Array
        self._rows = rows  # indices into the array of the texts in this view; None: all, in order
        self._keep_alive = keep_alive  # the temporary folder of a memory-mapped file, removed after the last view

    def __len__(self) -> int:
        return len(self._array) if self._rows is None else len(self._rows)

    def _values(self, rows: Union[slice, np.ndarray]) -> List[str]:
        if isinstance(rows, slice):
            part = self._array.slice(rows.start, rows.stop - rows.start)
        else:
            part = self._array.take(rows)
        return ["" if text is None else str(text) for text in part.to_pylist()]

    def _view(self, rows: Union[slice, np.ndarray]) -> "TextColumn":
        """The texts at ``rows`` of this view (a step-1 slice, or positions in range) as a new view."""
        if self._rows is None and isinstance(rows, slice):
            return TextColumn(self._array.slice(rows.start, rows.stop - rows.start), None, self._keep_alive)
        if self._rows is None:
            return TextColumn(self._array, rows, self._keep_alive)
        return TextColumn(self._array, self._rows[rows], self._keep_alive)

    def __getitem__(self, index: Union[int, slice, Sequence[int], np.ndarray]) -> Any:
        """A text (an int), or a view: a slice, a sequence of positions (``texts[[0, 5, 9]]``) or a boolean mask
        of ``len(texts)``, as numpy takes them."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self._view(slice(start, max(start, stop)) if step == 1 else np.arange(start, stop, step))
        if isinstance(index, (list, tuple, np.ndarray)):
            positions = np.asarray(index)
            if positions.dtype == bool:
                if positions.shape != (len(self),):
                    raise IndexError(f"a mask of {positions.shape} for {len(self)} texts")
                positions = np.flatnonzero(positions)
            positions = positions.astype(np.int64, casting="safe" if positions.size else "unsafe").reshape(-1)
            if positions.size and not (-len(self) <= positions.min() and positions.max() < len(self)):
                raise IndexError(f"positions must lie in [{-len(self)}, {len(self)}) for {len(self)} texts")
            return self._view(np.where(positions < 0, positions + len(self), positions))
        position = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= position < len(self):
            raise IndexError(f"text {index} of {len(self)}")
        row = position if self._rows is None else int(self._rows[position])
        return self._values(slice(row, row + 1))[0]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), self._BLOCK):
            stop = min(len(self), start + self._BLOCK)
            yield from self._values(slice(start, stop) if self._rows is None else self._rows[start:stop])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (TextColumn, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking equality, like a list

    def __repr__(self) -> str:
        return f"TextColumn({len(self)} texts)"

    def __reduce__(self):
        # Pickled by value, only the texts of this view: the copy needs no folder (and must not remove the
        # original's).
        texts = self._array if self._rows is None else self._array.take(self._rows)
        return TextColumn, (texts.combine_chunks() if hasattr(texts, "combine_chunks") else texts,)


@dataclass
class LabelledText:
    """Texts (and second texts of pairs) with their labels, read from a file (or several, as one). ``texts``
    and ``pairs`` are :class:`TextColumn` s (sequences of strings held compactly); ``labels`` a list."""

    texts: TextColumn
    labels: List[Hashable]
    pairs: Optional[TextColumn]
    text_column: str
    label_column: str
    pair_column: Optional[str]
    num_unlabelled: int = 0  # rows left out: no label


class _TemporaryFolder:
    """A temporary folder removed when the last object holding it goes (or at exit), quietly:
    ``tempfile.TemporaryDirectory`` warns when it is cleaned up that way. A new private one, or ``path``
    (made if missing) when processes share it."""

    def __init__(self, path: Optional[str] = None) -> None:
        if path is None:
            self.path = tempfile.mkdtemp(prefix="hsvfast-read-")
        else:
            os.makedirs(path, exist_ok=True)
            self.path = path
        self.remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


#: Compressed files are read through (datasets decompresses them by suffix): ``corpus.jsonl.gz``.
_COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


_UNREAD_COMPRESSIONS = (".zst", ".zstd", ".zip", ".lz4", ".7z", ".tar", ".tgz")


def _open_bytes(path: Path):
    """The file's bytes, decompressed when its suffix says it is compressed."""
    return _COMPRESSIONS.get(path.suffix.lower(), open)(path, "rb")


def _suffix(path: Path) -> str:
    """The suffix that tells the format, behind a compression suffix: ``.jsonl`` for ``a.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _kind(path: Path) -> str:
    return _FORMATS.get(_suffix(path), "csv")  # an unknown suffix: delimited text


def _guess_delimiter(path: Path, lines: int = 50) -> str:
    """Tab when most of the first non-empty lines hold one (a stray line is forgiven), else comma."""
    with _open_bytes(path) as handle:
        head = [line for line in handle.read(1 << 16).splitlines()[:lines] if line.strip()]
    return "\t" if head and 2 * sum(b"\t" in line for line in head) >= len(head) else ","


def _delimiter(path: Path, delimiter: Optional[str]) -> str:
    if delimiter is not None:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(delimiter, delimiter)
        if len(delimiter) != 1:
            raise ValueError(f"delimiter must be one character ('tab' or '\\t' for a tab), got {delimiter!r}")
        return delimiter
    suffix = _suffix(path)
    if suffix in (".tsv", ".txt"):
        return "\t"
    return "," if suffix == ".csv" else _guess_delimiter(path)


def matching_files(pattern: "str | Path") -> List[Path]:
    """The files a glob pattern (``**`` included) matches, sorted."""
    return sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())


def data_files(spec: DataFiles) -> List[Path]:
    """The files ``spec`` names, in order: a path, a glob pattern (``shards/*.jsonl``; its matches sorted), or
    a list of either. All of one format; none twice (its rows would count twice)."""
    files: List[Path] = []
    for item in [spec] if isinstance(spec, (str, Path)) else list(spec):
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif any(mark in str(item) for mark in "*?["):
            matches = matching_files(item)
            if not matches:
                raise ValueError(f"no data file matches {item}")
            files += matches
        elif path.is_dir():
            raise ValueError(f"{path} is a folder: pass its files, e.g. '{path / '*.jsonl'}' (quoted)")
        else:
            raise ValueError(f"data file {path} does not exist")
    if not files:
        raise ValueError("no data file given")
    seen: dict = {}
    for index, path in enumerate(files):
        first = seen.setdefault(path.resolve(), index)
        if first != index:
            raise ValueError(f"data file {path} is given twice (as {files[first]}): its rows would count twice")
    unread = next((p for p in files if p.suffix.lower() in _UNREAD_COMPRESSIONS), None)
    if unread is not None:
        raise ValueError(f"{unread}: {unread.suffix} files are not read; decompress it first (hsvfast reads "
                         f"{', '.join(_COMPRESSIONS)} compressed files as they are)")
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
        raise ValueError(f"the data files are of different formats ({', '.join(sorted(kinds))}): pass files of one")
    # An empty file holds no rows (an empty shard of a corpus is harmless); the readers would fail on it.
    with_rows = [p for p in files if not _is_empty(p)]
    if not with_rows:
        raise ValueError(f"data file {files[0]} is empty" if len(files) == 1 else
                         f"the {len(files)} data files ({files[0]} …) are all empty")
    return with_rows


def _is_empty(path: Path) -> bool:
    with _open_bytes(path) as handle:
        return not handle.read(1)


def _decodes_as_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _open_bytes(path) as handle:
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _load(files: List[Path], header: bool, delimiter: Optional[str], shared_folder: Optional[str] = None):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets = require("datasets", "reading data files", "data")

    datasets.disable_progress_bars()
    path = files[0]  # its suffix (and, for delimited text without a known suffix, its lines) stand for all
    kind = _kind(path)

    def read(builder: str, **options):
        # Memory-mapped from an Arrow copy in a cache folder of this call only (datasets would otherwise keep
        # a copy of every file read, and a lock file per file, in the user's cache for good). The folder
        # goes when the last column read from it does (TextColumn keeps it alive).
        cache = _TemporaryFolder(shared_folder)
        try:
            table = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                          cache_dir=cache.path, **options)
        except BaseException:
            cache.remove()
            raise
        return table, cache

    if kind != "csv":
        if delimiter is not None:
            raise ValueError(f"{path}: a delimiter is for delimited text, not {_suffix(path)} files; leave it out")
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log line would repeat the error raised
        try:
            return read(kind)
        finally:
            datasets.logging.set_verbosity(verbosity)
    # Every field as the text it is: pandas would read a column of "007", "1.50" as the numbers 7 and 1.5
    # (labels get their types in _labels). Only an empty field is missing: pandas' defaults also read "NA",
    # "null", "None", "n/a", "nan" … as missing, turning such texts into empty ones and dropping rows
    # labelled "NA".
    separators = {_delimiter(f, delimiter) for f in files}
    if len(separators) > 1:
        raise ValueError(f"the data files use different field separators ({', '.join(map(repr, sorted(separators)))}): "
                         "pass files of one kind, or say the separator with --delimiter")
    options = dict(sep=separators.pop(), header="infer" if header else None, keep_default_na=False,
                   na_values=[""], converters={column: str for column in range(_MAX_COLUMNS)})
    if options["sep"] == "\t":
        options["quoting"] = csv.QUOTE_NONE  # GLUE TSVs hold bare double quotes
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log line would repeat the error raised below
    try:
        for encoding in ("utf-8-sig", "latin-1"):
            try:
                return read("csv", encoding=encoding, **options)
            except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as error:
                if not isinstance(error, UnicodeDecodeError) and not isinstance(error.__cause__, UnicodeDecodeError):
                    raise
            if len(files) > 1:  # one encoding is read for all: latin-1 would garble the files that are UTF-8
                utf8 = [f for f in files if _decodes_as_utf8(f)]
                if utf8:
                    other = next(f for f in files if f not in utf8)
                    raise ValueError(f"{other} is not UTF-8 but {utf8[0]} is: convert it (iconv -f latin1 -t utf-8) "
                                     "to read the files together")
    finally:
        datasets.logging.set_verbosity(verbosity)
    raise ValueError(f"{path}: cannot decode the file as UTF-8 or latin-1")


def _first_bad_json_line(files: List[Path]) -> Optional[str]:
    """Where JSON Lines files stop being JSON ('line 3 of c.jsonl is not JSON: …'), found after a failed read
    (the parser's own message gives a byte position in some buffer); None for files that are not JSON Lines
    (one JSON document: its parser's message stands)."""
    for path in files:
        with _open_bytes(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as error:
                    if number == 1:
                        return None  # not one object per line
                    return f"line {number} of {path.name} is not JSON ({error})"
    return None


def _first_cause(error: BaseException) -> str:
    """The first line of the innermost cause: what went wrong (a parser's 'Expected 2 fields in line 12, saw 4'),
    not the wrapper's 'An error occurred while generating the dataset'."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def _labels(table, name: str, delimited: bool, path: "Path | str") -> List[Hashable]:
    """The label column as Python values, equal labels sharing one object (a list of a few distinct strings
    costs 8 bytes a row, not a string object each). Taken from Arrow at once: iterating datasets' column
    objects decodes row by row (4.8 s instead of 0.01 s for SST-2's 67k rows); for CSV, JSON and Parquet
    files its row formatter would return the same values."""
    shared: dict = {}
    values = table.data.column(name).to_pylist()
    if delimited:  # an empty field is a missing label; pandas before 3.1 keeps it as "" under str converters
        values = [None if value == "" else value for value in values]
    try:
        labels = [shared.setdefault(label, label) for label in values]
    except TypeError:  # lists (multi-label data) or records: not one class per example
        example = next(label for label in values if not isinstance(label, Hashable))
        raise ValueError(f"{path}: the labels in column {name!r} are {type(example).__name__}s (e.g. {example!r}), "
                         "but hsvfast needs one class per example (a string or an integer); score a multi-label "
                         "task as one binary task per label") from None
    if delimited:  # read as text: integer labels (or decimals, which score refuses) get their type back
        texts = [text for text in shared if text is not None]
        for pattern, parse in ((_INTEGER, int), (_DECIMAL, float)):
            if all(pattern.fullmatch(text) for text in texts):
                parsed = {text: parse(text) for text in texts}
                return [None if label is None else parsed[label] for label in labels]
    return labels


_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
_DECIMAL = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


def _pick(columns: List[str], wanted: Column, defaults, what: str, path: "Path | str", flag: str) -> str:
    if wanted is not None:
        name = str(wanted)
        if name not in columns:
            raise ValueError(f"{path}: no {what} column {name!r}; the columns are {columns}")
        return name
    for candidate in defaults:
        if candidate in columns:
            return candidate
    raise ValueError(f"{path}: cannot tell which column holds the {what}; the columns are {columns}. Pass {flag} NAME"
                     " (or a 0-based position with --no-header)")


def read_labelled_text(path: DataFiles, text_column: Column = None, label_column: Column = None,
                       pair_column: Column = None, header: Optional[bool] = None,
                       delimiter: Optional[str] = None, shared_folder: Optional[str] = None) -> LabelledText:
    """Read a labelled text file (or several of one format, as one: a list, or a glob pattern); see the module
    docstring for formats and defaults.

    ``header=None`` assumes a header row unless a column is given as a position (an int).
    ``delimiter``: the field separator of delimited text (``"tab"`` for a tab); default: tab for
    ``.tsv``/``.txt``, comma for ``.csv``, guessed from the first lines for any other suffix.
    ``shared_folder``: for processes that read the same files at once (the ranks of a torchrun job on one
    machine): the folder of the Arrow copy, made by the first of them (datasets locks it) and
    memory-mapped by all; each process removes it when done (a mapped copy outlives that). Default: a
    private temporary folder per call.
    """
    files = data_files(path)
    # Messages name the file, or the first of several.
    path = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more file(s))"
    if header is None:
        header = not any(isinstance(c, int) for c in (text_column, label_column, pair_column))
    try:
        table, cache = _load(files, header, delimiter, shared_folder)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for a table of no rows
            raise ValueError(f"{path}: no data rows (a header alone?)") from error
        raise
    except ImportError:
        raise
    except Exception as error:  # datasets/pyarrow errors carry long traces; one line is what users need
        kind = _kind(files[0])
        what = "JSON" if kind == "json" else "Parquet" if kind == "parquet" else "delimited text"
        hint = "; check the delimiter (--delimiter) and whether there is a header row (--no-header)" \
            if what == "delimited text" else ""
        cause = _first_cause(error)
        if kind == "json":
            cause = _first_bad_json_line(files) or cause
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", cause)
        if fields and int(fields.group(1)) < int(fields.group(3)):  # pandas counts the first line's fields
            cause += (f" (the number of fields is taken from the first line, which has {fields.group(1)}: that line "
                      f"or line {fields.group(2)} is malformed)")
        if len(files) > 1 and cause.startswith("Couldn't cast"):  # datasets' words when the files' tables differ
            raise ValueError(f"{path}: the files cannot be read as one table: their columns, or the types of their "
                             "values, differ; every file needs the same columns") from error
        raise ValueError(f"{path}: cannot read it as {what}: {cause}{hint}") from error
    columns = list(table.column_names)
    if text_column is None and pair_column is None:  # a sentence-pair layout wins (QNLI: question + sentence)
        text_column = next((first for first, second in PAIR_COLUMNS.items()
                            if first in columns and second in columns), None)
    text = _pick(columns, text_column, TEXT_COLUMNS, "text", path, "--text-column")
    label = _pick(columns, label_column, LABEL_COLUMNS, "label", path, "--label-column")
    pair = None
    if pair_column is not None:
        pair = _pick(columns, pair_column, (), "second-text", path, "--text-pair-column")
    elif PAIR_COLUMNS.get(text) in columns:
        pair = PAIR_COLUMNS[text]
    # An empty field reads as None: an empty text is still an example (score skips and counts it if it
    # leaves nothing to pool); a row without a label is left out, and said so.
    labels = _labels(table, label, _kind(files[0]) == "csv", path)
    kept = None  # the labelled rows, when some are not
    unlabelled = sum(y is None for y in labels)
    if unlabelled == len(labels):
        raise ValueError(f"{path}: no labelled rows (text column {text!r}, label column {label!r})")
    if unlabelled:
        kept = np.flatnonzero([y is not None for y in labels])
        delimited_header = header and _kind(files[0]) == "csv"  # JSON and Parquet rows have no header line
        where = f"data row {labels.index(None) + 1}{', after the header' if delimited_header else ''}"
        if len(files) > 1:
            where = f"row {labels.index(None) + 1} of the files' data rows in order"
        warnings.warn(f"{path}: {unlabelled} row(s) have no label in column {label!r} and are left out "
                      f"(the first is {where})", stacklevel=2)
        labels = [labels[i] for i in kept]
        if all(isinstance(y, float) and y.is_integer() for y in labels):
            # Integer labels read as floats only because a missing one made the column float (NaN).
            labels = [int(y) for y in labels]
    column = lambda name: TextColumn(table.data.column(name), kept, keep_alive=cache)  # noqa: E731
    return LabelledText(texts=column(text), labels=labels, pairs=column(pair) if pair else None,
                        text_column=text, label_column=label, pair_column=pair, num_unlabelled=unlabelled)
