"""One trained checkpoint for the fault tests, and the faults they inject into copies of it.

`trained_run` trains once per test session (2 CPU ranks, top-k MoE with ep 2, ZeRO-2, 8 steps,
checkpoints at steps 3, 6 and 8, evaluation at 3, 6 and 8) and every fault test copies its run
directory (`copy_run`) before damaging it, so the launch cost is paid once for
tests/test_faults_checkpoint.py and tests/export/test_export_safety.py together.

Faults, as the adversarial test of issue 12 injected them:
- `plant_payload`: a pickle whose __reduce__ creates a marker file, added to a checkpoint file;
  the checksum in COMPLETE is updated too, as an attacker who can write the files would do, so
  only safe unpickling stands between the payload and the loader.
- `flip_tensor_bytes`: bytes inside a tensor's data record set to 0x7f7fffff (3.4e38 as fp32);
  torch itself reads the file without complaint.
- `zero_tensor_block`: a block of a tensor's data record zeroed.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import torch
import yaml

from meo_ds import checkpoint as ckpt
from train_helpers import CPU_DS, train, write_config

STEPS = 8
TAGS = [ckpt.tag_for(s) for s in (3, 6, 8)]
MAIN = "mp_rank_00_model_states.pt"
EXPERT = "layer_1_expert_3_mp_rank_00_model_states.pt"  # held by rank 1 under ep 2


def run_tree(out: Path, data: Path, steps: int = STEPS) -> dict:
    return {
        "task": "lm", "name": "faults",
        "model": {"preset": "tiny", "vocab_size": 1000, "moe": {"num_experts": 4, "top_k": 2, "kind": "topk"}},
        "parallel": {"ep_size": 2},
        "data": {"path": str(data), "seq_len": 32},
        "train": {"steps": steps, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "seed": 5},
        "checkpoint": {"interval": 3, "keep_last": 3},
        "logging": {"out_dir": str(out), "interval": 2},
        "eval": {"interval": 3, "max_batches": 1},
    }


def trained_run(tmp_path_factory) -> Path:
    """The run directory (run.yaml, metrics.jsonl, eval.jsonl, checkpoints/), trained once a session."""
    root = tmp_path_factory.getbasetemp() / "trained_checkpoint"
    run = root / "run"
    if (root / "done").is_file():
        return run
    from meo_ds.data.demo import build_demo

    data = build_demo("lm", root / "demo", max_chars=200_000, vocab_size=1000)
    run.mkdir(parents=True)
    train(write_config(run / "run.yaml", run_tree(run, data)), ds_config=CPU_DS)
    (root / "done").write_text("")
    return run


def copy_run(run: Path, dst: Path, steps: int = STEPS) -> Path:
    """A copy of the run directory whose run.yaml writes into the copy; returns the copy."""
    shutil.copytree(run, dst)
    tree = yaml.safe_load((run / "run.yaml").read_text())
    write_config(dst / "run.yaml", run_tree(dst, Path(tree["data"]["path"]), steps))
    return dst


class Payload:
    """Unpickling this creates `marker` (what a real attack would do instead is up to the attacker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(path: Path, marker: Path) -> None:
    """Add a Payload to a checkpoint file (a dict) and record the new checksum in COMPLETE."""
    state = ckpt.safe_load(path)
    state["extra"] = Payload(marker)
    torch.save(state, path)
    _rerecord(path)


def _rerecord(path: Path) -> None:
    marker_path = path.parent / ckpt.COMPLETE
    marker = json.loads(marker_path.read_text())
    marker["files"][path.name] = ckpt.file_digest(path)
    marker_path.write_text(json.dumps(marker))


def _data_records(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every tensor storage record in a torch zip checkpoint, largest first."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64]
    out = []
    with open(path, "rb") as f:
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            out.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return sorted(out, key=lambda r: -r[1])


def flip_tensor_bytes(path: Path) -> None:
    offset, size = _data_records(path)[0]
    with open(path, "r+b") as f:
        f.seek(offset + (size // 2) // 4 * 4)
        f.write(bytes.fromhex("ffff7f7f"))


def zero_tensor_block(path: Path, block: int = 4096) -> None:
    offset, size = _data_records(path)[0]
    with open(path, "r+b") as f:
        f.seek(offset + size // 4)
        f.write(bytes(min(block, size // 2)))


def tree_digest(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` (to show nothing was touched)."""
    return {str(p.relative_to(directory)): ckpt.file_digest(p)["sha256"]
            for p in sorted(directory.rglob("*")) if p.is_file()}
