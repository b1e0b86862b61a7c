import pytest

from data_helpers import make_docs

from meo_ds.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer(make_docs(2000, seed=1), path, vocab_size=400, byte_fallback=True, character_coverage=1.0)
    return path


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tok_path):
    from meo_ds.data.lm import prepare_lm

    src = tmp_path_factory.mktemp("lmsrc") / "corpus.txt"
    src.write_text("\n".join(make_docs(600, seed=2)) + "\n")
    out = tmp_path_factory.mktemp("lm") / "shards"
    prepare_lm([src], tok_path, out, valid_fraction=0.1, progress=False)
    return out
