"""generate() speed of remote-code exports with and without the KV cache (issue #17).

    python bench/bench_generate.py [--new-tokens 256] [--d-model 256] [--layers 4] [--threads N]

Builds randomly initialised meo_ds models (XMoE and MEO language models, an MEO translation
model), converts them with the exporter's remote-code path (remote.build_hf_model: the classes an
export ships) and times greedy generate() of --new-tokens tokens (batch 1, no eos) with
use_cache=False (every step re-runs the whole prefix, as exports did before the cache) and
use_cache=True. Checks that both return the same tokens. Prints a table; nothing is asserted
about speed.
"""
from __future__ import annotations

import argparse
import time

import torch

from meo_ds.export import remote
from meo_ds.models import LMConfig, MTConfig, build_model
from meo_ds.moe import MoEConfig

MODELS = {  # name: (task, MoE settings)
    "lm xmoe": ("lm", dict(kind="xmoe", threshold=0.6)),
    "lm meo (token)": ("lm", dict(kind="meo", meo_level="token", segment_len=64)),
    "mt meo": ("translation", dict(kind="meo", segment_len=64)),
}


def build(task: str, moe: dict, args) -> torch.nn.Module:
    common = dict(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.d_model // 64, d_ff=4 * args.d_model,
                  max_seq_len=1024, moe=MoEConfig(num_experts=8, top_k=2, **moe))
    if task == "lm":
        cfg = LMConfig(n_layers=args.layers, **common)
    else:
        cfg = MTConfig(encoder_layers=args.layers, decoder_layers=args.layers, dropout=0.0, **common)
    torch.manual_seed(0)
    return remote.build_hf_model(task, cfg, build_model(cfg).eval().state_dict())


def timed_generate(model, inputs: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
              attention_mask=torch.ones_like(inputs))
    start = time.perf_counter()
    out = model.generate(inputs, **kw)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"d_model {args.d_model}, {args.layers} layers, 8 experts top-2, vocab {args.vocab}, batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"{'model':<16} {'no cache s':>11} {'cache s':>9} {'speed-up':>9} {'tok/s no cache':>15} {'tok/s cache':>12}")
    for name, (task, moe) in MODELS.items():
        model = build(task, moe, args)
        prompt = torch.randint(4, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            timed_generate(model, prompt, 4, True)  # warm-up
            slow, plain = timed_generate(model, prompt, args.new_tokens, False)
            fast, cached = timed_generate(model, prompt, args.new_tokens, True)
        same = "same tokens" if torch.equal(plain, cached) else "TOKENS DIFFER"
        n = args.new_tokens
        print(f"{name:<16} {slow:>11.2f} {fast:>9.2f} {slow / fast:>8.1f}x {n / slow:>15.1f} {n / fast:>12.1f}  {same}")


if __name__ == "__main__":
    main()
