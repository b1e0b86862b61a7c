"""`meo-upcycle`: a pretrained dense HuggingFace decoder LM -> a meo_ds MoE run (sparse upcycling).

    meo-upcycle HF_DIR OUT_DIR --kind topk|xmoe|meo [--experts E] [--top-k K] [--threshold T]
                [--granularity G] [--moe-layers 0,1,...|all] [--max-seq-len N] [--noise S] [--seed N]

Input: a local transformers checkpoint of LlamaForCausalLM, MistralForCausalLM or
Qwen2ForCausalLM (config.json + safetensors, sharded or not, any dtype; never a pickle), such as
our own dense models exported by meo-export. Every architecture setting is checked against what
meo_ds's LM expresses (RMSNorm, RoPE without scaling, SwiGLU, GQA, head_dim = hidden/heads,
tied or untied embeddings, q/k/v biases for Qwen2); anything else is refused before any work,
naming the config option.

Output, OUT_DIR (written to a temporary directory first, renamed when complete):

    config.yaml                     run config: the model, checkpoint.init_from, logging.out_dir=OUT_DIR/run
    checkpoints/step_00000000/      a meo-train checkpoint (the DeepSpeed engine's file layout: dense
                                    weights, routers and MEO layers in mp_rank_00_model_states.pt, one
                                    file per (MoE layer, global expert), COMPLETE with checksums)
    checkpoints/latest
    tokenizer/tokenizer.model       when HF_DIR holds a SentencePiece tokenizer.model, else
    tokenizer/tokenizer.json        HF_DIR's HuggingFace tokenizer.json (+ tokenizer_config.json,
                                    special_tokens_map.json): meo-prepare lm --tokenizer OUT_DIR/tokenizer
    upcycle.json                    source, settings, dtype

Why the trainer's own checkpoint format (not a new init path): `checkpoint.init_from` already loads
it with DeepSpeed at any world and expert-parallel size (experts are filed by global id, each ep
rank reads its own), preflight checks its saved model config, meo-export and `load_model` read it,
and nothing in the trainer changed. The files are written on the CPU, one MoE layer at a time, in
the source checkpoint's dtype (the trainer casts to its precision on load). Under ZeRO-3 (MEO only)
the trainer loads this whole-module checkpoint before DeepSpeed partitions the model.

Expert initialisation (every dense FFN of a MoE layer; dense layers, attention, norms and
embeddings are copied as they are):
- topk: each of the E experts is a copy of the dense FFN; the router keeps the library's random
  init (it decides which copies train on which tokens, breaking their symmetry). With
  renormalised top-k gates (the default) the k weights sum to 1, so the layer output is the dense
  FFN's whatever the router says: exact up to fp32 rounding of the k-term sum.
- meo: each linear (w1, w3, w2) holds E copies of the dense linear; the gates stay zero-initialised
  (the paper's). The merged W^ = sum_e g_e W = W since the k gates sum to 1: exact up to rounding.
- xmoe (granular upcycling): the dense FFN's hidden dimension is cut into G pieces of d_ff/G
  (rows of w1 and w3, columns of w2), E/G copies of each piece make the E experts, and every
  piece's w2 is scaled by G. The router starts at zero, so every expert has probability 1/E; a
  token that selects all E experts gets sum_e (1/E) G piece_e(x) = (E/G)(1/E) G FFN(x) = FFN(x).
  All are selected when (E-1)/E < threshold (E <= 10 at the paper's 0.9; `threshold_exact`);
  otherwise a token takes the fewest ceil(threshold E) pieces, and the start is not exact (the
  README and the tests give the measured difference).
- --noise S (default 0): every expert weight is multiplied by (1 + S N(0,1)) (one draw per entry,
  seeded by --seed), a small perturbation that makes the copies differ from the first step; the
  start is then no longer exact.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from meo_ds.export.layout import DS_EXPERTS, llama_key

KINDS = ("topk", "xmoe", "meo")
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


class UpcycleError(ValueError):
    """An input meo-upcycle cannot use; the message names the option or file and the fix."""


# --------------------------------------------------------------------------- reading HF
def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UpcycleError(f"{hf_dir} has no config.json; pass a transformers model directory (save_pretrained)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UpcycleError(f"{path} is not readable JSON ({err})") from None


class SafetensorsReader:
    """Tensors of a (sharded) safetensors checkpoint, opened lazily by name; never a pickle."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self.files = {name: hf_dir / f for name, f in weight_map.items()}
        elif (hf_dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(hf_dir / "model.safetensors", "pt") as f:
                self.files = {name: hf_dir / "model.safetensors" for name in f.keys()}
        else:
            bins = sorted(p.name for p in hf_dir.glob("*.bin"))
            hint = "" if not bins else (
                f" (it holds {', '.join(bins[:3])}: pickled weights, which meo_ds never loads; convert them with "
                f"transformers: from_pretrained(...).save_pretrained(dir, safe_serialization=True))")
            raise UpcycleError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json{hint}")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise UpcycleError(f"{hf_dir}: weight shard(s) {missing[:3]} named by the index are missing")

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


# --------------------------------------------------------------------------- architecture
def _rope(hf: dict) -> tuple[float, Optional[str]]:
    """(rope theta, the scaling type when it is not plain RoPE), from transformers 5's
    rope_parameters or the older rope_theta + rope_scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if not params and scaling and kind == "default":
        kind = "unknown"
    return float(theta), (None if kind == "default" else kind)


def architecture_problems(hf: dict, max_seq_len: int) -> list[str]:
    """What of the HF config meo_ds's LM cannot express, each naming the option ([]: all of it)."""
    family = hf.get("model_type")
    d, heads = hf.get("hidden_size", 0), hf.get("num_attention_heads", 1)
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (our FFN is SwiGLU with silu)")
    if hf.get("head_dim") not in (None, d // max(heads, 1)):
        problems.append(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads={d // max(heads, 1)}")
    _, scaling = _rope(hf)
    if scaling is not None:
        problems.append(f"rope_scaling / rope_parameters.rope_type={scaling!r} (only plain RoPE is supported)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={hf['partial_rotary_factor']} (RoPE rotates the whole head)")
    if family == "llama" and hf.get("attention_bias"):
        problems.append("attention_bias=true (Llama's biases on all four projections, o_proj included)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (our SwiGLU FFN has no biases)")
    window = hf.get("sliding_window")
    uses_window = window is not None and (family == "mistral" or hf.get("use_sliding_window", False))
    if uses_window and window < max_seq_len:
        problems.append(f"sliding_window={window} < the sequence length {max_seq_len} (we attend to the whole "
                        f"sequence; pass --max-seq-len {window} or less)")
    layer_types = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if layer_types and not (family == "qwen2" and not hf.get("use_sliding_window", False)):
        problems.append(f"layer_types {sorted(set(layer_types))} (every layer attends to the full sequence here)")
    if hf.get("quantization_config"):
        problems.append("quantization_config is set (pass an unquantised checkpoint)")
    return problems


def dense_lm_config(hf: dict, max_seq_len: Optional[int] = None) -> Any:
    """The dense LMConfig equal to a Llama / Mistral / Qwen2 config; UpcycleError naming what cannot be expressed."""
    from meo_ds.models.config import LMConfig, ModelConfigError

    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UpcycleError(f"model_type={family!r} is not supported; meo-upcycle reads {', '.join(FAMILIES.values())}")
    seq = max_seq_len or hf.get("max_position_embeddings") or 2048
    problems = architecture_problems(hf, seq)
    if problems:
        raise UpcycleError(f"{FAMILIES[family]} option(s) meo_ds's LM cannot express: " + "; ".join(problems))
    theta, _ = _rope(hf)
    cfg = LMConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], max_seq_len=seq, rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=family == "qwen2", moe=None,
    )
    try:
        return cfg.validate()
    except ModelConfigError as err:
        raise UpcycleError(f"{err} (from the HF config)") from None


# --------------------------------------------------------------------------- the MoE config
def moe_config(kind: str, d_ff: int, experts: int, top_k: Optional[int], threshold: Optional[float],
               granularity: Optional[int]) -> tuple[Any, int]:
    """(MoEConfig, granularity G) for the options; UpcycleError naming the option that does not fit."""
    from meo_ds.moe import MoEConfig

    if kind not in KINDS:
        raise UpcycleError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    if experts < 1:
        raise UpcycleError(f"--experts {experts} must be >= 1")
    if kind == "xmoe":
        if top_k is not None:
            raise UpcycleError("--top-k is for --kind topk|meo; XMoE chooses per token by --threshold")
        g = experts if granularity is None else granularity
        if g < 1 or experts % g or d_ff % g:
            raise UpcycleError(f"--granularity {g} must divide --experts {experts} and the FFN width {d_ff}")
        fields: dict = {"expert_hidden": d_ff // g if g > 1 else None}
        if threshold is not None:
            fields["threshold"] = threshold
    else:
        if granularity not in (None, 1):
            raise UpcycleError(f"--granularity is XMoE's (pieces of the FFN); --kind {kind} copies the whole FFN")
        if threshold is not None:
            raise UpcycleError("--threshold is XMoE's; use --top-k for --kind topk|meo")
        g, fields = 1, {"top_k": 2 if top_k is None else top_k}
    try:
        return MoEConfig(kind=kind, num_experts=experts, **fields).validate(), g
    except ValueError as err:
        raise UpcycleError(str(err)) from None


def threshold_exact(moe: Any) -> bool:
    """XMoE at a zero router: every expert is selected (so the start is exact) iff (E-1)/E < threshold."""
    return (moe.num_experts - 1) / moe.num_experts < moe.threshold


def parse_layers(spec: str, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UpcycleError(f"--moe-layers {spec!r}: give 'all' or comma-separated layer indices, e.g. 1,3,5") from None
    if not layers or not all(0 <= i < n_layers for i in layers):
        raise UpcycleError(f"--moe-layers {spec!r}: indices must lie in [0, {n_layers}) (the model's layers)")
    return layers


# --------------------------------------------------------------------------- weights
def dense_state_dict(cfg: Any, reader: SafetensorsReader) -> dict[str, torch.Tensor]:
    """Our dense LM's weights from the HF checkpoint (shapes checked; every HF weight used)."""
    from meo_ds.models.lm import MoELM

    with torch.device("meta"):
        want = MoELM(cfg).state_dict()
    names = reader.names()
    out, used = {}, set()
    for key, meta in want.items():
        name = llama_key(key)
        if key == "lm_head.weight" and cfg.tie_embeddings:
            used.add(name)  # tied: the embedding (a saved copy, if any, is the same tensor)
            continue
        if name not in names:
            raise UpcycleError(f"the checkpoint has no weight {name!r} (needed for {key}); is it a complete "
                               f"{'/'.join(FAMILIES.values())} checkpoint?")
        tensor = reader.get(name)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise UpcycleError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies {tuple(meta.shape)}")
        out[key] = tensor
        used.add(name)
    extra = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise UpcycleError(f"weights the config does not describe: {extra[:4]}{' ...' if len(extra) > 4 else ''}; "
                           f"the architecture has parts meo_ds's LM lacks")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def _perturbed(w: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    if noise == 0:
        return w.clone()
    eps = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    return (w.float() * (1 + noise * eps)).to(w.dtype)


def expert_weights(ffn: dict[str, torch.Tensor], e: int, granularity: int) -> dict[str, torch.Tensor]:
    """Expert e's (w1, w3, w2) from the dense FFN: piece e mod G of its hidden dimension, w2 times G."""
    if granularity == 1:
        return dict(ffn)
    p, h = e % granularity, ffn["w1"].shape[0] // granularity
    rows = slice(p * h, (p + 1) * h)
    w2 = (ffn["w2"][:, rows].double() * granularity).to(ffn["w2"].dtype)
    return {"w1": ffn["w1"][rows], "w3": ffn["w3"][rows], "w2": w2}


def upcycled_layer(moe: Any, d_model: int, ffn: dict[str, torch.Tensor], granularity: int, noise: float,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The state dict of one MoE layer built by the library (its own init for everything upcycling
    does not set), with the experts and routers set as the module docstring says."""
    from meo_ds.moe import build_moe_layer

    layer = build_moe_layer(moe, d_model, ffn["w1"].shape[0], causal=True)
    state = {k: v.detach() for k, v in layer.state_dict().items()}
    dtype = ffn["w1"].dtype
    if moe.kind == "meo":
        for w in ("w1", "w3", "w2"):
            state[f"linears.{w}.weight"] = torch.stack([_perturbed(ffn[w], noise, gen) for _ in range(moe.num_experts)])
    else:
        for e in range(moe.num_experts):
            for w, value in expert_weights(ffn, e, granularity).items():
                state[f"{DS_EXPERTS}{e}.{w}.weight"] = _perturbed(value, noise, gen)
        if moe.kind == "xmoe":
            state["router.weight"] = torch.zeros_like(state["router.weight"])
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


# --------------------------------------------------------------------------- writing
class CheckpointWriter:
    """A meo-train checkpoint at step 0 (tag step_00000000, COMPLETE with checksums, `latest`) in the
    DeepSpeed engine's file split (meo_ds/export/consolidate.py): each expert-parallel expert in its
    own file, written as soon as its layer is added (so only one MoE layer's experts are in memory);
    everything else in the main file. MoE layer ids count the layers holding such experts, in order."""

    def __init__(self, ckpt_dir: Path):
        from meo_ds import checkpoint as ckpt

        self.ckpt_dir, self.tag_dir = ckpt_dir, ckpt_dir / ckpt.tag_for(0)
        self.tag_dir.mkdir(parents=True)
        self.main: dict[str, torch.Tensor] = {}
        self.num_experts: list[int] = []

    def add(self, state: dict[str, torch.Tensor]) -> None:
        """Weights of whole layers, added in module order."""
        from meo_ds.export.consolidate import EXPERT_FILE

        experts: dict[int, dict] = {}
        for key, value in state.items():
            if DS_EXPERTS in key:
                experts.setdefault(int(key.partition(DS_EXPERTS)[2].split(".")[0]), {})[key] = value
            else:
                self.main[key] = value
        if experts:
            lid = len(self.num_experts)
            for e, tensors in experts.items():
                torch.save(tensors, self.tag_dir / EXPERT_FILE.format(layer=lid, expert=e))
            self.num_experts.append(len(experts))

    def finish(self, run_tree: dict, source: str) -> Path:
        import deepspeed

        from meo_ds import checkpoint as ckpt

        torch.save({"module": self.main, "num_experts": self.num_experts, "dp_world_size": 1, "mp_world_size": 1,
                    "global_steps": 0, "global_samples": 0, "skipped_steps": 0, "ds_version": deepspeed.__version__,
                    "trainer_step": 0, "world_size": 1, "config": run_tree, "upcycled_from": source},
                   self.tag_dir / ckpt.MAIN_FILE)
        files = {name: ckpt.file_digest(self.tag_dir / name) for name in ckpt.tag_files(self.tag_dir)}
        ckpt.mark_complete(self.ckpt_dir, self.tag_dir.name, 0, 1, files, ep_size=1, upcycled_from=source)
        return self.tag_dir


def copy_tokenizer(hf_dir: Path, out_dir: Path, vocab_size: int) -> Optional[str]:
    """HF_DIR's tokenizer.model (SentencePiece), else its tokenizer.json with tokenizer_config.json and
    special_tokens_map.json (HuggingFace) -> OUT_DIR/tokenizer/, which meo-prepare --tokenizer reads;
    returns the main file's path in OUT_DIR, None when HF_DIR has neither."""
    from meo_ds.data.hf_tokenizer import HF_FILE, SP_FILE, load_tokenizer

    if not (hf_dir / SP_FILE).is_file() and not (hf_dir / HF_FILE).is_file():
        return None
    try:
        tok = load_tokenizer(hf_dir)
    except ValueError as err:
        raise UpcycleError(f"{err}") from None
    if tok.vocab_size > vocab_size:
        raise UpcycleError(f"{tok.path} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    (out_dir / "tokenizer").mkdir()
    for name in tok.files:
        shutil.copyfile(tok.path if tok.kind == "sentencepiece" else hf_dir / name, out_dir / "tokenizer" / name)
    return f"tokenizer/{tok.files[0]}"


def run_tree(out_dir: Path, model_cfg: Any) -> dict:
    from meo_ds.config.convert import to_dict

    return {
        "task": "lm", "name": out_dir.name, "model": to_dict(model_cfg), "parallel": {"ep_size": 1},
        "data": {"seq_len": min(model_cfg.max_seq_len, 2048)},
        "checkpoint": {"init_from": str((out_dir / "checkpoints").resolve())},
        "logging": {"out_dir": str((out_dir / "run").resolve())},
    }


CONFIG_HEADER = """\
# Written by meo-upcycle from {source}.
# Prepare a corpus with this model's tokenizer, then train (the weights come from checkpoint.init_from):
#   meo-prepare lm CORPUS.txt --tokenizer {out}/tokenizer --out DATA_DIR
#   deepspeed --num_gpus N --module meo_ds.train --config {out}/config.yaml \\
#       --deepspeed_config ds_configs/zero2_bf16.json --set data.path=DATA_DIR --set parallel.ep_size=N
"""


# --------------------------------------------------------------------------- driver
def upcycle(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, kind: str, experts: int = 8,
            top_k: Optional[int] = None, threshold: Optional[float] = None, granularity: Optional[int] = None,
            moe_layers: str = "all", max_seq_len: Optional[int] = None, noise: float = 0.0, seed: int = 0) -> dict:
    """Write the run directory OUT_DIR (module docstring) and return what upcycle.json records."""
    import yaml

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UpcycleError(f"{out_dir} exists and is not empty; choose a new OUT_DIR")
    if not 0 <= noise < 1:
        raise UpcycleError(f"--noise {noise} must lie in [0, 1) (a relative perturbation of each expert weight)")
    hf = read_hf_config(hf_dir)
    dense = dense_lm_config(hf, max_seq_len)
    moe, g = moe_config(kind, dense.d_ff, experts, top_k, threshold, granularity)
    layers = parse_layers(moe_layers, dense.n_layers)
    reader = SafetensorsReader(hf_dir)
    weights = dense_state_dict(dense, reader)  # every check done before anything is written

    from dataclasses import replace

    model_cfg = replace(dense, moe=moe, moe_layers=layers).validate()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gen = torch.Generator().manual_seed(seed)
        writer = CheckpointWriter(tmp / "checkpoints")
        writer.add({k: v for k, v in weights.items() if not any(k.startswith(f"layers.{i}.ffn.") for i in layers)})
        for i in layers:
            ffn = {w: weights[f"layers.{i}.ffn.{w}.weight"] for w in ("w1", "w2", "w3")}
            with torch.random.fork_rng(devices=[]):  # the library's own init of what upcycling leaves alone
                torch.manual_seed(seed * 1_000_003 + i)
                layer = upcycled_layer(moe, dense.d_model, ffn, g, noise, gen)
            writer.add({f"layers.{i}.moe.{k}": v for k, v in layer.items()})
        tree = run_tree(out_dir, model_cfg)
        writer.finish(tree, str(hf_dir.resolve()))
        tokenizer = copy_tokenizer(hf_dir, tmp, dense.vocab_size)
        header = CONFIG_HEADER.format(source=hf_dir.resolve(), out=out_dir)
        (tmp / "config.yaml").write_text(header + yaml.safe_dump(tree, sort_keys=False))
        record = {"source": str(hf_dir.resolve()), "architecture": FAMILIES[hf["model_type"]], "kind": kind,
                  "num_experts": experts, "granularity": g, "moe_layers": layers, "noise": noise, "seed": seed,
                  "dtype": str(weights["embed.weight"].dtype).replace("torch.", ""), "tokenizer": tokenizer,
                  "exact_start": noise == 0 and (kind != "xmoe" or threshold_exact(moe))}
        (tmp / "upcycle.json").write_text(json.dumps(record, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meo-upcycle", description="Start a MoE run from a pretrained dense "
                                "HuggingFace LM (Llama, Mistral, Qwen2): every expert starts from its dense FFN")
    p.add_argument("hf_dir", type=Path, help="transformers model directory (config.json + safetensors)")
    p.add_argument("out_dir", type=Path, help="new run directory (config.yaml, checkpoints/, tokenizer/)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=None, help="topk/meo: experts per token or group (default 2)")
    p.add_argument("--threshold", type=float, default=None, help="xmoe: router threshold (default 0.9)")
    p.add_argument("--granularity", type=int, default=None,
                   help="xmoe: pieces each FFN is cut into along its hidden dimension (default = --experts)")
    p.add_argument("--moe-layers", default="all", help="'all' (default) or comma-separated layer indices")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--noise", type=float, default=0.0, help="relative noise on expert weights (default 0: exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and the noise")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = upcycle(args.hf_dir, args.out_dir, args.kind, args.experts, args.top_k, args.threshold,
                         args.granularity, args.moe_layers, args.max_seq_len, args.noise, args.seed)
    except UpcycleError as err:
        print(f"[meo-upcycle] {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {record['architecture']} -> {record['kind']} with {record['num_experts']} experts "
          f"in layers {record['moe_layers']} ({record['dtype']}); exact start: {record['exact_start']}")
    if record["tokenizer"] is None:
        print(f"note: {args.hf_dir} has no tokenizer.model or tokenizer.json; prepare the corpus with the tokenizer "
              f"the model was trained with (meo-prepare lm --tokenizer DIR)")
    print(f"next: see the commands at the top of {args.out_dir / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
