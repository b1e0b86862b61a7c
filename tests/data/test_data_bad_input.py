"""Each bad input gets a clear message naming the problem (file and line) and leaves no output."""
import json
import os

import pytest

from meo_ds.data import io as data_io
from meo_ds.data.lm import LMDataset, prepare_lm
from meo_ds.data.mt import prepare_mt
from meo_ds.data.readers import CorpusError
from meo_ds.data.tokenizer import Tokenizer

from data_helpers import make_docs


def _no_output(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


def test_non_utf8_names_file_and_line(tmp_path, tok_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(("good line\n" * 300).encode() + b"caf\xe9 latin-1\n")
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"bad\.txt:301: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        prepare_lm([src], tok_path, out, progress=False)
    _no_output(tmp_path, out)


def test_empty_file(tmp_path, tok_path):
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"empty\.txt: file is empty"):
        prepare_lm([src], tok_path, tmp_path / "out", progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(CorpusError, match=r"blank\.txt: no documents"):
        prepare_lm([blank], tok_path, tmp_path / "out", progress=False)
    _no_output(tmp_path, tmp_path / "out")


def test_missing_text_field_names_file_and_line(tmp_path, tok_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "oops"}) + "\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: no field 'text' \(fields: body\)"):
        prepare_lm([src], tok_path, tmp_path / "out", progress=False)
    src.write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: invalid JSON"):
        prepare_lm([src], tok_path, tmp_path / "out", progress=False)
    _no_output(tmp_path, tmp_path / "out")


def test_parallel_files_with_different_line_counts(tmp_path, tok_path):
    (tmp_path / "s.txt").write_text("a\nb\nc\n")
    (tmp_path / "t.txt").write_text("x\ny\n")
    with pytest.raises(CorpusError, match=r"t\.txt: has 2 lines but .*s\.txt has more"):
        prepare_mt([tmp_path / "s.txt", tmp_path / "t.txt"], tok_path, tmp_path / "out", progress=False)
    with pytest.raises(CorpusError, match=r"s\.txt: has 3 lines but .*t2\.txt has 4"):
        (tmp_path / "t2.txt").write_text("x\ny\nz\nw\n")
        prepare_mt([tmp_path / "s.txt", tmp_path / "t2.txt"], tok_path, tmp_path / "out", progress=False)
    (tmp_path / "p.tsv").write_text("a\tb\nonly one column\n")
    with pytest.raises(CorpusError, match=r"p\.tsv:2: expected 2 tab-separated columns, found 1"):
        prepare_mt([tmp_path / "p.tsv"], tok_path, tmp_path / "out", progress=False)
    _no_output(tmp_path, tmp_path / "out")


def test_vocabulary_too_big_for_dtype(tmp_path, tok_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(make_docs(10)) + "\n")
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    with pytest.raises(ValueError, match="vocabulary of 70000 ids does not fit dtype uint16"):
        prepare_lm([src], tok_path, tmp_path / "out", dtype="uint16", progress=False)
    _no_output(tmp_path, tmp_path / "out")
    m = prepare_lm([src], tok_path, tmp_path / "out", progress=False)
    assert m["dtype"] == "uint32" and LMDataset(tmp_path / "out").tokens.dtype.name == "uint32"


def test_output_dir_with_another_corpus(tmp_path, tok_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(make_docs(50, seed=1)) + "\n")
    b.write_text("\n".join(make_docs(50, seed=2)) + "\n")
    out = tmp_path / "out"
    first = prepare_lm([a], tok_path, out, progress=False)
    assert prepare_lm([a], tok_path, out, progress=False) == first  # same corpus again: a no-op
    with pytest.raises(FileExistsError, match="holds a different corpus; .* --overwrite"):
        prepare_lm([b], tok_path, out, progress=False)
    assert LMDataset(out).manifest == first
    second = prepare_lm([b], tok_path, out, overwrite=True, progress=False)
    assert LMDataset(out).manifest["corpus_key"] == second["corpus_key"] != first["corpus_key"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a prepared corpus"):
        prepare_lm([a], tok_path, stranger, progress=False)


def test_interrupted_run_leaves_previous_corpus_intact(tmp_path, tok_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(make_docs(50, seed=1)) + "\n")
    b.write_text("\n".join(make_docs(500, seed=2)) + "\n")
    out = tmp_path / "out"
    first = prepare_lm([a], tok_path, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    original = data_io.TokenFileWriter.add_many

    def dying_add_many(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first write went through, then the run dies
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(data_io.TokenFileWriter, "add_many", dying_add_many)
    with pytest.raises(KeyboardInterrupt):
        prepare_lm([b], tok_path, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "out"]
    assert LMDataset(out).manifest == first


def test_directory_without_manifest_is_never_read(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LMDataset(tmp_path)
