import json

import numpy as np
import pytest
import torch

from meo_ds.data.demo import synthetic_pairs
from meo_ds.data.io import StreamMismatch
from meo_ds.data.mt import MTDataset, MTLoader, prepare_mt
from meo_ds.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pairs():
    return list(synthetic_pairs(1500, seed=3))


@pytest.fixture(scope="module")
def mt_dir(tmp_path_factory, tok_path, pairs):
    d = tmp_path_factory.mktemp("mt")
    (d / "src.txt").write_text("\n".join(s for s, _ in pairs) + "\n")
    (d / "tgt.txt").write_text("\n".join(t for _, t in pairs) + "\n")
    prepare_mt([d / "src.txt", d / "tgt.txt"], tok_path, d / "out", valid_fraction=0.1, test_fraction=0.05,
               max_len=0, max_ratio=0, dedup=False, progress=False)
    return d / "out"


def test_round_trip_and_split_sizes(mt_dir, tok_path, pairs):
    tok = Tokenizer(tok_path)
    sizes = {s: len(MTDataset(mt_dir, s)) for s in ("train", "validation", "test")}
    held = 1500 * 15 // 100
    assert sizes == {"train": 1500 - held, "validation": held - held // 3, "test": held // 3}
    flat = {split: MTDataset(mt_dir, split) for split in sizes}
    got = sorted((tok.decode(ds.pair(i)[0]), tok.decode(ds.pair(i)[1])) for ds in flat.values() for i in range(len(ds)))
    assert got == sorted(pairs)
    src, tgt = flat["train"].pair(0)
    assert list(src) == tok.encode(pairs[0][0]) and list(tgt) == tok.encode(pairs[0][1])


@pytest.mark.parametrize("num_proc", [1, 2])
def test_filters_report_counts(tmp_path, tok_path, num_proc):
    rows = [("the cat sees a dog .", "a b c ."), ("", "x"), ("y", "  "), ("the cat sees a dog .", "a b c ."),
            ("the " * 60, "short ."), ("the gate", "the model routes every token to an expert while the gate learns a balanced load")]
    rows += [(f"line {i} of the corpus", f"zeile {i} des korpus") for i in range(20)]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in rows))
    m = prepare_mt([path], tok_path, tmp_path / "out", max_len=50, max_ratio=3.0, valid_fraction=0,
                   test_fraction=0, num_proc=num_proc, progress=False)
    assert m["pairs"]["removed"] == {"empty": 2, "duplicate": 1, "max_length": 1, "length_ratio": 1}
    assert m["pairs"]["read"] == len(rows) and m["pairs"]["kept"] == 21
    ds, tok = MTDataset(tmp_path / "out"), Tokenizer(tok_path)
    assert len(ds) == 21
    assert tok.decode(ds.pair(20)[0]) == "line 19 of the corpus" and tok.decode(ds.pair(20)[1]) == "zeile 19 des korpus"


def test_jsonl_input(tmp_path, tok_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"de": f"satz {i}", "en": f"sentence {i}"}) + "\n" for i in range(30)))
    m = prepare_mt([path], tok_path, tmp_path / "out", source_field="de", target_field="en", valid_fraction=0,
                   test_fraction=0, progress=False)
    assert m["pairs"]["kept"] == 30


def _served(loaders):
    return [[tuple(loader.pair_indices(0, s).tolist()) for s in range(len(loader))] for loader in loaders]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_budget_and_cover_epoch(mt_dir, world):
    loaders = [MTLoader(mt_dir, max_tokens=300, dp_rank=r, dp_world_size=world, seed=4) for r in range(world)]
    assert len({len(loader) for loader in loaders}) == 1
    served = [i for per in _served(loaders) for batch in per for i in batch]
    assert len(served) == len(set(served))
    all_batches = loaders[0].batches(0)
    skipped = [i for b in all_batches[len(loaders[0]) * world:] for i in b.tolist()]
    assert len(all_batches) - len(loaders[0]) * world < world
    assert sorted(served + skipped) == list(range(len(loaders[0].cost)))
    for batch in list(loaders[-1]):
        b = batch["src_ids"].shape[0]
        assert b * max(batch["src_ids"].shape[1], batch["labels"].shape[1]) <= 300


