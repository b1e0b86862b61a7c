"""Held-out splits from the user's own files (`--valid`/`--test`), the fraction fallback, and the
trainer evaluating a named split (meo_ds/data/prepare.py's module docstring is the contract)."""
import json

import pytest

from data_helpers import make_docs

from meo_ds.data.cli import main
from meo_ds.data.demo import synthetic_pairs
from meo_ds.data.lm import LMDataset, prepare_lm
from meo_ds.data.mt import MTDataset, prepare_mt
from meo_ds.data.readers import CorpusError
from meo_ds.data.tokenizer import Tokenizer


def _lines(path, items):
    path.write_text("\n".join(items) + "\n")
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _documents(directory, split):
    ds = LMDataset(directory, split)
    return [list(ds.document(i)) for i in range(ds.num_documents)]


def _pairs(directory, split):
    ds = MTDataset(directory, split)
    return [tuple(list(side) for side in ds.pair(i)) for i in range(len(ds))]


# --------------------------------------------------------------------------- LM
def test_lm_splits_are_exactly_the_given_files_in_three_formats(tmp_path, tok_path, capsys):
    import datasets

    tok = Tokenizer(tok_path)
    train = make_docs(300, seed=11)
    valid, test = make_docs(25, seed=12), make_docs(15, seed=13) + train[:2]  # two test documents are training text
    corpus = _jsonl(tmp_path / "train.jsonl", [{"text": d} for d in train])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["not this split"]}),
                          "validation": datasets.Dataset.from_dict({"text": valid})}).save_to_disk(tmp_path / "dev")
    test_file = _lines(tmp_path / "test.txt", test)
    m = prepare_lm([corpus], tok_path, tmp_path / "out", valid=[tmp_path / "dev"], test=[test_file], progress=False)
    encoded = lambda docs: [tok.encode(d) + [tok.eos_id] for d in docs]  # noqa: E731
    assert _documents(tmp_path / "out", "validation") == encoded(valid)  # the DatasetDict's validation split
    assert _documents(tmp_path / "out", "test") == encoded(test)  # kept whole, overlap included
    assert _documents(tmp_path / "out", "train") == encoded(train)  # nothing cut out of the inputs
    origin = {name: s["origin"] for name, s in m["splits"].items()}
    assert origin["train"] == {"from": "inputs"}
    assert origin["validation"]["from"] == "files" and origin["validation"]["overlap_with_train"] == 0
    assert origin["test"]["files"][0]["path"] == str(test_file.resolve()) and origin["test"]["overlap_with_train"] == 2
    assert "2 of 17 test documents also occur verbatim in the training inputs" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["test"]["origin"] == origin["test"]


def test_lm_fraction_fallback_per_split(tmp_path, tok_path):
    tok = Tokenizer(tok_path)
    docs = make_docs(200, seed=14)
    corpus = _lines(tmp_path / "c.txt", docs)
    m = prepare_lm([corpus], tok_path, tmp_path / "plain", progress=False)
    assert set(m["splits"]) == {"train", "validation"}  # no test split unless asked for
    assert m["splits"]["validation"]["sequences"] == 2 and m["splits"]["validation"]["origin"]["fraction"] == 0.01
    test = _lines(tmp_path / "t.txt", make_docs(5, seed=15))
    m = prepare_lm([corpus], tok_path, tmp_path / "mixed", test=[test], valid_fraction=0.1, progress=False)
    assert m["splits"]["validation"]["sequences"] == 20 and m["splits"]["train"]["sequences"] == 180
    assert _documents(tmp_path / "mixed", "test") == [tok.encode(d) + [tok.eos_id] for d in make_docs(5, seed=15)]
    m = prepare_lm([corpus], tok_path, tmp_path / "cut", valid_fraction=0.1, test_fraction=0.05, progress=False)
    assert {n: s["sequences"] for n, s in m["splits"].items()} == {"train": 170, "validation": 20, "test": 10}
    assert m["splits"]["test"]["origin"] == {"from": "inputs", "fraction": 0.05}


