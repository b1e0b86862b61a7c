"""`meo-prepare tokenizer|lm|mt|demo|verify`: command-line front end of meo_ds.data."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from meo_ds.data.readers import CorpusError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding another corpus")


def _add_shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="tokenizer directory (from `meo-prepare tokenizer`, or holding a HuggingFace "
                        "tokenizer.json: LM only), a SentencePiece .model or a tokenizer.json file")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                   help="token id type on disk; auto: uint16 when the vocabulary fits, else uint32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_split_options(p: argparse.ArgumentParser, files: str, test_default: str) -> None:
    """--valid/--test FILE... and the --valid-fraction/--test-fraction fallbacks (meo_ds/data/prepare.py)."""
    splits = p.add_argument_group(
        "held-out splits",
        "Each of validation and test comes from your own files or, without them, from a fraction of the "
        "training inputs (giving both for one split is an error). Given files are read in the training "
        "inputs' format and tokenized with the same tokenizer; they are never filtered or deduplicated (a "
        "translation pair with an empty side is an error). "
        "A file identical to a training input is an error; text that also occurs in the training inputs "
        "is a warning, counted in the manifest. Put these options after the training inputs.")
    splits.add_argument("--valid", nargs="+", type=Path, metavar="FILE",
                        help=f"the validation split is exactly these files ({files})")
    splits.add_argument("--test", nargs="+", type=Path, metavar="FILE",
                        help=f"the test split is exactly these files ({files})")
    splits.add_argument("--valid-fraction", type=float, default=None, metavar="F",
                        help="without --valid: hold out this fraction of the training inputs' items, evenly spread "
                             "(default 0.01)")
    splits.add_argument("--test-fraction", type=float, default=None, metavar="F",
                        help=f"without --test: hold out this fraction as the test split ({test_default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meo-prepare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer (also writes HuggingFace files)")
    tok.add_argument("inputs", nargs="+", type=Path, help="corpus files (or a parallel corpus with --parallel)")
    _add_common(tok)
    tok.add_argument("--parallel", action="store_true", help="inputs are a parallel corpus: joint vocabulary")
    tok.add_argument("--format", default="auto", help="text|jsonl|parquet|hf (or aligned|tsv|jsonl with --parallel)")
    tok.add_argument("--field", default="text", help="JSON/parquet/dataset text field")
    tok.add_argument("--doc-sep", default="line", choices=["line", "blank"], help="plain text: document separator")
    tok.add_argument("--source-field", default="source", help="--parallel JSON lines: source field")
    tok.add_argument("--target-field", default="target", help="--parallel JSON lines: target field")
    tok.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (a soft limit; default 8000)")
    tok.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"],
                     help="SentencePiece model type")
    tok.add_argument("--character-coverage", type=float, default=0.9995,
                     help="fraction of characters the vocabulary covers (default 0.9995)")
    tok.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to unk, not bytes")
    tok.add_argument("--normalization", default="nmt_nfkc", choices=["nmt_nfkc", "nfkc"],
                     help="nfkc keeps newlines and tabs (multi-line documents); nmt_nfkc maps them to spaces")
    tok.add_argument("--max-sentences", type=int, default=2_000_000, help="sentences sampled for training")
    tok.add_argument("--no-progress", action="store_true", help="no progress bar")

    lm = sub.add_parser("lm", help="tokenize a corpus into LM shards (train/validation[/test])",
                        description="Tokenize documents into LM shards: train, validation and (when asked for) "
                                    "test, each documents' ids + eos back to back.")
    lm.add_argument("inputs", nargs="+", type=Path, help="training corpus files or `datasets` directories")
    _add_common(lm)
    _add_shard_options(lm)
    lm.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "hf"],
                    help="input format of every file; auto: by extension (.jsonl/.json, .parquet, .csv or a "
                         "directory = hf, else text)")
    lm.add_argument("--field", default="text", help="JSON/parquet/dataset text field")
    lm.add_argument("--doc-sep", default="line", choices=["line", "blank"], help="plain text: document separator")
    _add_split_options(lm, "any LM input format; a `datasets` DatasetDict directory is read through its split "
                           "named validation / test", "default 0: no test split")

    mt = sub.add_parser("mt", help="clean and tokenize a parallel corpus into paired shards (train/validation/test)",
                        description="Clean, tokenize and split a parallel corpus into paired source/target shards.")
    mt.add_argument("inputs", nargs="+", type=Path, help="SRC TGT aligned files, one TSV, or one JSON lines file")
    _add_common(mt)
    _add_shard_options(mt)
    mt.add_argument("--format", default="auto", choices=["auto", "aligned", "tsv", "jsonl"],
                    help="parallel format of the inputs and of --valid/--test; auto: two files = aligned, "
                         "one .jsonl = JSON lines, one other file = TSV")
    mt.add_argument("--source-field", default="source", help="JSON lines: source field")
    mt.add_argument("--target-field", default="target", help="JSON lines: target field")
    mt.add_argument("--max-len", type=int, default=256, help="drop training pairs with a side longer (tokens); 0 = off")
    mt.add_argument("--max-ratio", type=float, default=3.0, help="drop training pairs with a length ratio above; 0 = off")
    mt.add_argument("--no-dedup", action="store_true", help="keep exact duplicate training pairs")
    _add_split_options(mt, "given like the inputs: SRC TGT aligned files, one TSV or one JSON lines file",
                       "default 0.01")

    demo = sub.add_parser("demo", help="build a demo corpus, tokenizer and shards without any download")
    demo.add_argument("--task", required=True, choices=["lm", "mt"], help="language modelling or translation")
    _add_common(demo)
    demo.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default 1)")
    demo.add_argument("--vocab-size", type=int, default=None, help="default 8000 (lm) / 1000 (mt)")
    demo.add_argument("--pairs", type=int, default=20_000, help="mt: number of synthetic pairs")
    demo.add_argument("--max-chars", type=int, default=3_000_000, help="lm: docstring characters at most")

    verify = sub.add_parser("verify", help="check every file of a prepared corpus against its manifest (sha256, ids)")
    verify.add_argument("directory", type=Path, help="a directory written by `meo-prepare lm|mt`")
    return parser


def run_verify(args: argparse.Namespace) -> dict:
    from meo_ds.data.verify import verify_corpus

    report = verify_corpus(args.directory)
    print(f"{args.directory}: OK, {report['files']} token files, {report['tokens']:,} tokens "
          f"({report['bytes'] / 2**20:.1f} MiB) match the manifest")
    return report


def run_tokenizer(args: argparse.Namespace) -> dict:
    from meo_ds.data.tokenizer import prepare_tokenizer

    m = prepare_tokenizer(args.inputs, args.out, parallel=args.parallel, fmt=args.format, field=args.field,
                          doc_sep=args.doc_sep, source_field=args.source_field, target_field=args.target_field,
                          vocab_size=args.vocab_size, model_type=args.model_type,
                          character_coverage=args.character_coverage, byte_fallback=not args.no_byte_fallback,
                          max_sentences=args.max_sentences, normalization=args.normalization,
                          overwrite=args.overwrite, progress=not args.no_progress)
    print(f"tokenizer: {args.out / m['file']}  vocab {m['vocab_size']}  special ids {m['special_ids']}  "
          f"HuggingFace files: {m['hf_dir'] or 'none'}")
    return m


def run_lm(args: argparse.Namespace) -> dict:
    from meo_ds.data.lm import prepare_lm, print_lm_summary

    m = prepare_lm(args.inputs, args.tokenizer, args.out, fmt=args.format, field=args.field, doc_sep=args.doc_sep,
                   valid=args.valid, test=args.test, valid_fraction=args.valid_fraction,
                   test_fraction=args.test_fraction, num_proc=args.num_proc, dtype=args.dtype,
                   overwrite=args.overwrite, progress=not args.no_progress)
    print_lm_summary(m, args.out)
    return m


def run_mt(args: argparse.Namespace) -> dict:
    from meo_ds.data.mt import prepare_mt, print_mt_summary

    m = prepare_mt(args.inputs, args.tokenizer, args.out, fmt=args.format, source_field=args.source_field,
                   target_field=args.target_field, max_len=args.max_len, max_ratio=args.max_ratio,
                   dedup=not args.no_dedup, valid=args.valid, test=args.test, valid_fraction=args.valid_fraction,
                   test_fraction=args.test_fraction,
                   num_proc=args.num_proc, dtype=args.dtype, overwrite=args.overwrite,
                   progress=not args.no_progress)
    print_mt_summary(m, args.out)
    return m


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        if args.command == "tokenizer":
            run_tokenizer(args)
        elif args.command == "lm":
            run_lm(args)
        elif args.command == "mt":
            run_mt(args)
        elif args.command == "verify":
            run_verify(args)
        else:
            from meo_ds.data.demo import build_demo

            build_demo(args.task, args.out, num_proc=args.num_proc, vocab_size=args.vocab_size,
                       pairs=args.pairs, max_chars=args.max_chars, overwrite=args.overwrite)
    except (CorpusError, ValueError, OSError, KeyError) as err:  # OSError: a full disk, a read-only output
        print(f"meo-prepare {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
