"""Demo corpora built at run time without any download.

LM: documentation strings of the installed Python's standard library, read with `ast` (no module
is imported, so nothing runs), files in sorted order: the same interpreter gives the same corpus.
MT: a synthetic language pair. The source is generated from a small English-like grammar; the
target follows fixed rules a small model can learn: a word-for-word lexicon of invented words,
adjectives after their noun, the verb at the end of the clause (SOV), and a plural suffix.
"""
from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def python_sources(root: Path, skip_dirs: set[str] = SKIP_DIRS) -> Iterator[Path]:
    """The .py files under `root` in sorted order, without the directories named in `skip_dirs`."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


def source_docstrings(paths: Iterable[Path], max_chars: int) -> Iterator[str]:
    """Docstrings (module, class, function) of at least 5 words of the Python files `paths`, read
    with `ast` (nothing is imported), at most `max_chars` characters in all."""
    total = 0
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 5:
                    yield doc
                    total += len(doc)
                    if total >= max_chars:
                        return


def stdlib_docstrings(max_chars: int = 3_000_000) -> Iterator[str]:
    """Docstrings of the standard library (without tests and installed packages)."""
    return source_docstrings(python_sources(Path(sysconfig.get_paths()["stdlib"])), max_chars)


DETERMINERS = ["the", "a", "every", "this", "no"]
ADJECTIVES = ("small large red green old young quick slow happy sad bright dark heavy light warm cold "
              "quiet loud tall short").split()
NOUNS = ("cat dog bird fish horse child teacher farmer king queen river tree house boat city garden "
         "stone book song letter apple bread lamp road mountain star").split()
VERBS = "sees likes finds takes builds paints follows carries watches helps reads brings".split()
ADVERBS = "today slowly often again quietly early".split()
PREPOSITIONS = "near under behind with".split()
SYLLABLES = "ka ri to mu se na lo vi pe du ha zo ki ne ru ba ti me so gu".split()


def _lexicon(rng: random.Random) -> dict[str, str]:
    words = DETERMINERS + ADJECTIVES + NOUNS + VERBS + ADVERBS + PREPOSITIONS
    lexicon, used = {}, set()
    for word in words:
        while True:
            made = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
            if made not in used:
                used.add(made)
                lexicon[word] = made
                break
    return lexicon


def _noun_phrase(rng: random.Random, lex: dict[str, str]) -> tuple[list[str], list[str]]:
    det, noun = rng.choice(DETERMINERS), rng.choice(NOUNS)
    adjectives = rng.sample(ADJECTIVES, rng.choice([0, 0, 1, 1, 2]))
    plural = det in ("the", "no") and rng.random() < 0.4
    src = [det, *adjectives, noun + ("s" if plural else "")]
    tgt = [lex[det], lex[noun] + ("-en" if plural else ""), *(lex[a] for a in adjectives)]
    return src, tgt


def synthetic_pair(rng: random.Random, lex: dict[str, str]) -> tuple[str, str]:
    subj_s, subj_t = _noun_phrase(rng, lex)
    obj_s, obj_t = _noun_phrase(rng, lex)
    verb = rng.choice(VERBS)
    src, tgt = subj_s + [verb] + obj_s, subj_t + obj_t
    if rng.random() < 0.4:
        prep = rng.choice(PREPOSITIONS)
        pp_s, pp_t = _noun_phrase(rng, lex)
        src += [prep] + pp_s
        tgt += pp_t + [lex[prep]]
    if rng.random() < 0.3:
        adverb = rng.choice(ADVERBS)
        src.append(adverb)
        tgt.insert(0, lex[adverb])
    tgt.append(lex[verb])
    return " ".join(src) + " .", " ".join(tgt) + " ."


def synthetic_pairs(n: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """`n` deterministic (source, target) pairs of the synthetic language pair."""
    lex = _lexicon(random.Random(1234))
    rng = random.Random(seed)
    for _ in range(n):
        yield synthetic_pair(rng, lex)


def write_lm_corpus(path: Path, max_chars: int = 3_000_000) -> int:
    """Write the docstring corpus as JSON lines {"text": ...}; returns the number of documents."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_docstrings(max_chars):
            f.write(json.dumps({"text": doc}) + "\n")
            count += 1
    return count


def write_mt_corpus(source: Path, target: Path, n: int = 20_000, seed: int = 0) -> int:
    with open(source, "w", encoding="utf-8") as fs, open(target, "w", encoding="utf-8") as ft:
        for src, tgt in synthetic_pairs(n, seed):
            fs.write(src + "\n")
            ft.write(tgt + "\n")
    return n


def _check_demo_dir(out: Path, task: str, overwrite: bool) -> None:
    stamp = out / "demo.json"
    if not out.exists() or not any(out.iterdir()):
        return
    if stamp.is_file() and json.loads(stamp.read_text()).get("task") == task:
        return
    if not overwrite:
        raise FileExistsError(f"{out}: holds something other than the {task} demo; choose another --out or "
                              f"pass --overwrite")
    import shutil

    for name in ("corpus", "tokenizer", "shards"):
        shutil.rmtree(out / name, ignore_errors=True)
    stamp.unlink(missing_ok=True)


def build_demo(task: str, out: str | Path, *, num_proc: int = 1, vocab_size: int | None = None,
               pairs: int = 20_000, max_chars: int = 3_000_000, overwrite: bool = False) -> Path:
    """Build DIR/corpus, DIR/tokenizer and DIR/shards for the lm or mt demo; returns DIR/shards.

    Deterministic: re-running into the same directory finds everything up to date.
    """
    from meo_ds.data.io import staging_dir
    from meo_ds.data.lm import prepare_lm, print_lm_summary
    from meo_ds.data.mt import prepare_mt, print_mt_summary
    from meo_ds.data.tokenizer import prepare_tokenizer
    from meo_ds.fileio import atomic_write

    if task not in ("lm", "mt"):
        raise ValueError(f"demo task must be lm or mt, not {task!r}")
    out = Path(out)
    _check_demo_dir(out, task, overwrite)
    with staging_dir(out / "corpus") as tmp:
        if task == "lm":
            count = write_lm_corpus(tmp / "docstrings.jsonl", max_chars)
            print(f"corpus: {count:,} standard-library docstrings")
        else:
            count = write_mt_corpus(tmp / "source.txt", tmp / "target.txt", pairs)
            print(f"corpus: {count:,} synthetic sentence pairs")
    corpus = out / "corpus"
    if task == "lm":
        inputs = [corpus / "docstrings.jsonl"]
        prepare_tokenizer(inputs, out / "tokenizer", vocab_size=vocab_size or 8000, normalization="nfkc",
                          overwrite=True)
        manifest = prepare_lm(inputs, out / "tokenizer", out / "shards", valid_fraction=0.02, num_proc=num_proc,
                              overwrite=True)
        print_lm_summary(manifest, out / "shards")
    else:
        inputs = [corpus / "source.txt", corpus / "target.txt"]
        prepare_tokenizer(inputs, out / "tokenizer", parallel=True, vocab_size=vocab_size or 1000,
                          character_coverage=1.0, overwrite=True)
        manifest = prepare_mt(inputs, out / "tokenizer", out / "shards", max_len=64, valid_fraction=0.05,
                              test_fraction=0.05, num_proc=num_proc, overwrite=True)
        print_mt_summary(manifest, out / "shards")
    atomic_write(out / "demo.json", json.dumps({"task": task, "shards": "shards", "tokenizer": "tokenizer",
                                                "corpus": "corpus"}, indent=2))
    return out / "shards"
