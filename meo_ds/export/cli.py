"""`meo-export CHECKPOINT_DIR OUTPUT_DIR [--tag TAG] [--target auto|mixtral|llama|mistral|meo]`.

Exit status: 0 on success, 2 for a bad input (not a checkpoint, incomplete checkpoint, a target
the architecture cannot map to, ...), with a one-line reason on stderr and no output directory.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from meo_ds.export.errors import CheckpointError, ExportError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from meo_ds.export.exporter import DTYPES, TARGETS

    p = argparse.ArgumentParser(prog="meo-export", description="Export a meo_ds DeepSpeed checkpoint to HuggingFace format.")
    p.add_argument("checkpoint_dir", help="checkpoint directory written by meo-train (holds 'latest' and tag dirs)")
    p.add_argument("output_dir", help="export directory to create (must be empty or absent unless --overwrite)")
    p.add_argument("--tag", default=None, help="checkpoint tag to export (default: the one named in 'latest')")
    p.add_argument("--target", default="auto", choices=TARGETS,
                   help="auto: native Mixtral (top-k MoE) / Llama (dense) when the model maps exactly, else meo "
                        "(our classes, loaded with trust_remote_code=True)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model or HuggingFace "
                   "tokenizer.json, or a directory holding one (default: <data.path>'s)")
    p.add_argument("--no-tokenizer", action="store_true", help="export weights and config only")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast weights (default: as trained)")
    p.add_argument("--max-shard-size", default="2GB", type=shard_size, help="safetensors shard size (e.g. 500MB, 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p.parse_args(argv)


def shard_size(text: str) -> str:
    """--max-shard-size as transformers parses it (an integer and a unit); argparse reports a bad one."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(text) > 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a size; use an integer and a unit, e.g. 500MB, 5GB or 2GiB")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from meo_ds.export.exporter import export

    try:
        result = export(
            args.checkpoint_dir, args.output_dir, tag=args.tag, target=args.target, tokenizer=args.tokenizer,
            require_tokenizer=not args.no_tokenizer, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except (CheckpointError, ExportError) as err:
        print(f"meo-export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint_dir} (tag {result.tag}) as {result.target} to {result.out_dir}")
    for note in result.notes:
        print(f"note: {note}")
    print("files: " + ", ".join(result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
