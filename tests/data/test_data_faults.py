"""Corrupt corpora and bad prepare inputs: each is caught with a message naming the file and the fix.

Cheap checks run on every open (manifest, sizes, indexes) and per batch (token ids); the full
check (sha256 of every file) is `meo-prepare verify DIR`. Stale staging directories of killed
runs are removed by the next run.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from meo_ds.data.cli import main as prepare_main
from meo_ds.data.io import remove_stale_staging
from meo_ds.data.lm import LMDataset, LMLoader, prepare_lm
from meo_ds.data.mt import MTLoader, prepare_mt
from meo_ds.data.readers import CorpusError
from meo_ds.data.tokenizer import MAX_SENTENCE_BYTES, Tokenizer, train_tokenizer
from meo_ds.data.verify import verify_corpus

from data_helpers import make_docs


@pytest.fixture
def corpus(tmp_path, lm_dir):
    """A private copy of the session's LM corpus that a test may damage."""
    return shutil.copytree(lm_dir, tmp_path / "corpus")


def _poke(path, token: int, value: int, dtype=np.uint16) -> None:
    data = np.memmap(path, dtype=dtype, mode="r+")
    data[token] = value
    data.flush()
    del data


def test_out_of_vocabulary_id_names_the_shard_in_the_loader_and_in_verify(corpus, capsys):
    _poke(corpus / "train.bin", 5, 0xFFFF)  # a flipped high byte: an id far beyond the vocabulary
    loader = LMLoader(corpus, seq_len=8, micro_batch_size=1, shuffle=False)
    with pytest.raises(CorpusError, match=r"train\.bin: token id 65535 at token 5 is outside the vocabulary "
                                          r"\(\d+ ids\).*meo-prepare verify"):
        next(iter(loader))
    assert prepare_main(["verify", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "train.bin: token id 65535 at token 5" in err and "train.bin: sha256 differs" in err


def test_in_vocabulary_flip_is_caught_by_the_checksum_only(corpus, capsys):
    assert prepare_main(["verify", str(corpus)]) == 0
    assert "OK, 2 token files" in capsys.readouterr().out
    ds = LMDataset(corpus, "validation")
    _poke(corpus / "validation.bin", 3, (int(ds.tokens[3]) + 1) % ds.vocab_size)
    LMLoader(corpus, 8, 2, split="validation")  # opens: sizes and indexes are intact
    with pytest.raises(CorpusError, match=r"validation\.bin: sha256 differs from the manifest's"):
        verify_corpus(corpus)


def test_truncated_shard_and_broken_index_are_named_on_open(corpus):
    with open(corpus / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorpusError, match=r"train\.bin: 100 bytes, the manifest says \d+ .*--overwrite"):
        LMDataset(corpus)
    (corpus / "validation.idx.npy").write_bytes(b"not an index")
    with pytest.raises(CorpusError, match=r"validation\.idx\.npy: corrupt or missing index"):
        LMDataset(corpus, "validation")


def test_decreasing_index_and_unsupported_dtype(corpus):
    offsets = np.load(corpus / "validation.idx.npy")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    np.save(corpus / "validation.idx.npy", offsets)
    with pytest.raises(CorpusError, match=r"validation\.idx\.npy: index does not match the manifest"):
        LMDataset(corpus, "validation")
    with pytest.raises(CorpusError, match=r"1 problem\(s\).*\n  - .*validation\.idx\.npy: index does not match"):
        verify_corpus(corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    (corpus / "manifest.json").write_text(json.dumps({**manifest, "dtype": "float64"}))
    with pytest.raises(CorpusError, match=r"manifest\.json: corrupt, dtype 'float64' is not one of"):
        LMDataset(corpus)


def test_malformed_manifest_names_the_file(corpus):
    text = (corpus / "manifest.json").read_text()
    (corpus / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorpusError, match=r"manifest\.json: corrupt, not valid JSON .*--overwrite"):
        LMDataset(corpus)
    manifest = json.loads(text)
    del manifest["tokenizer"]
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match=r"manifest\.json: corrupt, no 'tokenizer'"):
        LMDataset(corpus)


def test_replaced_tokenizer_is_caught_by_verify(corpus, tmp_path):
    train_tokenizer(make_docs(300, seed=9), corpus / "tokenizer.model", vocab_size=400, character_coverage=1.0)
    with pytest.raises(CorpusError, match=r"tokenizer\.model: sha256 differs .*not the tokenizer"):
        verify_corpus(corpus)


def test_translation_target_corruption_names_the_target_file(tmp_path, tok_path):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    docs = make_docs(200, seed=5)
    src.write_text("\n".join(docs) + "\n")
    tgt.write_text("\n".join(d.upper() for d in docs) + "\n")
    prepare_mt([src, tgt], tok_path, tmp_path / "mt", max_ratio=0, progress=False)
    _poke(tmp_path / "mt" / "train.tgt.bin", 0, 0xFFFF)
    with pytest.raises(CorpusError, match=r"train\.tgt\.bin: token id 65535 at token 0 \(pair 0\)"):
        list(MTLoader(tmp_path / "mt", 100_000, shuffle=False))


def test_unparseable_tokenizer_model_is_a_clear_error(tmp_path, capsys, lm_dir):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a SentencePiece model"):
        Tokenizer(bad)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(make_docs(20)) + "\n")
    assert prepare_main(["lm", str(corpus), "--tokenizer", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a SentencePiece model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_lines_over_sentencepiece_limit_still_train_a_tokenizer(tmp_path):
    docs = make_docs(400, seed=3)
    book = " ".join(docs * 3)  # whole books on one line, each far over SentencePiece's sentence limit
    assert len(book.encode()) > 2 * MAX_SENTENCE_BYTES
    tok = train_tokenizer([book, book.upper()], tmp_path / "tok.model", vocab_size=400, character_coverage=1.0)
    assert tok.vocab_size > 300 and tok.decode(tok.encode("the model")) == "the model"


def test_vocabulary_larger_than_the_corpus_supports_warns_and_is_recorded(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(make_docs(100, seed=1)) + "\n")
    assert prepare_main(["tokenizer", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "32000",
                         "--no-progress"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["requested_vocab_size"] == 32000 and manifest["vocab_size"] < 1000
    assert (f"warning: the training text supports only {manifest['vocab_size']} tokens, not the requested "
            f"vocabulary of 32000") in captured.err


def test_stale_staging_of_a_killed_prepare_is_removed_by_the_next_run(tmp_path, tok_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom meo_ds.data.io import staging_dir\n"
        f"with staging_dir(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'train.bin').write_bytes(b'x' * 1000)\n    print(tmp, flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    staged = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    legacy = tmp_path / ".out.tmp-0123abcd"  # written before staging names carried their owner
    legacy.mkdir()
    host = socket.gethostname()
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-0123abcd"  # a run of this process: alive
    live.mkdir()
    other_host = tmp_path / ".out.tmp-elsewhere-1-0123abcd"
    other_host.mkdir()
    assert os.path.isdir(staged)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(make_docs(50)) + "\n")
    prepare_lm([corpus], tok_path, out, progress=False)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert left == sorted([live.name, other_host.name]), left
    assert remove_stale_staging(out) == [] and LMDataset(out).num_tokens > 0


def test_trainer_data_verify_fails_before_any_rank_starts(corpus, monkeypatch):
    from meo_ds.config import DataConfig, RunConfig
    from meo_ds.preflight import check_data

    _poke(corpus / "train.bin", 7, 1)
    cfg = RunConfig(task="lm", data=DataConfig(path=str(corpus), seq_len=8, verify=True))
    cfg.train.micro_batch_size = 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(CorpusError, match=r"train\.bin: sha256 differs"):
        check_data(cfg)
    cfg.data.verify = False
    check_data(cfg)  # the cheap checks pass: only the checksum sees an in-vocabulary flip
