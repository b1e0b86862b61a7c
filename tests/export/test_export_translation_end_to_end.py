"""A translation checkpoint trained by meo-train (the mt_tiny preset: top-k MoE in the encoder,
ep=2 on 2 CPU ranks) -> meo-export (remote code) -> transformers in a fresh process without meo_ds:
logits and greedy tokens equal meo_ds's own model loaded from the same checkpoint, beam search
runs, and the tokenizer loads from the export directory and encodes sources as training did."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from meo_ds.export.cli import main as export_main
from meo_ds.export.exporter import load_model
from meo_ds.models.generation import translate
from tests.distributed import run_ranks
from tests.export.export_fresh import run_fresh_check
from tests.export.export_mt import hf_generated

HERE = Path(__file__).resolve().parent
DS = str(HERE.parents[1] / "ds_configs" / "cpu_fp32.json")
PAD, BOS, EOS = 0, 2, 3
MAX_NEW = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    root = tmp_path_factory.mktemp("mt_e2e")
    data = build_demo("mt", root / "demo")
    out = root / "run"
    out.mkdir()
    tree = {
        "task": "translation", "name": "mt-export",
        "model": {"preset": "mt_tiny"},
        "parallel": {"ep_size": 2},
        "data": {"path": str(data), "max_tokens": 512},
        "train": {"steps": 30, "micro_batch_size": 1, "lr": 3e-3, "warmup_steps": 5, "seed": 3},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "logging": {"out_dir": str(out), "interval": 10},
        "eval": {"max_batches": 1, "bleu_sentences": 4, "beam_size": 2, "max_new_tokens": 16},
    }
    (out / "run.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    run_ranks(HERE / "train_many_worker.py", 2, ["--deepspeed_config", DS, str(out / "run.yaml")], timeout=300)
    return root


def _batch(data: Path) -> dict[str, torch.Tensor]:
    """Three validation pairs of different source lengths, as MTLoader lays them out (source + eos,
    right padding; decoder input bos + target)."""
    from meo_ds.data.mt import MTDataset

    ds = MTDataset(data, "validation")
    by_length = sorted(range(50), key=lambda i: int(ds.src_lens[i]))
    pairs = [ds.pair(i) for i in (by_length[0], by_length[25], by_length[-1])]
    srcs = [s.tolist() + [EOS] for s, _ in pairs]
    decs = [[BOS] + t.tolist() for _, t in pairs]

    def pad(rows):
        width = max(map(len, rows))
        return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])

    src = pad(srcs)
    mask = torch.arange(src.shape[1]) < torch.tensor([len(s) for s in srcs])[:, None]
    return {"src_ids": src, "src_mask": mask, "decoder_input_ids": pad(decs)}


def _reference(model: torch.nn.Module, data: Path, path: Path) -> dict:
    from meo_ds.data.tokenizer import Tokenizer

    ref = _batch(data)
    src, mask = ref["src_ids"], ref["src_mask"]
    with torch.no_grad():
        ref["logits"] = model(src, mask, ref["decoder_input_ids"]).logits
    tokens = translate(model, src, mask, bos_id=BOS, eos_id=EOS, max_new_tokens=MAX_NEW)
    ref.update(greedy=hf_generated(tokens, BOS, EOS, PAD, MAX_NEW), max_new_tokens=MAX_NEW)
    tok = Tokenizer(data / "tokenizer.model")
    ref["text"] = tok.decode(src[0][mask[0]].tolist())
    ref["text_ids"] = tok.encode(ref["text"]) + [EOS]
    torch.save(ref, path)
    return ref


def test_export_matches_our_model_in_a_fresh_process(trained: Path, tmp_path: Path) -> None:
    ckpt, out = trained / "run" / "checkpoints", tmp_path / "hf"
    assert export_main([str(ckpt), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MeoForSeq2SeqLM"] and config["is_encoder_decoder"]
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_meo.MeoForSeq2SeqLM"
    assert config["decoder_start_token_id"] == BOS and config["moe_layers"] == {"encoder": [0, 1], "decoder": []}
    assert {"modeling_meo.py", "configuration_meo.py", "moe_functional.py", "models_functional.py", "tokenizer.json",
            "tokenizer.model"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "train/loss" in card and "eval/bleu" in card and "AutoModelForSeq2SeqLM" in card
    assert "encoder layers [0, 1]; decoder layers []" in card and "tok.eos_token" in card

    model, _ = load_model(ckpt)
    ref = _reference(model, trained / "demo" / "shards", tmp_path / "ref.pt")
    run_fresh_check([{"dir": str(out), "task": "translation", "trust_remote_code": True, "ref": str(tmp_path / "ref.pt")}],
                    tmp_path)

    # With meo_ds imported, its registered Auto classes load the export without remote code.
    from transformers import AutoModelForSeq2SeqLM

    hf = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(hf).__module__ == "meo_ds.export.hf_remote.modeling_meo"
    with torch.no_grad():
        logits = hf(input_ids=ref["src_ids"], attention_mask=ref["src_mask"], decoder_input_ids=ref["decoder_input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["mixtral", "llama"])
def test_native_target_is_refused(trained: Path, tmp_path: Path, capsys, target: str) -> None:
    assert export_main([str(trained / "run" / "checkpoints"), str(tmp_path / "out"), "--target", target]) == 2
    err = capsys.readouterr().err
    assert f"a translation model cannot be exported as {target}" in err and "--target meo" in err
    assert not any(tmp_path.iterdir())
