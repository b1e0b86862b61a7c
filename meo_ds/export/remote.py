"""Export with our own HuggingFace classes (meo_ds/export/hf_remote), loaded by remote code.

The export directory gets the files of `SHIPPED`, copied verbatim (none imports meo_ds):
configuration_meo.py and modeling_meo.py, and the pure-torch math modeling_meo.py imports
relatively, meo_ds/moe/functional.py as moe_functional.py and meo_ds/models/functional.py as
models_functional.py (the library's own files, so one change reaches both; transformers' remote-code
loader copies a module's relative imports from next to it). config.json's `auto_map` points
AutoConfig / AutoModelForCausalLM / AutoModelForSeq2SeqLM at them, so `from_pretrained(dir,
trust_remote_code=True)` works where meo_ds is not installed. Weights are renamed from our model's
state dict by `layout.remote_key`. The model card's MoE settings are each kind's own
(`meo_ds.moe.registry.describe`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from meo_ds.export import layout
from meo_ds.export.hf_remote import LIBRARY_FILES
from meo_ds.export.weights import dtype_of, load_exact
from meo_ds.moe import registry

CODE_DIR = Path(__file__).resolve().parent / "hf_remote"
SHIPPED = {  # file name in the export: its source in meo_ds
    "configuration_meo.py": CODE_DIR / "configuration_meo.py",
    "modeling_meo.py": CODE_DIR / "modeling_meo.py",
    **LIBRARY_FILES,
}
AUTO_MAP = {
    "lm": {"AutoConfig": "configuration_meo.MeoConfig", "AutoModelForCausalLM": "modeling_meo.MeoForCausalLM"},
    "translation": {"AutoConfig": "configuration_meo.MeoConfig", "AutoModelForSeq2SeqLM": "modeling_meo.MeoForSeq2SeqLM"},
}


def build_hf_model(task: str, model_cfg: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """Our remote-code model (MeoForCausalLM / MeoForSeq2SeqLM) holding the checkpoint's weights."""
    from meo_ds.export.hf_remote.configuration_meo import MeoConfig
    from meo_ds.export.hf_remote.modeling_meo import MeoForCausalLM, MeoForSeq2SeqLM

    config = MeoConfig(**layout.remote_config(task, model_cfg), auto_map=AUTO_MAP[task])
    config.dtype = dtype_of(state_dict)
    cls = MeoForCausalLM if task == "lm" else MeoForSeq2SeqLM
    with torch.device("meta"):
        model = cls(config)
    renamed = {}
    for key, value in state_dict.items():
        new = layout.remote_key(task, key)
        if new is not None:
            renamed[new] = value
    load_exact(model, renamed, "the exported architecture")
    return model.eval()


def copy_code(out_dir: Path) -> None:
    """Write the SHIPPED files into the export directory."""
    for name, source in SHIPPED.items():
        shutil.copyfile(source, out_dir / name)


def moe_summary(task: str, model_cfg: Any) -> list[dict]:
    """One dict per distinct MoE configuration of the model (for the model card)."""
    from meo_ds.config import iter_moe_configs

    if task == "lm":
        where = f"layers {layout.moe_layer_ids(model_cfg)}"
    else:
        where = "; ".join(f"{stack} layers {ids}" for stack, ids in layout.mt_moe_layer_ids(model_cfg).items())

    seen, out = [], []
    for moe in iter_moe_configs(model_cfg):
        if moe in seen:
            continue
        seen.append(moe)
        out.append({"where": f"MoE layers ({moe.kind}): {where}", **registry.describe(moe)})
    return out


def usage(task: str, target: str, path: str = "path/to/export") -> str:
    """The model card's snippet, runnable as printed (a test runs it). Remote code: the tokenizer
    needs no code, but transformers 5's AutoTokenizer loads the model's config to pick a tokenizer
    class, and that config is our code, so it passes trust_remote_code too (without it transformers
    asks "Do you wish to run the custom code? [y/N]" and, declining, warns about the config type)."""
    remote = target == "meo"
    trust = ", trust_remote_code=True" if remote else ""
    head = f"path = {path!r}\n"
    if task == "lm":
        return head + (
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
            f"model = AutoModelForCausalLM.from_pretrained(path{trust})\n"
            f"tok = AutoTokenizer.from_pretrained(path{trust})\n"
            "batch = tok('Hello', return_tensors='pt')\n"
            "print(tok.decode(model.generate(**batch, max_new_tokens=32, do_sample=False)[0]).lstrip())\n"
            f"print(pipeline('text-generation', model=path{trust})('Hello', max_new_tokens=32, do_sample=False))"
        )
    return head + (
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
        f"model = AutoModelForSeq2SeqLM.from_pretrained(path{trust})\n"
        f"tok = AutoTokenizer.from_pretrained(path{trust})\n"
        "# As in training, each source ends with </s> (the tokenizer adds no special tokens);\n"
        "# the decoder starts from <s> (decoder_start_token_id).\n"
        "batch = tok([s + tok.eos_token for s in ['first sentence .', 'second one .']], return_tensors='pt', padding=True)\n"
        "out = model.generate(**batch, num_beams=4, max_new_tokens=64)\n"
        "print(tok.batch_decode(out, skip_special_tokens=True))"
    )
