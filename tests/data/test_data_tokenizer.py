import pytest

from meo_ds.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, prepare_tokenizer, train_tokenizer

from data_helpers import make_docs

TRICKY = ["the gate learns", "  leading and   repeated spaces ", "über naïve café 🙂 ｆｕｌｌ", "tabs\tand\nnewlines",
          "", "zzqq unseen ĳ ﬁ 12345"]


def test_special_ids_and_round_trip(tok_path):
    tok = Tokenizer(tok_path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    for text in make_docs(20, seed=9):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id] + tok.encode("the gate") + [tok.eos_id, tok.pad_id]) == "the gate"
    assert tok.decode(tok.encode("emoji 🙂")) == "emoji 🙂"  # byte fallback: nothing becomes <unk>
    assert tok.unk_id not in tok.encode("emoji 🙂")


@pytest.mark.parametrize("model_type,normalization", [("unigram", "nmt_nfkc"), ("bpe", "nmt_nfkc"),
                                                     ("unigram", "nfkc")])
def test_hf_tokenizer_encodes_identically(tmp_path, model_type, normalization):
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer

    from meo_ds.data.tokenizer import save_hf_tokenizer

    tok_path = tmp_path / "t.model"
    tok = train_tokenizer(make_docs(1000, seed=1) + TRICKY, tok_path, vocab_size=400, model_type=model_type,
                          character_coverage=1.0, normalization=normalization)
    files = save_hf_tokenizer(tok_path, tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer.model"} <= set(files)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    for text in TRICKY + make_docs(30, seed=4):
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == tok.decode(ids), text


def test_bpe_and_joint_vocabulary(tmp_path):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("\n".join(make_docs(300, seed=1)) + "\n")
    tgt.write_text("\n".join("ξ" + d.replace("e", "ε") for d in make_docs(300, seed=2)) + "\n")
    m = prepare_tokenizer([src, tgt], tmp_path / "tok", parallel=True, vocab_size=350, model_type="bpe",
                          character_coverage=1.0)
    tok = Tokenizer(tmp_path / "tok")
    assert m["vocab_size"] == tok.vocab_size <= 350 and m["special_ids"]["eos"] == 3
    assert tok.sp.piece_to_id("ε") != tok.unk_id and tok.sp.piece_to_id("▁the") != tok.unk_id
    again = prepare_tokenizer([src, tgt], tmp_path / "tok", parallel=True, vocab_size=350, model_type="bpe",
                              character_coverage=1.0)
    assert again["sha256"] == m["sha256"]


def test_empty_training_input_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "  "], tmp_path / "t.model", vocab_size=300)
    assert not (tmp_path / "t.model").exists()


def test_nfkc_keeps_lines_of_multi_line_documents(tmp_path):
    docs = [d.replace(" the ", "\nthe ") for d in make_docs(500, seed=6)]
    tok = train_tokenizer(docs, tmp_path / "t.model", vocab_size=400, character_coverage=1.0, normalization="nfkc")
    text = "the gate\nlearns\tfast\n\nthe end"
    assert tok.decode(tok.encode(text)) == text
    for doc in docs[:50]:
        assert tok.decode(tok.encode(doc)) == doc
    with pytest.raises(ValueError, match="normalization must be one of"):
        train_tokenizer(docs, tmp_path / "u.model", normalization="nfc")