# --------------------------------------------------------------------------- MT
@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    d = tmp_path_factory.mktemp("par")
    pairs = list(synthetic_pairs(400, seed=21))
    train, valid, test = pairs[:300], pairs[300:350], pairs[350:]
    # what training's filters would drop must stay in a given split: a duplicate, a long side, a bad ratio
    test = test + [test[0], ("the " * 40 + "end", "short"), train[5]]
    _lines(d / "train.src", [s for s, _ in train]), _lines(d / "train.tgt", [t for _, t in train])
    _lines(d / "valid.src", [s for s, _ in valid]), _lines(d / "valid.tgt", [t for _, t in valid])
    (d / "test.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in test))
    _jsonl(d / "train.jsonl", [{"source": s, "target": t} for s, t in train])
    _jsonl(d / "valid.jsonl", [{"source": s, "target": t} for s, t in valid])
    return d, train, valid, test


def _encoded(tok, pairs):
    return [(tok.encode(s), tok.encode(t)) for s, t in pairs]


def test_mt_splits_are_exactly_the_given_files_aligned_and_tsv(parallel, tok_path, capsys):
    d, train, valid, test = parallel
    tok = Tokenizer(tok_path)
    out = d / "out_aligned"
    m = prepare_mt([d / "train.src", d / "train.tgt"], tok_path, out, valid=[d / "valid.src", d / "valid.tgt"],
                   test=[d / "test.tsv"], max_len=30, max_ratio=3.0, progress=False)
    assert _pairs(out, "validation") == _encoded(tok, valid)
    assert _pairs(out, "test") == _encoded(tok, test)  # no pair dropped: duplicate, too long, bad ratio all kept
    assert len(MTDataset(out, "train")) == m["pairs"]["kept"] == 300 - sum(m["pairs"]["removed"].values())
    assert m["splits"]["test"]["origin"]["overlap_with_train"] == 1
    assert m["splits"]["validation"]["origin"]["files"][1]["path"] == str((d / "valid.tgt").resolve())
    err = capsys.readouterr().err
    assert "longer than --max-len 30; kept" in err and "1 of 53 test pairs also occur verbatim" in err


def test_mt_jsonl_given_split_and_fraction_fallback(parallel, tok_path):
    d, train, valid, _ = parallel
    tok = Tokenizer(tok_path)
    m = prepare_mt([d / "train.jsonl"], tok_path, d / "out_jsonl", valid=[d / "valid.jsonl"], test_fraction=0.1,
                   max_len=0, max_ratio=0, dedup=False, progress=False)
    assert _pairs(d / "out_jsonl", "validation") == _encoded(tok, valid)
    assert m["splits"]["test"]["pairs"] == 30 and m["splits"]["train"]["pairs"] == 270  # 0.1 of the inputs
    assert m["splits"]["test"]["origin"] == {"from": "inputs", "fraction": 0.1}
    assert sorted(_pairs(d / "out_jsonl", "train") + _pairs(d / "out_jsonl", "test")) == sorted(_encoded(tok, train))


# --------------------------------------------------------------------------- bad input
def test_files_and_fraction_for_one_split_is_an_error(parallel, tok_path, tmp_path, capsys):
    d, *_ = parallel
    corpus = _lines(tmp_path / "c.txt", make_docs(50, seed=16))
    assert main(["lm", str(corpus), "--tokenizer", str(tok_path), "--out", str(tmp_path / "lm"),
                 "--valid", str(d / "train.src"), "--valid-fraction", "0.1", "--no-progress"]) == 2
    assert "the validation split is given twice: as files (--valid) and as a fraction" in capsys.readouterr().err
    assert main(["mt", str(d / "train.src"), str(d / "train.tgt"), "--tokenizer", str(tok_path), "--out",
                 str(tmp_path / "mt"), "--test", str(d / "test.tsv"), "--test-fraction", "0.05", "--no-progress"]) == 2
    assert "the test split is given twice: as files (--test)" in capsys.readouterr().err
    assert not (tmp_path / "lm").exists() and not (tmp_path / "mt").exists()


def test_bad_split_files_fail_before_any_output(parallel, tok_path, tmp_path):
    d, *_ = parallel
    inputs, out = [d / "train.src", d / "train.tgt"], tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tgt: validation file not found"):
        prepare_mt(inputs, tok_path, out, valid=[d / "valid.src", tmp_path / "nowhere.tgt"], progress=False)
    with pytest.raises(ValueError, match=r"test files: aligned format needs exactly two files"):
        prepare_mt(inputs, tok_path, out, test=[d / "test.tsv"], fmt="aligned", progress=False)
    with pytest.raises(ValueError, match=r"the test file is identical to the training input .*train\.src"):
        prepare_mt(inputs, tok_path, out, test=[_lines(tmp_path / "copy.src", (d / "train.src").read_text().split("\n")[:-1]),
                                                 d / "valid.tgt"], progress=False)
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(CorpusError, match=r"blank\.jsonl: no validation pairs"):
        prepare_mt(inputs, tok_path, out, valid=[tmp_path / "blank.jsonl"], progress=False)
    (tmp_path / "hole.tsv").write_text("a b\tc d\n  \te f\n")
    with pytest.raises(CorpusError, match=r"hole\.tsv: test pair 2 has an empty source; a given split is kept whole"):
        prepare_mt(inputs, tok_path, out, test=[tmp_path / "hole.tsv"], progress=False)
    with pytest.raises(CorpusError, match=r"empty\.txt: no documents"):
        prepare_lm([d / "train.src"], tok_path, out, test=[_lines(tmp_path / "empty.txt", [""])], progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --------------------------------------------------------------------------- the trainer
def test_trainer_evaluates_a_named_split(tmp_path, tok_path):
    from meo_ds.config import ConfigError, DataConfig, RunConfig
    from meo_ds.preflight import check_data
    from meo_ds.tasks import task_for

    corpus = _lines(tmp_path / "c.txt", make_docs(300, seed=17))
    test = _lines(tmp_path / "t.txt", make_docs(40, seed=18))
    prepare_lm([corpus], tok_path, tmp_path / "with_test", test=[test], progress=False)
    cfg = RunConfig(task="lm", data=DataConfig(path=str(tmp_path / "with_test"), seq_len=8, val_split="test"))
    cfg.train.micro_batch_size = 2
    check_data(cfg)
    loader = task_for(cfg).loader(cfg.data.val_split, 0, 1, shuffle=False)  # what the trainer evaluates on
    assert loader.dataset.split == "test" and loader.dataset.num_tokens == LMDataset(tmp_path / "with_test", "test").num_tokens
    prepare_lm([corpus], tok_path, tmp_path / "no_test", progress=False)
    cfg.data.path = str(tmp_path / "no_test")
    with pytest.raises(ConfigError, match=r"has no split 'test' \(.*it has train, validation\)\); set data.val_split"):
        check_data(cfg)
