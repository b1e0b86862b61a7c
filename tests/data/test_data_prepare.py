import numpy as np
import pytest

from meo_ds.data.prepare import StrideSplitter, tokenize_chunks
from meo_ds.data.tokenizer import Tokenizer

from data_helpers import make_docs


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.25, 1 / 3, 0.5])
def test_stride_split_is_exact_and_streaming(fraction):
    whole = StrideSplitter(fraction).take(1000)
    parts = StrideSplitter(fraction)
    pieces = np.concatenate([parts.take(n) for n in (1, 7, 300, 0, 692)])
    assert np.array_equal(whole, pieces)
    assert whole.sum() == int(1000 * fraction + 1e-9)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_tokenize_chunks_in_order_and_bounded(tok_path, num_proc):
    docs = make_docs(400, seed=8)
    consumed = []

    def source():
        for i, doc in enumerate(docs):
            consumed.append(i)
            yield doc

    chunks = tokenize_chunks(source(), tok_path, num_proc=num_proc, chunk_size=10)
    first = next(chunks)
    assert len(consumed) <= (2 * num_proc + 1) * 10  # reads ahead a few chunks only, not the corpus
    flat = [first] + list(chunks)
    tok = Tokenizer(tok_path)
    ids = [seq.tolist() for [(f, lengths)] in flat for seq in np.split(f, np.cumsum(lengths)[:-1])]
    assert ids == [tok.encode(d) for d in docs]