def test_batch_layout(mt_dir):
    loader = MTLoader(mt_dir, max_tokens=400, seed=0)
    tok, ds = loader.tokenizer, loader.dataset
    batch = next(iter(loader))
    for row, i in enumerate(batch["index"].tolist()):
        src, tgt = ds.pair(i)
        n, m = len(src), len(tgt)
        assert batch["src_ids"][row, :n + 1].tolist() == list(src) + [tok.eos_id]
        assert (batch["src_ids"][row, n + 1:] == tok.pad_id).all()
        assert batch["src_mask"][row].sum() == n + 1
        assert batch["decoder_input_ids"][row, :m + 1].tolist() == [tok.bos_id] + list(tgt)
        assert batch["labels"][row, :m + 1].tolist() == list(tgt) + [tok.eos_id]
        assert (batch["labels"][row, m + 1:] == -100).all()
        assert (batch["decoder_input_ids"][row, m + 1:] == tok.pad_id).all()
        assert batch["tgt_mask"][row].sum() == m + 1
    lengths = np.maximum(ds.src_lens, ds.tgt_lens)[batch["index"].numpy()]
    assert lengths.max() - lengths.min() <= 2  # length bucketing keeps padding small


def test_determinism_and_reshuffle(mt_dir):
    a, b = MTLoader(mt_dir, 300, seed=1), MTLoader(mt_dir, 300, seed=1)
    assert [x.tolist() for x in a.batches(0)] == [x.tolist() for x in b.batches(0)]
    assert [x.tolist() for x in a.batches(0)] != [x.tolist() for x in a.batches(1)]
    assert len(a.batches(0)) == len(a.batches(1))


@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume(mt_dir, world):
    for r in range(world):
        def make():
            return MTLoader(mt_dir, 300, dp_rank=r, dp_world_size=world, seed=8)

        ref = make()
        stream = ref.forever()
        expected = [next(stream)["index"] for _ in range(len(ref) + 4)]
        for cut in (1, len(ref) - 1, len(ref), len(ref) + 2):
            first = make()
            it = first.forever()
            for _ in range(cut):
                next(it)
            resumed = make()
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
            rest = resumed.forever()
            assert all(torch.equal(next(rest)["index"], expected[k]) for k in range(cut, len(expected)))


def test_resume_at_another_world_size_keeps_global_stream(mt_dir):
    """State counts global batches: 2 ranks at step 3 are 6 batches in, which 1 rank continues
    at its step 6 and 4 ranks cannot (6 is not a multiple of 4); another max_tokens is refused."""
    two = [MTLoader(mt_dir, 300, dp_rank=r, dp_world_size=2, seed=8) for r in range(2)]
    for loader in two:
        it = iter(loader)
        for _ in range(3):
            next(it)
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state["batches_consumed"] == 6
    one = MTLoader(mt_dir, 300, seed=8)
    one.load_state_dict(state)
    assert torch.equal(next(iter(one))["index"], torch.from_numpy(one.batches(0)[6]))
    with pytest.raises(ValueError, match="6 global batches consumed is not a multiple of dp_world_size 4"):
        MTLoader(mt_dir, 300, dp_world_size=4, seed=8).load_state_dict(state)
    with pytest.raises(StreamMismatch, match="max_tokens is 300"):
        MTLoader(mt_dir, 400, seed=8).load_state_dict(state)


def test_pair_longer_than_budget_is_an_error(mt_dir):
    with pytest.raises(ValueError, match="raise max_tokens"):
        MTLoader(mt_dir, max_tokens=5)
