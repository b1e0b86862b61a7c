import json

import pytest

from meo_ds.data.cli import main
from meo_ds.data.demo import stdlib_docstrings, synthetic_pairs
from meo_ds.data.lm import LMDataset, LMLoader
from meo_ds.data.mt import MTDataset, MTLoader


def test_docstring_corpus_is_deterministic_and_capped():
    first = list(stdlib_docstrings(max_chars=50_000))
    assert first == list(stdlib_docstrings(max_chars=50_000))
    assert 50_000 <= sum(map(len, first)) < 50_000 + max(map(len, first)) + 1
    assert all(len(doc.split()) >= 5 for doc in first)


def test_synthetic_pairs_follow_the_rules():
    pairs = list(synthetic_pairs(300, seed=0))
    assert pairs == list(synthetic_pairs(300, seed=0)) != list(synthetic_pairs(300, seed=1))
    for src, tgt in pairs:
        assert src.endswith(" .") and tgt.endswith(" .")
        assert len(src.split()) == len(tgt.split())  # word-for-word, reordered
    lexicon = {}
    for src, tgt in pairs:  # "the X sees the Y ." keeps a fixed word map: verb last, nouns in order
        s, t = src.split(), tgt.split()
        if len(s) == 6 and s[0] == s[3] == "the" and not s[1].endswith("s") and not s[4].endswith("s"):
            for word, made in ((s[0], t[0]), (s[1], t[1]), (s[2], t[4]), (s[4], t[3])):
                assert lexicon.setdefault(word, made) == made


def test_synthetic_target_is_a_function_of_the_source():
    mapping = {}
    for src, tgt in synthetic_pairs(20_000, seed=0):
        assert mapping.setdefault(src, tgt) == tgt
    assert len(mapping) > 19_000  # few repeats: the model must generalise, not memorise


@pytest.mark.parametrize("task", ["mt", "lm"])
def test_demo_command_builds_loadable_shards_and_reruns(tmp_path, task, capsys):
    out = tmp_path / task
    extra = ["--pairs", "3000"] if task == "mt" else ["--max-chars", "300000", "--vocab-size", "2000"]
    assert main(["demo", "--task", task, "--out", str(out)] + extra) == 0
    stamp = json.loads((out / "demo.json").read_text())
    shards = out / stamp["shards"]
    before = (shards / "manifest.json").read_text()
    if task == "lm":
        ds = LMDataset(shards)
        assert ds.num_documents > 100 and len(LMLoader(shards, 64, 4)) > 10
        first, tok = next(stdlib_docstrings()), ds.tokenizer()
        assert tok.decode(ds.document(0)) == tok.decode(tok.encode(first))
        assert "\n" in tok.decode(ds.document(0)) and first.count("\n") == tok.decode(ds.document(0)).count("\n")
    else:
        assert len(MTDataset(shards, "test")) == 150 and len(MTLoader(shards, 1024)) > 5
    assert main(["demo", "--task", task, "--out", str(out)] + extra) == 0
    assert (shards / "manifest.json").read_text() == before
    assert "nothing to do" in capsys.readouterr().out
    other = "lm" if task == "mt" else "mt"
    assert main(["demo", "--task", other, "--out", str(out)]) == 2
    assert "holds something other than" in capsys.readouterr().err
