"""Rank worker: an MoE model (LM or translation) with ep=2 matches the single-process (ep=1)
model: loss and gradients. Arguments: KIND [TASK] with TASK 'lm' (default) or 'translation'.

Each rank runs its own micro-batch. Loss and non-expert gradients must equal the ep=1 model on
that rank's batch; each local expert's gradient must equal the ep=1 gradient summed over both
ranks' batches (the all-to-all brings the other rank's tokens to it).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "moe", "workers")))

from common import PREFIX, finish, init_dist, script_args  # noqa: E402

from meo_ds.models import LMConfig, MTConfig, build_model  # noqa: E402
from meo_ds.moe import MoEConfig  # noqa: E402
from meo_ds.parallel import parallelize  # noqa: E402


def make(task: str, kind: str):
    own = {"threshold": 0.6} if kind == "xmoe" else {}  # a field of another kind is an error
    moe = MoEConfig(kind=kind, num_experts=4, top_k=2, dispatch="dropless", **own)
    if task == "lm":
        cfg = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, moe=moe)
    else:
        cfg = MTConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, dropout=0.0, moe=moe,
                       moe_in="both", moe_every=1, moe_offset=0)
    torch.manual_seed(0)
    return build_model(cfg).double()


def batch(task: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    if task == "lm":
        ids = torch.randint(0, 32, (2, 12), generator=g)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    src_mask = torch.arange(9) < torch.tensor([[9], [6]])  # the second source is padded
    return {"src_ids": torch.randint(4, 32, (2, 9), generator=g), "src_mask": src_mask,
            "decoder_input_ids": torch.randint(4, 32, (2, 7), generator=g), "labels": torch.randint(4, 32, (2, 7), generator=g)}


def grads_on(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    args = script_args()
    kind, task = args[0], (args[1] if len(args) > 1 else "lm")
    rank, world = init_dist()
    batches = [batch(task, 10 + r) for r in range(world)]
    ref = make(task, kind)
    ref_runs = [grads_on(ref, b) for b in batches]
    model = make(task, kind)
    model.load_state_dict(ref.state_dict())
    parallelize(model, world)
    local = model.cfg.moe.num_experts // world
    loss, grads = grads_on(model, batches[rank])
    want_loss, want = ref_runs[rank]
    assert torch.allclose(loss, want_loss, atol=1e-10), (kind, rank, loss.item(), want_loss.item())
    checked = 0
    for name, g in grads.items():
        if PREFIX in name:
            head, tail = name.split(PREFIX)
            lid, rest = tail.split(".", 1)
            gname = f"{head}{PREFIX}{int(lid) + rank * local}.{rest}"
            target = sum(run[1][gname] for run in ref_runs)
        else:
            target = want[name]
        assert torch.allclose(g, target, atol=1e-9), (kind, rank, name, (g - target).abs().max().item())
        checked += 1
    print(f"rank {rank} {task} {kind}: loss {loss.item():.6f} and {checked} gradients match ep=1", flush=True)
    finish()


if __name__ == "__main__":
    main()
