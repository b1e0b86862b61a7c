import json

import pytest

from meo_ds.data.lm import LMDataset, prepare_lm
from meo_ds.data.readers import CorpusError, read_documents, read_pairs
from meo_ds.data.tokenizer import Tokenizer

DOCS = ["first document\nwith two lines", "second one", "third: ünïcode"]


def test_text_line_and_blank_separated(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(DOCS) + "\n\n\n")
    assert list(read_documents([path], doc_sep="blank")) == DOCS
    assert list(read_documents([path])) == ["first document", "with two lines", "second one", "third: ünïcode"]


def test_jsonl_custom_field_and_type_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    assert list(read_documents([path], field="body")) == DOCS
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: field 'id' is int, not a string"):
        list(read_documents([path], field="id"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), path, row_group_size=2)
    assert list(read_documents([path])) == DOCS
    with pytest.raises(CorpusError, match=r"c\.parquet: no column 'body' \(columns: text, n\)"):
        list(read_documents([path], field="body"))


def test_datasets_directory_and_csv(tmp_path, tok_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": DOCS})}).save_to_disk(tmp_path / "ds")
    assert list(read_documents([tmp_path / "ds"], field="content")) == DOCS
    with pytest.raises(CorpusError, match="no split 'dev'"):
        list(read_documents([tmp_path / "ds"], field="content", split="dev"))
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\n" + "".join(f'"{d}",{i}\n' for i, d in enumerate(DOCS)))
    assert list(read_documents([csv])) == DOCS
    m = prepare_lm([tmp_path / "ds"], tok_path, tmp_path / "out", field="content", valid_fraction=0, progress=False)
    tok = Tokenizer(tok_path)
    ds = LMDataset(tmp_path / "out")
    assert m["documents"] == 3
    # SentencePiece's default normalization turns the newline into a space
    assert [tok.decode(ds.document(i)) for i in range(3)] == [tok.decode(tok.encode(d)) for d in DOCS]
    assert tok.decode(ds.document(0)) == "first document with two lines"


def test_several_inputs_stream_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("one\ntwo\n")
    b.write_text(json.dumps({"text": "three"}) + "\n")
    assert list(read_documents([a, b])) == ["one", "two", "three"]


def test_pairs_formats(tmp_path):
    (tmp_path / "s").write_text("a\nb\n")
    (tmp_path / "t").write_text("x\ny\n")
    (tmp_path / "p.tsv").write_text("a\tx\nb\ty\n")
    (tmp_path / "p.jsonl").write_text('{"source": "a", "target": "x"}\n{"source": "b", "target": "y"}\n')
    expected = [("a", "x"), ("b", "y")]
    assert list(read_pairs([tmp_path / "s", tmp_path / "t"])) == expected
    assert list(read_pairs([tmp_path / "p.tsv"])) == expected
    assert list(read_pairs([tmp_path / "p.jsonl"])) == expected
    (tmp_path / "q.jsonl").write_text('{"source": "a", "target": "x"}\n{"source": "b"}\n')
    with pytest.raises(CorpusError, match=r"q\.jsonl:2: no field 'target'"):
        list(read_pairs([tmp_path / "q.jsonl"]))
