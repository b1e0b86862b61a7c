"""Corpus readers. Every reader streams (constant memory) and reports bad input with file and line.

Formats: ``text`` (one document per line, or blank-line separated with ``doc_sep="blank"``),
``jsonl`` (one JSON object per line, text in ``field``), ``parquet`` (column ``field``), and
``hf`` (a directory written by ``datasets.save_to_disk``, or local csv/json/parquet files loaded
through ``datasets``). ``auto`` picks by extension / directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")


class CorpusError(ValueError):
    """Bad input; the message names the file (and line) at fault."""


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".csv":
        return "hf"
    return "text"


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) for a UTF-8 text file; non-UTF-8 bytes are an error."""
    if not path.exists():
        raise CorpusError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: file is empty")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            yield number, line.rstrip("\r\n")


def read_text(path: Path, doc_sep: str = "line") -> Iterator[str]:
    if doc_sep not in ("line", "blank"):
        raise ValueError(f"doc_sep must be 'line' or 'blank', not {doc_sep!r}")
    block: list[str] = []
    for _, line in iter_lines(path):
        if doc_sep == "line":
            if line.strip():
                yield line
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def read_jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def get_field(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise CorpusError(f"{where}: no field {field!r} (fields: {', '.join(sorted(record)) or 'none'})")
    value = record[field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def read_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    for number, record in read_jsonl_records(path):
        yield get_field(record, field, f"{path}:{number}")


def read_parquet(path: Path, field: str = "text", batch_size: int = 4096) -> Iterator[str]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise CorpusError(f"{path}: file not found")
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if field not in names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {', '.join(names)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise CorpusError(f"{path}: row {row}: column {field!r} is {type(value).__name__}, not a string")
            yield value
    if row == 0:
        raise CorpusError(f"{path}: parquet file has no rows")


def read_hf(path: Path, field: str = "text", split: str = "train") -> Iterator[str]:
    import datasets

    if path.is_dir():
        data = datasets.load_from_disk(str(path))
    else:
        builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise CorpusError(f"{path}: datasets cannot load this file type; use csv, json or parquet")
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise CorpusError(f"{path}: dataset has no split {split!r} (splits: {', '.join(data)})")
        data = data[split]
    if field not in data.column_names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {', '.join(data.column_names)})")
    for row, value in enumerate(data.select_columns([field]).to_iterable_dataset(), 1):
        value = value[field]
        if not isinstance(value, str):
            raise CorpusError(f"{path}: row {row}: column {field!r} is {type(value).__name__}, not a string")
        yield value


def read_documents(inputs: Iterable[str | os.PathLike], fmt: str = "auto", field: str = "text",
                   doc_sep: str = "line", split: str = "train") -> Iterator[str]:
    """Stream documents from every input in order; empty documents are skipped."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    for item in inputs:
        path = Path(item)
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "text":
            docs = read_text(path, doc_sep)
        elif kind == "jsonl":
            docs = read_jsonl(path, field)
        elif kind == "parquet":
            docs = read_parquet(path, field)
        else:
            docs = read_hf(path, field, split)
        count = 0
        for doc in docs:
            if doc.strip():
                count += 1
                yield doc
        if count == 0:
            raise CorpusError(f"{path}: no documents (only empty text)")


PAIR_FORMATS = ("auto", "aligned", "tsv", "jsonl")


def pair_format(inputs: Sequence[str | os.PathLike], fmt: str = "auto") -> str:
    """The parallel format of `inputs` (`auto`: two files are aligned, one .jsonl file JSON lines,
    any other single file TSV); a format that does not fit the number of files is a ValueError."""
    paths = [Path(p) for p in inputs]
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"parallel format must be auto, aligned, tsv or jsonl, not {fmt!r}")
    if fmt == "auto":
        if not paths:
            raise ValueError("no input files")
        fmt = "aligned" if len(paths) == 2 else ("jsonl" if detect_format(paths[0]) == "jsonl" else "tsv")
    if fmt == "aligned" and len(paths) != 2:
        raise ValueError(f"aligned format needs exactly two files: source and target (got {len(paths)})")
    if fmt != "aligned" and len(paths) != 1:
        raise ValueError(f"{fmt} format takes exactly one file, got {len(paths)}")
    return fmt


def read_pairs(inputs: Sequence[str | os.PathLike], fmt: str = "auto", source_field: str = "source",
               target_field: str = "target") -> Iterator[tuple[str, str]]:
    """Stream (source, target) pairs: two aligned text files, one TSV file, or one JSON lines file."""
    paths = [Path(p) for p in inputs]
    fmt = pair_format(paths, fmt)
    if fmt == "aligned":
        yield from _read_aligned(*paths)
    elif fmt == "tsv":
        for number, line in iter_lines(paths[0]):
            parts = line.split("\t")
            if len(parts) != 2:
                raise CorpusError(f"{paths[0]}:{number}: expected 2 tab-separated columns, found {len(parts)} "
                                  f"(one parallel file is read as source<TAB>target; give aligned files as SRC TGT)")
            yield parts[0], parts[1]
    else:
        for number, record in read_jsonl_records(paths[0]):
            where = f"{paths[0]}:{number}"
            yield get_field(record, source_field, where), get_field(record, target_field, where)


def _read_aligned(source: Path, target: Path) -> Iterator[tuple[str, str]]:
    src_lines, tgt_lines = iter_lines(source), iter_lines(target)
    number = 0
    for number, src in src_lines:
        try:
            _, tgt = next(tgt_lines)
        except StopIteration:
            raise CorpusError(
                f"{target}: has {number - 1} lines but {source} has more; parallel files must align") from None
        yield src, tgt
    extra = sum(1 for _ in tgt_lines)
    if extra:
        raise CorpusError(f"{source}: has {number} lines but {target} has {number + extra}; parallel files must align")
