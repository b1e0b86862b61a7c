import json

import numpy as np
import pytest
import torch

from meo_ds.data.lm import LMDataset, LMLoader, prepare_lm
from meo_ds.data.tokenizer import Tokenizer

from data_helpers import make_docs


def _write(tmp_path, docs):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(docs) + "\n")
    return src


@pytest.mark.parametrize("num_proc", [1, 2])
def test_round_trip_and_split_sizes(tmp_path, tok_path, num_proc):
    docs = make_docs(203, seed=5)
    out = tmp_path / "out"
    manifest = prepare_lm([_write(tmp_path, docs)], tok_path, out, valid_fraction=0.1, num_proc=num_proc,
                          progress=False)
    tok = Tokenizer(tok_path)
    train, valid = LMDataset(out, "train"), LMDataset(out, "validation")
    assert valid.num_documents == 20 and train.num_documents == 183  # floor(203 * 0.1) held out
    held = [i for i in range(203) if (i + 1) // 10 > i // 10]
    expect_valid = [docs[i] for i in held]
    expect_train = [d for i, d in enumerate(docs) if i not in set(held)]
    for ds, expected in ((train, expect_train), (valid, expect_valid)):
        for i, text in enumerate(expected):
            ids = ds.document(i)
            assert ids[-1] == tok.eos_id
            assert list(ids[:-1]) == tok.encode(text)
            assert tok.decode(ids) == text
    assert manifest["tokens"] == train.num_tokens + valid.num_tokens
    assert manifest["dtype"] == "uint16" and train.tokens.dtype == np.uint16
    assert isinstance(train.tokens, np.memmap)  # nothing is read until a batch slices it
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["sha256"] == manifest["splits"]["train"]["sha256"]


def _epoch_samples(loaders):
    seen = []
    for loader in loaders:
        seen.append([loader.sample_indices(loader.epoch, s).tolist() for s in range(len(loader))])
    return seen


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_covers_each_sample_once_across_ranks(lm_dir, world):
    loaders = [LMLoader(lm_dir, seq_len=16, micro_batch_size=3, dp_rank=r, dp_world_size=world, seed=7)
               for r in range(world)]
    batches = [list(loader) for loader in loaders]
    assert len({len(b) for b in batches}) == 1  # same number of steps on every rank
    rows = [tuple(row.tolist()) for b in batches for batch in b for row in batch["input_ids"]]
    ds, n = loaders[0].dataset, loaders[0].num_samples
    assert len(rows) == n - n % (3 * world)
    starts = sorted(int(i) for per_rank in _epoch_samples(
        [LMLoader(lm_dir, 16, 3, dp_rank=r, dp_world_size=world, seed=7) for r in range(world)])
        for step in per_rank for i in step)
    assert len(set(starts)) == len(starts) == len(rows)
    for batch in batches[0]:
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    first = batches[0][0]
    i = int(loaders[0].order(0)[0])
    assert first["input_ids"][0].tolist() == ds.tokens[i * 16:i * 16 + 16].tolist()
    assert first["labels"][0].tolist() == ds.tokens[i * 16 + 1:i * 16 + 17].tolist()
    assert all(loader.epoch == 1 and loader.step == 0 for loader in loaders)


def test_no_sample_lost_with_batch_of_one(lm_dir):
    n = LMLoader(lm_dir, 16, 1).num_samples
    for world in (1, 2):
        loaders = [LMLoader(lm_dir, 16, 1, dp_rank=r, dp_world_size=world, seed=3) for r in range(world)]
        got = sorted(int(i) for loader in loaders for s in range(len(loader)) for i in loader.sample_indices(0, s))
        assert got == sorted(loaders[0].order(0)[:n - n % world].tolist())
        assert len(got) == len(set(got)) == n - n % world


def test_determinism_and_epochs_differ(lm_dir):
    a, b = (LMLoader(lm_dir, 16, 4, seed=11) for _ in range(2))
    first_a, first_b = list(a), list(b)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first_a, first_b))
    second = list(a)
    assert not torch.equal(first_a[0]["input_ids"], second[0]["input_ids"])
    other_seed = list(LMLoader(lm_dir, 16, 4, seed=12))
    assert not torch.equal(first_a[0]["input_ids"], other_seed[0]["input_ids"])


@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume_mid_epoch_and_across_epochs(lm_dir, world):
    def make(r):
        return LMLoader(lm_dir, 16, 2, dp_rank=r, dp_world_size=world, seed=5)

    for r in range(world):
        ref = make(r)
        stream = ref.forever()
        expected = [next(stream)["input_ids"] for _ in range(len(ref) + 5)]
        for cut in (0, 3, len(ref) - 1, len(ref) + 2):
            first = make(r)
            it = first.forever()
            for _ in range(cut):
                next(it)
            state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
            resumed = make(r)
            resumed.load_state_dict(state)
            rest = resumed.forever()
            for k in range(cut, len(expected)):
                assert torch.equal(next(rest)["input_ids"], expected[k]), (r, cut, k)


def test_resume_at_another_world_size_keeps_global_stream(lm_dir):
    one = LMLoader(lm_dir, 16, 4, seed=9)
    it = iter(one)
    for _ in range(3):
        next(it)
    state = one.state_dict()
    two = [LMLoader(lm_dir, 16, 2, dp_rank=r, dp_world_size=2, seed=9) for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([next(iter(l))["input_ids"] for l in two]), next(it)["input_ids"])
    odd = LMLoader(lm_dir, 16, 5, seed=9)
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        odd.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        LMLoader(lm_dir, 16, 4, seed=10).load_state_dict(state)


def test_document_boundaries_reset_positions(lm_dir):
    loader = LMLoader(lm_dir, 32, 4, seed=0, reset_at_doc_boundaries=True)
    ds, eos = loader.dataset, loader.dataset.tokenizer().eos_id
    for batch in list(loader)[:10]:
        ids, pos, seg = batch["input_ids"], batch["position_ids"], batch["segment_ids"]
        assert (seg[:, 0] == 0).all()
        follows_eos = torch.zeros_like(ids, dtype=torch.bool)
        follows_eos[:, 1:] = ids[:, :-1] == eos
        assert torch.equal(pos[:, 1:] == 0, follows_eos[:, 1:])
        assert torch.equal(seg[:, 1:] - seg[:, :-1], follows_eos[:, 1:].long())
        assert ((pos[:, 1:] == pos[:, :-1] + 1) | follows_eos[:, 1:]).all()


def test_too_small_corpus_is_a_clear_error(lm_dir):
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        LMLoader(lm_dir, 16, 10_000)
