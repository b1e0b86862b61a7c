"""Rank worker: a tiny model with deepspeed.moe.layer.MoE layers (ep=2), a few optimizer steps,
then `save_checkpoint`. Each rank also writes its live parameters (expert ids made global) so
the test can check the consolidated checkpoint against what the ranks really held.

argv: OUT_DIR RUN [RUN ...], each RUN = NAME:ZERO_STAGE:PRECISION(fp32|bf16):EP_SIZE; run NAME
writes OUT_DIR/NAME/ckpt and OUT_DIR/NAME/live_rank{r}.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from meo_ds.distributed import init_distributed
from meo_ds.export.consolidate import local_to_global


class Expert(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.w1 = nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)
        self.w3 = nn.Linear(d, h, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class Tiny(nn.Module):
    def __init__(self, ep: int, d: int = 16, experts: int = 4):
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.moe = nn.ModuleList(
            MoE(d, Expert(d, 24), num_experts=experts, ep_size=ep, k=2, use_residual=False, min_capacity=64)
            for _ in range(2)
        )
        self.dense = nn.Linear(d, d)
        self.head = nn.Linear(d, 32, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        aux = 0.0
        for layer in self.moe:
            out, loss, _ = layer(h)
            h, aux = h + out, aux + loss
        return self.head(torch.tanh(self.dense(h))), aux


def run(out: Path, stage: int, precision: str, ep: int) -> None:
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = Tiny(ep)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        ids = torch.randint(0, 32, (4, 8), generator=g)
        logits, aux = engine(ids)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten()) + aux
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out / "ckpt"), client_state={"note": "tiny"})
    ep_rank = rank % ep
    local = model.moe[0].num_local_experts
    live = {local_to_global(k, ep_rank * local): v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(live, out / f"live_rank{rank}.pt")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_distributed()
    for spec in args[1:]:
        name, stage, precision, ep = spec.split(":")
        run(Path(args[0]) / name, int(stage), precision, int(ep))


if __name__ == "__main__":
    main()
