"""Loader throughput: tokens/s the LM and translation loaders deliver on this machine.

    python bench/bench_loader.py [--data DIR_WITH_DEMOS] [--batches 300] [--model-tokens-per-s N]

Without --data it builds both demo corpora (`meo-prepare demo`) in a temporary directory.
Tokens counted: LM input tokens (batch x seq_len); translation source + target tokens incl. padding.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from meo_ds.data.demo import build_demo
from meo_ds.data.lm import LMLoader
from meo_ds.data.mt import MTLoader


def measure(loader, batches: int, count) -> tuple[float, float]:
    """(tokens/s, ms per batch) over `batches` batches after one warm-up batch."""
    stream = loader.forever()
    next(stream)
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
        tokens += count(next(stream))
    elapsed = time.perf_counter() - start
    return tokens / elapsed, 1000 * elapsed / batches


def lm_rows(shards: Path, batches: int) -> list[tuple[str, float, float]]:
    rows = []
    for seq_len, micro in ((512, 8), (1024, 16), (2048, 8)):
        for reset in (False, True):
            loader = LMLoader(shards, seq_len, micro, seed=0, reset_at_doc_boundaries=reset)
            tps, ms = measure(loader, batches, lambda b: b["input_ids"].numel())
            rows.append((f"lm  seq {seq_len:>4} x {micro:>2}{' reset' if reset else '      '}", tps, ms))
    return rows


def mt_rows(shards: Path, batches: int) -> list[tuple[str, float, float]]:
    rows = []
    for max_tokens in (1024, 4096, 16384):
        loader = MTLoader(shards, max_tokens, seed=0)
        tps, ms = measure(loader, batches, lambda b: b["src_ids"].numel() + b["labels"].numel())
        rows.append((f"mt  max_tokens {max_tokens:>5}     ", tps, ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="directory holding lm/ and mt/ demo builds (made if missing)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--model-tokens-per-s", type=float, help="training throughput to compare against")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lm = build_demo("lm", root / "lm")
            mt = build_demo("mt", root / "mt")
        rows = lm_rows(lm, args.batches) + mt_rows(mt, args.batches)
    print(f"{'loader':<32} {'tokens/s':>14} {'ms/batch':>10}" + ("   x model" if args.model_tokens_per_s else ""))
    for name, tps, ms in rows:
        ratio = f" {tps / args.model_tokens_per_s:>9.0f}x" if args.model_tokens_per_s else ""
        print(f"{name:<32} {tps:>14,.0f} {ms:>10.3f}{ratio}")


if __name__ == "__main__":
    main()
