"""Consolidation of real DeepSpeed MoE checkpoints written by 2 CPU ranks (ep=2 and ep=1)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from meo_ds.export.consolidate import CheckpointError, consolidate
from tests.distributed import run_ranks

WORKER = Path(__file__).with_name("ds_moe_worker.py")
RUNS = {"ep2_zero2_bf16": (2, "bf16", 2), "ep1_zero0_fp32": (0, "fp32", 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds_moe")
    specs = [f"{name}:{stage}:{prec}:{ep}" for name, (stage, prec, ep) in RUNS.items()]
    run_ranks(WORKER, 2, [str(out), *specs], timeout=240)
    return out


def _live(run_dir: Path) -> dict[str, torch.Tensor]:
    """Union of what the two ranks held; shared (non-expert or replicated) tensors must agree."""
    merged: dict[str, torch.Tensor] = {}
    for rank in range(2):
        for key, value in torch.load(run_dir / f"live_rank{rank}.pt").items():
            if key in merged:
                assert torch.equal(merged[key], value), f"ranks disagree on {key}"
            merged[key] = value
    return merged


@pytest.mark.parametrize("name", sorted(RUNS))
def test_consolidated_equals_live_parameters(runs: Path, name: str) -> None:
    got = consolidate(runs / name / "ckpt")
    want = _live(runs / name)
    assert got.tag == "global_step3" and got.num_experts == [4, 4]
    assert got.metadata["note"] == "tiny" and got.global_steps == 3
    assert sorted(got.state_dict) == sorted(want)
    for key, value in want.items():
        assert got.state_dict[key].dtype == value.dtype, key
        assert torch.equal(got.state_dict[key], value), key
    expected_dtype = torch.bfloat16 if RUNS[name][1] == "bf16" else torch.float32
    assert got.state_dict["embed.weight"].dtype == expected_dtype


def _copy(runs: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(runs / "ep2_zero2_bf16" / "ckpt", dst)
    return dst


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        consolidate(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint directory"):
        consolidate(tmp_path)


def test_no_latest_names_the_tags(runs: Path, tmp_path: Path) -> None:
    ckpt = _copy(runs, tmp_path)
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no 'latest' file.*global_step3"):
        consolidate(ckpt)
    assert consolidate(ckpt, tag="global_step3").num_experts == [4, 4]


def test_tag_directory_given(runs: Path) -> None:
    with pytest.raises(CheckpointError, match="tag directory.*--tag global_step3"):
        consolidate(runs / "ep2_zero2_bf16" / "ckpt" / "global_step3")


def test_unknown_tag(runs: Path) -> None:
    with pytest.raises(CheckpointError, match="tag 'step9'.*global_step3"):
        consolidate(runs / "ep2_zero2_bf16" / "ckpt", tag="step9")


def test_missing_expert_file(runs: Path, tmp_path: Path) -> None:
    ckpt = _copy(runs, tmp_path)
    (ckpt / "global_step3" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing expert file .*layer_1_expert_2.*4 experts"):
        consolidate(ckpt)


def test_missing_main_file_and_zero3(runs: Path, tmp_path: Path) -> None:
    ckpt = _copy(runs, tmp_path)
    main = ckpt / "global_step3" / "mp_rank_00_model_states.pt"
    main.unlink()
    with pytest.raises(CheckpointError, match="has no mp_rank_00_model_states.pt"):
        consolidate(ckpt)
    (ckpt / "global_step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")  # now a ZeRO-3 tag
    with pytest.raises(CheckpointError, match=r"cannot read .*zero_pp_rank_0_mp_rank_00_model_states.pt .*damaged"):
        consolidate(ckpt)
    for optim in (ckpt / "global_step3").glob("*zero_pp_rank_*_optim_states.pt"):
        optim.unlink()
    with pytest.raises(CheckpointError, match=r"is a ZeRO-3 checkpoint of 1 rank\(s\) missing \['zero_pp_rank_0_mp_rank_00_optim"):
        consolidate(ckpt)


def test_corrupt_file(runs: Path, tmp_path: Path) -> None:
    ckpt = _copy(runs, tmp_path)
    (ckpt / "global_step3" / "layer_0_expert_0_mp_rank_00_model_states.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .*layer_0_expert_0"):
        consolidate(ckpt)


def test_interrupted_trainer_save(runs: Path, tmp_path: Path) -> None:
    ckpt = _copy(runs, tmp_path)
    (ckpt / "global_step3" / "trainer_state_rank00000.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        consolidate(ckpt)
    (ckpt / "global_step3" / "COMPLETE").write_text("{}")
    assert consolidate(ckpt).num_experts == [4, 4]
