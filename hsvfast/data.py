"""Reading labelled text files (CSV, TSV, JSON Lines, Parquet) through 🤗 ``datasets``, offline.

Quirks handled: CRLF line ends, TSVs read with quoting off (GLUE files hold bare double quotes),
a UTF-8 byte-order mark, latin-1 files, files with or without a header row (columns then named
by position: ``--text-column 3 --label-column 1``). Columns are found by name with defaults
(``sentence``/``text``/``sentence1``/``question``/``tweet`` …, ``label``/``class``/``category`` …);
when that fails, the error lists the columns there are.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, List, Optional, Union

TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "tweet", "#1 String", "content", "review", "document")
PAIR_COLUMNS = {"sentence1": "sentence2", "question": "sentence", "#1 String": "#2 String", "premise": "hypothesis"}
LABEL_COLUMNS = ("label", "labels", "class", "category", "Quality", "target", "intent")
_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

Column = Union[str, int, None]


@dataclass
class LabelledText:
    """Texts (and second texts of pairs) with their labels, read from one file."""

    texts: List[str]
    labels: List[Hashable]
    pairs: Optional[List[str]]
    text_column: str
    label_column: str
    pair_column: Optional[str]


def _load(path: Path, header: bool):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        kind = "csv"  # unknown suffix: treat as delimited text
    if kind != "csv":
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    options = dict(sep="\t" if path.suffix.lower() in (".tsv", ".txt") else ",",
                   header="infer" if header else None)
    if options["sep"] == "\t":
        options["quoting"] = csv.QUOTE_NONE  # GLUE TSVs hold bare double quotes
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            return datasets.load_dataset("csv", data_files=str(path), split="train", encoding=encoding, **options)
        except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as error:
            if not isinstance(error, UnicodeDecodeError) and not isinstance(error.__cause__, UnicodeDecodeError):
                raise
    raise ValueError(f"{path}: cannot decode the file as UTF-8 or latin-1")


def _pick(columns: List[str], wanted: Column, defaults, what: str, path: Path, flag: str) -> str:
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


def read_labelled_text(path: "str | Path", text_column: Column = None, label_column: Column = None,
                       pair_column: Column = None, header: Optional[bool] = None) -> LabelledText:
    """Read a labelled text file; see the module docstring for formats and defaults.

    ``header=None`` assumes a header row unless a column is given as a position (an int).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if header is None:
        header = not any(isinstance(c, int) for c in (text_column, label_column, pair_column))
    try:
        table = _load(path, header)
    except ValueError:
        raise
    except Exception as error:  # datasets/pyarrow errors carry long traces; one line is what users need
        raise ValueError(f"{path}: cannot read it as {_FORMATS.get(path.suffix.lower(), 'csv')}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
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
    rows = [(t, p, y) for t, p, y in zip(table[text], table[pair] if pair else [None] * len(table), table[label])
            if t is not None and y is not None]
    if not rows:
        raise ValueError(f"{path}: no labelled rows (text column {text!r}, label column {label!r})")
    return LabelledText(
        texts=[str(t) for t, _, _ in rows],
        labels=[y for _, _, y in rows],
        pairs=[str(p) if p is not None else "" for _, p, _ in rows] if pair else None,
        text_column=text, label_column=label, pair_column=pair,
    )
