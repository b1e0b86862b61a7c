"""A second LM corpus like the demo's, from an installed package's docstrings (no download).

    python data_prep/prepare_package_docs.py numpy --out /tmp/numpy_lm

writes OUT/corpus/docstrings.jsonl (module, class and function docstrings of at least 5 words,
the package's .py files in sorted order without its tests, at most --max-chars characters, read
with `ast`: nothing is imported), then runs `meo-prepare tokenizer` (vocabulary 8000, nfkc) and
`meo-prepare lm` (validation fraction 0.02) on it, as `meo-prepare demo --task lm` does on the
standard library: OUT/tokenizer and OUT/shards. Same package version, same corpus.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meo_ds.data.cli import main as prepare  # noqa: E402
from meo_ds.data.demo import python_sources, source_docstrings  # noqa: E402

SKIP_DIRS = {"test", "tests", "testing", "__pycache__"}


def package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"prepare_package_docs: {name!r} is not an installed package; name one pip lists")
    return Path(list(spec.submodule_search_locations)[0])


def docstrings(root: Path, max_chars: int) -> Iterator[str]:
    """The package's docstrings, read as the demo reads the standard library's."""
    return source_docstrings(python_sources(root, SKIP_DIRS), max_chars)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", help="an installed package, e.g. numpy")
    p.add_argument("--out", required=True, help="output directory (corpus/, tokenizer/, shards/)")
    p.add_argument("--max-chars", type=int, default=3_000_000, help="corpus size cap (the demo's)")
    p.add_argument("--vocab-size", type=int, default=8000)
    args = p.parse_args()
    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus" / "docstrings.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        count = sum(1 for doc in docstrings(package_root(args.package), args.max_chars)
                    if f.write(json.dumps({"text": doc}) + "\n"))
    print(f"corpus: {count:,} {args.package} docstrings in {corpus}")
    code = prepare(["tokenizer", str(corpus), "--out", str(out / "tokenizer"), "--vocab-size", str(args.vocab_size),
                    "--normalization", "nfkc", "--overwrite", "--no-progress"])
    if code:
        return code
    return prepare(["lm", str(corpus), "--tokenizer", str(out / "tokenizer"), "--out", str(out / "shards"),
                    "--valid-fraction", "0.02", "--overwrite", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
