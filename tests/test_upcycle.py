"""meo-upcycle: a dense HF Llama / Mistral / Qwen2 -> a meo_ds MoE run.

Random transformers models (no download) are upcycled for every kind; our model loaded from the
written checkpoint must give the dense model's logits (fp32 rounding), and so must the MoE model
exported back to HF. One 2-rank launch (ep 2) starts from an upcycled checkpoint through the
run config meo-upcycle wrote, on a corpus prepared with the tokenizer it copied: the weights it
starts from are the upcycled ones, the loss falls, and the trained model exports as native Mixtral.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from meo_ds.export import consolidate, load_model
from meo_ds.export.cli import main as export_main
from meo_ds.upcycle import main as upcycle_main
from meo_ds.upcycle import upcycle

FAMILIES = ("llama", "mistral", "qwen2")
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1)
START_TOL = 1e-5  # fp32 rounding of the k-term / E-term sums at these sizes (logits up to ~10)


def hf_classes(family: str) -> tuple[type, type]:
    import transformers

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def make_hf(path: Path, family: str, seed: int = 0, tokenizer: Path | None = None, shard: str = "5GB",
            dtype: torch.dtype = torch.float32, **over) -> torch.nn.Module:
    """A random dense model of `family` saved at `path` in `dtype` and shards of at most `shard`
    (Qwen2: random q/k/v biases, tied embeddings)."""
    config_cls, model_cls = hf_classes(family)
    extra = {"mistral": {"sliding_window": None}, "qwen2": {"tie_word_embeddings": True}}.get(family, {})
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SHAPE, **extra, **over})).eval()
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(p, std=0.5)
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / "tokenizer.model")
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict:
    """family -> (HF dir, input ids, the dense model's logits)."""
    root = tmp_path_factory.mktemp("dense")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    out = {}
    for family in FAMILIES:
        model = make_hf(root / family, family, shard="40KB" if family == "mistral" else "5GB")
        with torch.no_grad():
            out[family] = (root / family, ids, model(ids).logits)
    return out


def start_difference(out: Path, ids: torch.Tensor, ref: torch.Tensor) -> float:
    ours, _ = load_model(out / "checkpoints")
    with torch.no_grad():
        return (ours(ids).logits - ref).abs().max().item()


KINDS = {"topk": {}, "meo": {}, "xmoe": {"experts": 8, "granularity": 4}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_upcycled_model_starts_with_the_dense_logits(dense, family, kind, tmp_path):
    hf_dir, ids, ref = dense[family]
    record = upcycle(hf_dir, tmp_path / "out", kind, **KINDS[kind])
    assert record["exact_start"] and record["architecture"].lower().startswith(family)
    diff = start_difference(tmp_path / "out", ids, ref)
    print(f"{family} {kind}: max |logit diff| {diff:.2e} (logits up to {ref.abs().max():.2f})")
    assert diff < START_TOL
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero logits


def test_reads_shards_and_keeps_the_dtype(dense, tmp_path):
    assert (dense["mistral"][0] / "model.safetensors.index.json").is_file()  # the starts above read shards
    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.bfloat16)
    record = upcycle(tmp_path / "hf", tmp_path / "out", "xmoe", experts=4, granularity=2)
    state = consolidate(tmp_path / "out" / "checkpoints").state_dict
    assert record["dtype"] == "bfloat16" and {v.dtype for v in state.values()} == {torch.bfloat16}
    dense_w2 = hf.model.layers[1].mlp.down_proj.weight
    piece = state["layers.1.moe.deepspeed_moe.experts.deepspeed_experts.3.w2.weight"]  # copy 1, piece 1
    assert torch.equal(piece, dense_w2[:, 64:] * 2)  # x G, exact in bf16


def test_xmoe_start_is_exact_only_when_every_piece_is_selected(dense, tmp_path):
    """E = 16 pieces at threshold 0.9: a zero router selects 15 of 16 (not exact, measured); at 1.0 all 16."""
    hf_dir, ids, ref = dense["llama"]
    dropped = upcycle(hf_dir, tmp_path / "t09", "xmoe", experts=16)
    exact = upcycle(hf_dir, tmp_path / "t10", "xmoe", experts=16, threshold=1.0)
    assert not dropped["exact_start"] and exact["exact_start"]
    far, near = start_difference(tmp_path / "t09", ids, ref), start_difference(tmp_path / "t10", ids, ref)
    print(f"xmoe E=G=16: threshold 0.9 max |logit diff| {far:.3f}, threshold 1.0 {near:.2e} "
          f"(logits up to {ref.abs().max():.2f})")
    assert near < START_TOL < 1e-3 < far


def test_noise_perturbs_the_experts_reproducibly(dense, tmp_path):
    hf_dir, ids, ref = dense["llama"]
    a = upcycle(hf_dir, tmp_path / "a", "topk", experts=4, noise=0.01, seed=3)
    upcycle(hf_dir, tmp_path / "b", "topk", experts=4, noise=0.01, seed=3)
    assert not a["exact_start"]
    sa, sb = (consolidate(tmp_path / n / "checkpoints").state_dict for n in "ab")
    w = [sa[f"layers.0.moe.deepspeed_moe.experts.deepspeed_experts.{e}.w1.weight"] for e in range(2)]
    assert not torch.equal(w[0], w[1]) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert 0 < start_difference(tmp_path / "a", ids, ref) < 0.5


@pytest.mark.parametrize("family, target, arch", [("llama", "mixtral", "MixtralForCausalLM"),
                                                  ("qwen2", "meo", "MeoForCausalLM")])
def test_exported_moe_gives_the_dense_hf_logits(dense, family, target, arch, tmp_path):
    """Dense HF -> upcycle (top-k) -> meo-export -> HF MoE: the original model's logits. Qwen2's q/k/v
    biases have no native MoE equivalent here, so it exports with remote code."""
    from transformers import AutoModelForCausalLM

    hf_dir, ids, ref = dense[family]
    upcycle(hf_dir, tmp_path / "up", "topk", experts=4)
    assert export_main([str(tmp_path / "up" / "checkpoints"), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [arch]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max().item() < START_TOL


# --------------------------------------------------------------------------- refusals
def write_config(path: Path, family: str, **over) -> Path:
    config_cls, _ = hf_classes(family)
    path.mkdir(parents=True)
    tree = config_cls(**SHAPE).to_dict()
    tree.update(over)
    (path / "config.json").write_text(json.dumps(tree))
    return path


@pytest.mark.parametrize("family, over, args, named", [
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, [], "rope_type='linear'"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, [], "rope_scaling"),
    ("mistral", {"sliding_window": 16}, [], "--max-seq-len 16"),
    ("llama", {"attention_bias": True}, [], "attention_bias"),
    ("llama", {"mlp_bias": True}, [], "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, [], "hidden_act"),
    ("llama", {"head_dim": 32}, [], "head_dim=32"),
    ("llama", {"model_type": "gpt2"}, [], "model_type='gpt2'"),
    ("llama", {}, ["--granularity", "3"], "--granularity 3"),
    ("llama", {}, ["--top-k", "2"], "--top-k is for"),
    ("llama", {}, ["--moe-layers", "0,5"], "--moe-layers"),
    ("llama", {}, [], "pickled weights"),
])
def test_refuses_what_it_cannot_express_before_writing(family, over, args, named, tmp_path, capsys):
    hf_dir = write_config(tmp_path / "hf", family, **over)
    (hf_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    kind = "xmoe" if "--granularity" in args or "--top-k" in args else "topk"
    assert upcycle_main([str(hf_dir), str(tmp_path / "out"), "--kind", kind, *args]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_sliding_window_is_accepted_when_the_sequence_fits(tmp_path):
    hf_dir = tmp_path / "hf"
    make_hf(hf_dir, "mistral", sliding_window=16)
    assert upcycle_main([str(hf_dir), str(tmp_path / "out"), "--kind", "meo", "--max-seq-len", "16"]) == 0
    tree = consolidate(tmp_path / "out" / "checkpoints").metadata["config"]
    assert tree["model"]["max_seq_len"] == 16 and tree["model"]["moe"]["kind"] == "meo"


# --------------------------------------------------------------------------- train (2 ranks, ep 2) and export
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from meo_ds.data.cli import main as prepare_main
    from meo_ds.data.demo import build_demo
    from tests.train_helpers import CPU_DS, metrics, train

    root = tmp_path_factory.mktemp("upcycle_train")
    demo = build_demo("lm", root / "demo", max_chars=150_000, vocab_size=1000)
    make_hf(root / "hf", "llama", vocab_size=1000, tokenizer=demo.parent / "tokenizer" / "tokenizer.model")
    up = root / "up"
    assert upcycle_main([str(root / "hf"), str(up), "--kind", "topk", "--experts", "4"]) == 0
    corpus = sorted((demo.parent / "corpus").iterdir())
    assert prepare_main(["lm", *map(str, corpus), "--tokenizer", str(up / "tokenizer"), "--out", str(root / "data"),
                         "--valid-fraction", "0.1", "--no-progress"]) == 0
    overrides = [f"data.path={root / 'data'}", "data.seq_len=32", "parallel.ep_size=2", "train.steps=12",
                 "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "logging.interval=4",
                 "checkpoint.save_initial=true", "checkpoint.keep_last=2", "eval.max_batches=1"]
    train(up / "config.yaml", ds_config=CPU_DS, overrides=overrides)
    return {"up": up, "run": up / "run", "loss": {m["step"]: m["loss"] for m in metrics(up / "run") if "loss" in m}}


def test_training_at_ep2_starts_from_the_upcycled_weights_and_learns(trained):
    start = consolidate(trained["up"] / "checkpoints").state_dict
    loaded = consolidate(trained["run"] / "checkpoints", tag="step_00000000").state_dict
    assert start.keys() == loaded.keys()
    changed = [k for k in start if not torch.equal(start[k], loaded[k])]
    assert not changed, f"the ep-2 run did not start from the upcycled weights: {changed[:4]}"
    loss = trained["loss"]
    steps = sorted(loss)
    first, last = sum(loss[s] for s in steps[:3]) / 3, sum(loss[s] for s in steps[-3:]) / 3
    print(f"upcycled top-k, ep 2: loss {first:.3f} (first 3 steps) -> {last:.3f} (last 3)")
    assert len(steps) >= 8 and last < first - 0.3


def test_trained_upcycled_model_exports_as_native_mixtral(trained, tmp_path):
    from transformers import MixtralForCausalLM

    ckpt = trained["run"] / "checkpoints"
    assert export_main([str(ckpt), str(tmp_path / "hf")]) == 0
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_model(ckpt)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tokenizer.json sources
def test_tokenizer_json_source_prepares_a_corpus_and_exports_its_tokenizer(tmp_path, capsys):
    """A Qwen2 source with only tokenizer.json (eos, no bos, no pad): OUT/tokenizer feeds meo-prepare lm,
    the manifest records the kind and ids, and meo-export ships a tokenizer AutoTokenizer loads and
    that encodes as the source's, with the ids in the model's config."""
    from transformers import AutoTokenizer

    from meo_ds.data.cli import main as prepare_main
    from tests.data.data_helpers import make_docs, make_hf_tokenizer

    docs = make_docs(200, seed=7)
    make_hf(tmp_path / "hf", "qwen2")
    tok = make_hf_tokenizer(tmp_path / "hf", docs, vocab_size=SHAPE["vocab_size"])
    eos = tok.token_to_id("<|endoftext|>")
    up = tmp_path / "up"
    assert upcycle_main([str(tmp_path / "hf"), str(up), "--kind", "topk", "--experts", "4"]) == 0
    assert sorted(p.name for p in (up / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((up / "upcycle.json").read_text())["tokenizer"] == "tokenizer/tokenizer.json"
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n")
    assert prepare_main(["lm", str(tmp_path / "corpus.txt"), "--tokenizer", str(up / "tokenizer"), "--out",
                         str(tmp_path / "data"), "--no-progress"]) == 0
    shipped = json.loads((tmp_path / "data" / "manifest.json").read_text())["tokenizer"]
    assert shipped["kind"] == "hf" and shipped["special_ids"] == {"pad": eos, "unk": None, "bos": None, "eos": eos}
    out = tmp_path / "export"
    assert export_main([str(up / "checkpoints"), str(out), "--tokenizer", str(tmp_path / "data")]) == 0
    auto = AutoTokenizer.from_pretrained(out)
    assert auto(docs[:20])["input_ids"] == [e.ids for e in tok.encode_batch(docs[:20])]
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id) == (eos, eos, None)
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (eos, eos, None)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    assert export_main([str(up / "checkpoints"), str(tmp_path / "x"), "--tokenizer", str(tmp_path / "bad")]) == 2
    assert "not a HuggingFace tokenizer.json" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_upcycle_without_a_tokenizer_says_so(dense, tmp_path, capsys):
    assert upcycle_main([str(dense["llama"][0]), str(tmp_path / "up"), "--kind", "topk", "--experts", "2"]) == 0
    assert "no tokenizer.model or tokenizer.json" in capsys.readouterr().out
    assert not (tmp_path / "up" / "tokenizer").exists()
