"""Every collective the package issues on values it made itself goes through meo_ds.distributed.

NCCL accepts only device tensors, so a host tensor reduced anywhere else would stop the first
GPU run; on CPU ranks (gloo) nothing would show it. Two checks:

- a 2-rank trainer run (ep=2 capacity MoE, ZeRO-0 fp32 so the exact grad-norm path runs,
  evaluation, routing loads at every log interval) with every torch.distributed collective
  audited (tests/workers/collective_audit.py): meo_ds may issue collectives only from the seam,
  on its communication device, or as dispatch's all-to-all of model tensors; and the seam must
  have carried each kind of value the trainer reduces;
- a scan of meo_ds/ source for collective calls outside those two places (catches code the run
  does not reach).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Sequence

from tests.distributed import run_ranks
from train_helpers import CPU_DS_ZERO0, write_config

REPO = Path(__file__).resolve().parents[1]
AUDIT_SCRIPT = REPO / "tests" / "workers" / "collective_audit.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "all_gather_object",
               "broadcast_object_list", "gather_object", "scatter_object_list", "all_reduce_coalesced",
               "inference_all_reduce", "send", "recv", "isend", "irecv"}
# (file, function) allowed to call a collective directly.
ALLOWED = {("distributed.py", "all_reduce"), ("distributed.py", "all_gather_objects"), ("moe/dispatch.py", "_all_to_all")}


def test_trainer_collectives_all_go_through_the_seam_on_its_device(tmp_path):
    from meo_ds.data.demo import build_demo

    data = build_demo("lm", tmp_path / "data", max_chars=100_000, vocab_size=500)
    out = tmp_path / "run"
    out.mkdir()
    config = write_config(out / "run.yaml", {
        "task": "lm", "name": "audit",
        "model": {"preset": "tiny", "vocab_size": 500,
                  "moe": {"num_experts": 4, "top_k": 2, "kind": "topk", "dispatch": "capacity"}},
        "parallel": {"ep_size": 2},
        "data": {"path": str(data), "seq_len": 16},
        "train": {"steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 3},
        "checkpoint": {"interval": 0, "save_at_end": False},
        "logging": {"out_dir": str(out), "interval": 2},
        "eval": {"interval": 2, "max_batches": 1, "at_end": False},
    })
    run_ranks(AUDIT_SCRIPT, 2, ["--deepspeed_config", CPU_DS_ZERO0, str(config)], timeout=300)
    check_audit(out, 2, ["train_step", "_grad_norm_before_step", "_global_routing_loads", "validation_loss",
                         "all_reduce_max_int"])


def check_audit(out: Path, ranks: int, needed: Sequence[str]) -> None:
    """Every rank's audit of the run in `out` (tests/workers/collective_audit.py) is clean, and the
    seam carried a collective from each function in `needed`."""
    for rank in range(ranks):
        audit = json.loads((out / f"collective_audit.rank{rank}.json").read_text())
        assert audit["violations"] == [], "\n".join(audit["violations"])
        callers = {key.split("->")[0] for key in audit["seam_callers"]}
        for name in needed:
            assert name in callers, f"rank {rank}: no collective from {name} reached the seam: {audit['seam_callers']}"


COMM_MODULES = {"torch.distributed", "deepspeed.comm"}


def _comm_names(tree: ast.AST) -> tuple[set, set]:
    """Names bound to torch.distributed / deepspeed.comm, and collectives imported from them."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in COMM_MODULES and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COMM_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in COMM_MODULES and a.name in COLLECTIVES:
                    functions.add(a.asname or a.name)
    return modules, functions


def _is_collective(call: ast.Call, modules: set, functions: set) -> bool:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id in functions
    if not (isinstance(f, ast.Attribute) and f.attr in COLLECTIVES):
        return False
    return (isinstance(f.value, ast.Name) and f.value.id in modules) or ast.unparse(f.value) in COMM_MODULES


def collective_calls_outside_the_seam(root: Path) -> list[str]:
    """file:line of each torch.distributed / deepspeed.comm collective called in `root` outside ALLOWED."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        modules, functions = _comm_names(tree)
        owner = {}
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    owner.setdefault(id(node), func.name) if node is not func else None
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_collective(node, modules, functions):
                name = owner.get(id(node), "<module>")
                if (rel, name) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno} {name}() calls {ast.unparse(node.func)}")
    return sorted(found)


def test_no_collective_call_in_the_package_outside_the_seam():
    assert collective_calls_outside_the_seam(REPO / "meo_ds") == []


def test_the_scan_finds_a_collective_call(tmp_path):
    (tmp_path / "mod.py").write_text("import torch.distributed as dist\n\ndef f(t):\n    dist.all_reduce(t)\n")
    (tmp_path / "other.py").write_text("import torch\nfrom deepspeed import comm\nfrom torch.distributed import broadcast\n"
                                       "x = torch.distributed.all_gather(a, b)\n\ndef g(t):\n    comm.all_reduce(t)\n"
                                       "    broadcast(t, 0)\n    ours.all_reduce(t)\n")
    assert collective_calls_outside_the_seam(tmp_path) == [
        "mod.py:4 f() calls dist.all_reduce", "other.py:4 <module>() calls torch.distributed.all_gather",
        "other.py:7 g() calls comm.all_reduce", "other.py:8 g() calls broadcast"]
