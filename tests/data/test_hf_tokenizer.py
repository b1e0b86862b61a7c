"""LM corpora with a HuggingFace tokenizer.json (Qwen2 / Llama 3 style), no download: a small BPE
trained here. The shards hold exactly the tokenizer's encoding of each document + eos."""
import json

import numpy as np
import pytest
from data_helpers import make_docs, make_hf_tokenizer

from meo_ds.data.cli import main as prepare_main
from meo_ds.data.lm import LMDataset
from meo_ds.data.readers import CorpusError
from meo_ds.data.verify import verify_corpus

DOCS = make_docs(300, seed=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_lm")
    (root / "corpus.txt").write_text("\n".join(DOCS) + "\n")
    return root / "corpus.txt"


@pytest.mark.parametrize("bos", [False, True], ids=["qwen2-style", "llama3-style"])
def test_lm_corpus_holds_the_hf_encoding_of_each_document_then_eos(corpus, bos, tmp_path):
    tok = make_hf_tokenizer(tmp_path / "tok", DOCS, bos=bos)
    eos, bos_id = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|begin_of_text|>")
    out = tmp_path / "lm"
    assert prepare_main(["lm", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
                         "--valid-fraction", "0", "--no-progress"]) == 0
    expected = [i for doc in DOCS for i in tok.encode(doc).ids + [eos]]
    ds = LMDataset(out, "train")
    assert ds.num_documents == len(DOCS)
    assert np.array_equal(np.asarray(ds.tokens, dtype=np.int64), expected)
    assert (ds.document(0)[0] == bos_id) == bos  # Llama 3's post-processor adds bos, Qwen2's nothing
    manifest = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert manifest["kind"] == "hf" and manifest["file"] == "tokenizer.json"
    assert manifest["special_ids"] == {"pad": eos, "unk": None, "bos": bos_id if bos else None, "eos": eos}
    loaded = ds.tokenizer()  # the corpus's own copy, with its special-token file
    assert (loaded.eos_id, loaded.bos_id) == (eos, bos_id if bos else None)
    assert loaded.decode(ds.document(3)) == DOCS[3]
    assert verify_corpus(out)["tokens"] == len(expected)


def test_a_changed_special_token_changes_the_corpus(corpus, tmp_path):
    make_hf_tokenizer(tmp_path / "tok", DOCS)
    args = ["lm", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "lm"), "--no-progress"]
    assert prepare_main(args) == 0
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": "<|begin_of_text|>"}))
    assert prepare_main(args) == 2  # another tokenizer: the directory holds another corpus now
    (tmp_path / "lm" / "tokenizer_config.json").write_text(config.read_text())
    with pytest.raises(CorpusError, match="sha256 differs"):
        verify_corpus(tmp_path / "lm")


def test_bad_tokenizers_are_named_before_any_work(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prepare_main(["lm", str(corpus), "--tokenizer", str(tmp_path / "empty"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.model" in err and "tokenizer.json" in err, err
    make_hf_tokenizer(tmp_path / "tok", DOCS)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    assert prepare_main(["lm", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "b")]) == 2
    assert "'<nope>'" in capsys.readouterr().err
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    assert prepare_main(["lm", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "c")]) == 2
    assert "no eos token" in capsys.readouterr().err
    (tmp_path / "src.txt").write_text("a b\n")
    (tmp_path / "tgt.txt").write_text("c d\n")
    assert prepare_main(["mt", str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt"), "--tokenizer",
                         str(tmp_path / "tok"), "--out", str(tmp_path / "d")]) == 2
    assert "SentencePiece tokenizer.model only" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")
