"""meo_ds.evaluate: hypotheses are cut at eos, lose bos/pad, and ids beyond the tokenizer decode as unk."""
import contextlib
import io

import torch

from meo_ds.data.tokenizer import Tokenizer
from meo_ds.evaluate import source_batch, strip_special


def test_strip_special_and_ids_beyond_the_tokenizer(tmp_path):
    from meo_ds.data.demo import build_demo

    with contextlib.redirect_stdout(io.StringIO()):
        tok = Tokenizer(build_demo("mt", tmp_path / "mt", pairs=2000) / "tokenizer.model")
    words = tok.encode("a small test")
    hyp = [tok.bos_id, *words, tok.vocab_size + 5, tok.pad_id, tok.eos_id, words[0]]
    ids = strip_special(torch.tensor(hyp), tok)
    assert ids == [*words, tok.unk_id]
    assert tok.decode(ids).startswith("a small test")  # decodes; the unknown id shows as unk


def test_source_batch_appends_eos_and_masks_padding():
    ids, mask = source_batch([[5, 6, 7], [8]], eos_id=3, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
