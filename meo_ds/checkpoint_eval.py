"""`meo-eval CHECKPOINT --data DIR|FILE...`: perplexity of an LM checkpoint, or BLEU/chrF (beam
search) and loss of a translation checkpoint, on a prepared split or on raw files.

    meo-eval runs/x/checkpoints --data data/lm --split test --json lm_test.json
    meo-eval runs/mt/checkpoints/step_00000600 --data test.de test.en --beam 4 --out-translations hyp.txt
    deepspeed --num_gpus 4 --module meo_ds.checkpoint_eval runs/x/checkpoints --data data/lm   # batches over ranks
    deepspeed --num_gpus 8 --module meo_ds.checkpoint_eval runs/x/checkpoints --data data/lm --ep 8   # experts too

Checkpoint: a meo-train checkpoint directory (its newest complete tag, as meo-export takes it) or
one tag directory; any ep size and ZeRO stage. meo_ds.export.consolidate reads it on the CPU
(checksums against COMPLETE, launched ranks hashing a share of the files each; no unpickling), its
run config and weights are checked, and only once the data is checked too is the model built. By
default every rank holds the whole model, which must then fit one device. `--ep N` (under the
launcher, N dividing the world size and every top-k/XMoE layer's expert count, as the trainer's
parallel.ep_size) shards each such layer's experts over groups of N ranks, as training does: the
model is built with its experts deferred (moe/experts.py), meo_ds.parallel.parallelize keeps this
rank's 1/N, and `parallel.shard_state_dict` reads only those experts from the memory-mapped
checkpoint. Tokens then travel by all-to-all inside each group, and the figures equal the
one-process ones (the layers are exact across ep sizes; a test checks it). MEO layers merge weights and
are never sharded. The figures name `ep` and `rank_parameters`, the parameters rank 0 held.

Data: a prepared corpus directory of the checkpoint's task (`--split`, default validation), or raw
files tokenized with the checkpoint's tokenizer (LM: text/JSON lines documents as meo-prepare lm
reads them; translation: SRC TGT aligned files, one TSV or one JSON lines file, every pair kept,
an empty side is an error). Raw files become a one-split corpus in a temporary directory, so both
are read by the trainer's own loaders. The checkpoint's tokenizer is `tokenizer.model` (or a HuggingFace
`tokenizer.json`) of its run config's data.path (or `--tokenizer` when that corpus moved); a prepared corpus must carry the
same tokenizer (sha256 in its manifest), else it is an error, as is a corpus of the other task.

Loss (both tasks): token-weighted mean NLL (not label-smoothed), meo_ds.evaluate.loss_sums over
the batches of the trainer's validation loader for one rank, in order, unshuffled: LM batches of
`--batch-size` (default train.micro_batch_size) packed sequences of data.seq_len + 1 tokens cut
back to back from the split's token stream (documents joined with eos; the last < batch x seq_len
tokens that do not fill a batch are not scored); translation batches of data.max_tokens padded
tokens (`--max-tokens`). `--max-batches N` scores the first N. The trainer at world size W scores
batches 0..W*eval.max_batches-1 of this very sequence (rank r takes batch g*W + r), so
`--max-batches W*eval.max_batches` reproduces its eval.jsonl val_loss (to float rounding). Under the launcher rank r
scores batches r, r+W', ... and the sums are reduced once (meo_ds.distributed.all_reduce, device
tensors): the figure is the one-process figure, whatever the number of ranks. With --ep every
rank runs ceil(N / W') forwards, a rank with fewer batches running uncounted ones, since every
rank of an expert-parallel group takes part in each forward.

BLEU/chrF: sacrebleu corpus scores of beam-search translations (meo_ds.evaluate.translate_pairs,
the run's eval settings with `--beam`) of the first `--max-sentences` pairs (default all; 0 =
none), references decoded from their tokens as the trainer does, in beam-search batches of 64
pairs. Under the launcher those batches are divided over the ranks (the same batches, so the same
hypotheses as one process; with --ep over the expert-parallel groups, every rank of a group
translating the same ones, since beam search steps together) and their texts gathered on rank 0
(all_gather_objects), which prints one line and writes `--json` / `--out-translations`.

Exit status: 0 done, 2 bad input (one line on rank 0, before any work), 4 a collective failed:
a peer rank stuck past `--timeout-s` (default 300 s, as the trainer's train.dist_timeout_s) or
dead; each surviving rank prints one line naming the collective and its group.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import torch

from meo_ds import evaluate as ev

EXIT_INPUT = 2
EXIT_COLLECTIVE = 4  # as meo-train's: a collective timed out or lost a peer
DEFAULT_FIELD = "text"  # --field: the JSON lines field of raw LM documents


class EvalError(ValueError):
    """Input meo-eval cannot evaluate; the message names the problem and the fix."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meo-eval", description="Perplexity (LM) or BLEU/chrF + loss (translation) "
                                "of a meo-train checkpoint on a prepared split or raw files.")
    p.add_argument("checkpoint", help="checkpoint directory (newest complete tag) or one tag directory")
    p.add_argument("--tag", help="tag inside the checkpoint directory (default: the newest complete one)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="a prepared corpus directory, or raw files (LM: text/jsonl; translation: SRC TGT, TSV "
                   "or jsonl)")
    p.add_argument("--split", default="validation", help="split of a prepared corpus (default validation)")
    p.add_argument("--format", default="auto", help="raw files' format as meo-prepare takes it (default auto)")
    p.add_argument("--field", default=DEFAULT_FIELD,
                   help=f"JSON lines field of raw LM documents (default {DEFAULT_FIELD})")
    p.add_argument("--tokenizer", help="the checkpoint's tokenizer (its corpus directory or tokenizer.model) "
                   "when the run config's data.path moved")
    p.add_argument("--batch-size", type=int, help="LM sequences per batch (default train.micro_batch_size)")
    p.add_argument("--max-tokens", type=int, help="translation padded tokens per batch (default data.max_tokens)")
    p.add_argument("--max-batches", type=int, help="score the first N batches only (default all)")
    p.add_argument("--beam", type=int, help="beam size (default the run's eval.beam_size)")
    p.add_argument("--max-sentences", type=int, help="translate the first N pairs (default all; 0: no BLEU)")
    p.add_argument("--out-translations", help="write the hypotheses, one per line, in pair order")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="weights and compute dtype")
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="shard the top-k/XMoE experts over groups of N launched ranks, as the trainer's "
                   "parallel.ep_size (default 1: every rank holds the whole model)")
    p.add_argument("--json", help="write every figure and where it comes from to this file")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="launched ranks: seconds a collective may wait for a peer before the rank stops (exit 4)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch_size", "max_tokens", "max_batches", "beam", "ep"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, not {value}")
    if args.max_sentences is not None and args.max_sentences < 0:
        p.error(f"--max-sentences must be >= 0, not {args.max_sentences}")
    if not args.timeout_s > 0:
        p.error(f"--timeout-s must be > 0, not {args.timeout_s}")
    return args


# --------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    consolidated: Any  # export.Consolidated: the weights, memory-mapped until the model is built
    cfg: Any  # the run config saved with it (data.path, batch sizes, eval settings)
    path: Path  # the tag directory read
    step: Optional[int]


def load_checkpoint(path: str, tag: Optional[str]) -> Checkpoint:
    """A checkpoint directory (+ --tag) or one tag directory, checked (checksums, run config, every
    weight's name and shape) but not yet loaded into a model."""
    from meo_ds.export.consolidate import MAIN_FILE, consolidate
    from meo_ds.export.exporter import check_weights, run_config_of

    root = Path(path)
    if not root.exists():
        raise EvalError(f"checkpoint {root} does not exist; pass a run's checkpoints/ directory or one of its tags")
    if tag is None and (root / MAIN_FILE).is_file():  # a tag directory
        root, tag = root.parent, root.name
    ck = consolidate(root, tag, collective=launched())  # launched ranks hash a share of the files each
    cfg = run_config_of(ck)
    check_weights(cfg.model, ck.state_dict)
    return Checkpoint(ck, cfg, ck.path, ck.metadata.get("trainer_step", ck.global_steps))


def reference_tokenizer(cfg: Any, explicit: Optional[str]) -> Path:
    """The checkpoint's tokenizer file (tokenizer.model, else tokenizer.json): --tokenizer, else the one
    of its run config's data.path."""
    from meo_ds.data.hf_tokenizer import tokenizer_file

    if explicit:
        path = tokenizer_file(Path(explicit))
        if not path.is_file():
            raise EvalError(f"--tokenizer {explicit}: no tokenizer.model or tokenizer.json there; pass the "
                            f"checkpoint's corpus directory or its tokenizer file")
        return path
    path = tokenizer_file(Path(cfg.data.path or ""))
    if not path.is_file():
        raise EvalError(f"the checkpoint's tokenizer {path} (its run config's data.path) is missing: the corpus "
                        f"moved or was deleted; pass --tokenizer DIR (that corpus directory or its tokenizer file)")
    return path


# --------------------------------------------------------------------------- data
@dataclass
class EvalData:
    directory: Path  # a prepared corpus (the user's, or raw files tokenized into a temporary one)
    split: str
    source: list[str]  # what the user gave
    raw: bool
    temp: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)


def resolve_data(task: Any, inputs: Sequence[str], split: str, tokenizer: Path, args: argparse.Namespace) -> EvalData:
    """A prepared directory (checked: task, split, tokenizer) or raw files tokenized into a temporary one."""
    from meo_ds.data.hf_tokenizer import load_tokenizer
    from meo_ds.data.io import MANIFEST, read_manifest

    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        raise EvalError(f"--data {' '.join(missing)}: no such file or directory")
    first = Path(inputs[0])
    if len(inputs) == 1 and (first / MANIFEST).is_file():
        manifest = read_manifest(first)
        kind = manifest.get("task")
        if kind != task.PREPARE_NAME:
            raise EvalError(f"{first} is a {kind!r} corpus but the checkpoint is a {task.NAME} model; pass a corpus "
                            f"prepared with `meo-prepare {task.PREPARE_NAME}` or raw files")
        splits = list(manifest.get("splits") or {})
        if split not in splits:
            raise EvalError(f"{first} has no split {split!r}; --split one of: {', '.join(splits)}")
        shipped = (manifest.get("tokenizer") or {}).get("sha256")
        if shipped != load_tokenizer(tokenizer).checksum():
            raise EvalError(f"{first} was tokenized with another tokenizer than the checkpoint's ({tokenizer}); "
                            f"prepare it again with that tokenizer, or pass the raw files")
        return EvalData(first, split, [str(first)], raw=False)
    if first.is_dir() and not any(first.iterdir()):
        raise EvalError(f"--data {first} is an empty directory")
    temp = tempfile.TemporaryDirectory(prefix="meo-eval-")
    try:
        tokenize_files(task.PREPARE_NAME, inputs, tokenizer, Path(temp.name), args.format, args.field)
    except BaseException:
        temp.cleanup()
        raise
    return EvalData(Path(temp.name), RAW_SPLIT, [str(p) for p in inputs], raw=True, temp=temp)


RAW_SPLIT = "raw"


def tokenize_files(kind: str, inputs: Sequence[str], tokenizer: Path, out: Path, fmt: str, text_field: str) -> None:
    """Raw files -> a one-split (RAW_SPLIT) corpus in `out` that LMDataset/MTDataset read: the
    readers and tokenization of meo-prepare, every document/pair kept (as a given --valid split)."""
    from meo_ds.data.io import TokenFileWriter, token_dtype, write_manifest
    from meo_ds.data.lm import LM_FORMAT
    from meo_ds.data.mt import MT_FORMAT, _given_pairs
    from meo_ds.data.hf_tokenizer import load_tokenizer
    from meo_ds.data.prepare import check_tokenizer_for, ship_tokenizer, tokenize_chunks
    from meo_ds.data.readers import read_documents, read_pairs

    tok = load_tokenizer(tokenizer)
    check_tokenizer_for(tok, kind)
    dtype = token_dtype(tok.vocab_size)
    paths = [Path(p) for p in inputs]
    if kind == "lm":
        writer = TokenFileWriter(out, RAW_SPLIT, dtype)
        for [(flat, lengths)] in tokenize_chunks(read_documents(paths, fmt, text_field), tok.path):
            writer.add_many(flat, lengths, suffix=tok.eos_id)
        entry, fmt_name = writer.close(), LM_FORMAT
    else:
        src_w, tgt_w = TokenFileWriter(out, f"{RAW_SPLIT}.src", dtype), TokenFileWriter(out, f"{RAW_SPLIT}.tgt", dtype)
        pairs = _given_pairs(read_pairs(paths, fmt), "evaluation", paths)
        for (src, src_lens), (tgt, tgt_lens) in tokenize_chunks(pairs, tok.path):
            src_w.add_many(src, src_lens)
            tgt_w.add_many(tgt, tgt_lens)
        source, target = src_w.close(), tgt_w.close()
        if source["sequences"] == 0:
            raise EvalError(f"--data {' '.join(inputs)}: no sentence pairs")
        entry, fmt_name = {"pairs": source["sequences"], "source": source, "target": target}, MT_FORMAT
    write_manifest(out, {"format": fmt_name, "task": kind, "tokenizer": ship_tokenizer(tok, out),
                         "dtype": dtype.name, "splits": {RAW_SPLIT: entry}})


def eval_loader(task: Any, cfg: Any, data: EvalData, args: argparse.Namespace) -> Any:
    """The trainer's validation loader for one rank of one (module docstring), on `data`."""
    cfg.data.path = str(data.directory)
    if args.batch_size:
        cfg.train.micro_batch_size = args.batch_size
    if args.max_tokens:
        cfg.data.max_tokens = args.max_tokens
    try:
        return task.loader(data.split, 0, 1, shuffle=False)
    except ValueError as err:
        hint = "--batch-size" if task.NAME == "lm" else "--max-tokens"
        raise EvalError(f"{err}; lower or raise {hint}, or give more data") from err


# --------------------------------------------------------------------------- evaluation
def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_loss(model: torch.nn.Module, loader: Any, max_batches: Optional[int], device: torch.device,
                  ep: int = 1) -> dict:
    """Loss over the first max_batches batches, rank r scoring r, r+W, ...; reduced. Collective.
    With ep > 1 every rank runs the same number of forwards (evaluate.loss_sums)."""
    from meo_ds import distributed

    rank, world = rank_world()
    n = len(loader) if max_batches is None else min(len(loader), max_batches)
    forwards = -(-n // world) if ep > 1 else None
    sums = ev.loss_sums(model, loader, range(rank, n, world), device, forwards)
    figures = ev.loss_figures(*distributed.all_reduce(sums).tolist())
    return {"loss": figures["val_loss"], "ppl": figures["val_ppl"], "tokens": figures["val_tokens"], "batches": n}


BLEU_BATCH = 64  # sentences per beam search, as the trainer's bleu_chrf


def evaluate_bleu(model: torch.nn.Module, cfg: Any, dataset: Any, max_sentences: Optional[int],
                  device: torch.device, ep: int = 1) -> tuple[dict, list[str]]:
    """BLEU/chrF of the first max_sentences pairs; (scores, hypotheses in pair order) on rank 0,
    (scores, []) elsewhere. Collective. Rank r translates the blocks r, r+W, ... of BLEU_BATCH
    pairs, the batches one process would form, so every hypothesis is the one-process one (with
    capacity dispatch what an expert drops depends on the batch). With ep > 1 the blocks go to the
    expert-parallel groups instead (group q of Q: blocks q, q+Q, ...), all ranks of a group
    translating the same ones."""
    from meo_ds import distributed
    from meo_ds.parallel import expert_replica

    part, parts = expert_replica(ep) if ep > 1 else rank_world()  # blocks go to groups (ep > 1) or to ranks
    n = len(dataset) if max_sentences is None else min(len(dataset), max_sentences)
    starts = range(part * BLEU_BATCH, n, parts * BLEU_BATCH)
    mine = [i for start in starts for i in range(start, min(n, start + BLEU_BATCH))]
    hyps, refs = ev.translate_pairs(model, dataset, mine, cfg, device, BLEU_BATCH)
    all_hyps, all_refs = [""] * n, [""] * n
    for indices, h, t in distributed.all_gather_objects((mine, hyps, refs)):  # a group's ranks: the same
        for i, hyp, ref in zip(indices, h, t):
            all_hyps[i], all_refs[i] = hyp, ref
    scores = ev.corpus_scores(all_hyps, all_refs) if n else {"bleu": float("nan"), "chrf": float("nan")}
    return {**scores, "sentences": n, "beam": cfg.eval.beam_size}, all_hyps if rank_world()[0] == 0 else []


def check_options(task: str, args: argparse.Namespace) -> None:
    """Options of the other task are an error, not silently ignored."""
    other = {"lm": ("max_tokens", "beam", "max_sentences", "out_translations"),
             "translation": ("batch_size", "field")}[task]
    given = [n for n in other if getattr(args, n) not in (None, DEFAULT_FIELD if n == "field" else None)]
    if given:
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        raise EvalError(f"{names} do(es) not apply to a {task} checkpoint; drop {'it' if len(given) == 1 else 'them'}")


def check_ep(ep: int, cfg: Any) -> None:
    """--ep against the launch and the checkpoint's model (the same answer on every rank)."""
    from meo_ds.parallel import ep_size_problems

    if ep == 1:
        return
    if not launched():
        raise EvalError(f"--ep {ep} shards the experts over launched ranks; run under the launcher: deepspeed "
                        f"--num_gpus {ep} --module meo_ds.checkpoint_eval ... --ep {ep}")
    problems = ep_size_problems(ep, cfg.moe_configs(), rank_world()[1], setting="--ep")
    if problems:
        raise EvalError("; ".join(problems))


@dataclass
class Job:
    """A checked evaluation: the model, its run config and task, the data and its loader."""

    ck: Checkpoint
    task: Any
    data: EvalData
    loader: Any


def prepare(args: argparse.Namespace) -> Job:
    """Every check of the input (an error here is the user's, named before any work): checkpoint,
    options, outputs, data, loader."""
    from meo_ds.tasks import task_for

    ck = load_checkpoint(args.checkpoint, args.tag)
    task = task_for(ck.cfg)
    check_options(task.NAME, args)
    check_ep(args.ep, ck.cfg)
    for out in (args.json, args.out_translations):
        if out and not Path(out).resolve().parent.is_dir():
            raise EvalError(f"{out}: its directory does not exist")
    data = resolve_data(task, args.data, args.split, reference_tokenizer(ck.cfg, args.tokenizer), args)
    try:
        loader = eval_loader(task, ck.cfg, data, args)
    except BaseException:
        if data.temp is not None:
            data.temp.cleanup()
        raise
    if args.beam:
        ck.cfg.eval.beam_size = args.beam
    return Job(ck, task, data, loader)


def build_model(ck: Checkpoint, ep: int) -> torch.nn.Module:
    """The checkpoint's model (its weights checked by load_checkpoint) in eval mode on the CPU:
    whole (ep 1), or this rank's share of the experts of groups of `ep` ranks (module docstring).
    Collective when ep > 1."""
    from meo_ds import models
    from meo_ds.moe.experts import deferred_experts
    from meo_ds.parallel import parallelize, shard_state_dict

    with deferred_experts() if ep > 1 else contextlib.nullcontext():
        model = models.build_model(ck.cfg.model)
    if ep > 1:
        parallelize(model, ep)
    model.load_state_dict(shard_state_dict(model, ck.consolidated.state_dict))  # all of it when unsharded
    return model.eval()


def run(job: Job, args: argparse.Namespace) -> dict:
    """The evaluation of a prepared job; returns the figures (all ranks). Collective."""
    ck, task, data, loader = job.ck, job.task, job.data, job.loader
    try:
        from meo_ds.distributed import rank_device

        device = rank_device()
        model = build_model(ck, args.ep).to(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
        with torch.no_grad():
            result = {"task": task.NAME, "checkpoint": str(ck.path), "step": ck.step, "data": data.source,
                      "split": None if data.raw else data.split, "precision": args.precision,
                      "world_size": rank_world()[1], "ep": args.ep,
                      "rank_parameters": sum(p.numel() for p in model.parameters()),
                      **evaluate_loss(model, loader, args.max_batches, device, args.ep)}
            if task.NAME == "lm":
                result["batch_size"] = loader.micro_batch_size
            else:
                result["max_tokens"] = loader.max_tokens
                if args.max_sentences != 0:
                    scores, hyps = evaluate_bleu(model, ck.cfg, loader.dataset, args.max_sentences, device, args.ep)
                    result.update(scores)
                    if args.out_translations and rank_world()[0] == 0:
                        Path(args.out_translations).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    finally:
        if data.temp is not None:
            data.temp.cleanup()
    return result


def summary_line(result: dict) -> str:
    where = result["split"] or " ".join(result["data"])
    parts = ["meo-eval", result["checkpoint"], f"step {result['step']}", where]
    if "bleu" in result:
        parts += [f"bleu {result['bleu']:.2f}", f"chrf {result['chrf']:.2f}", f"sentences {result['sentences']}"]
    parts += [f"loss {result['loss']:.4f}", f"ppl {result['ppl']:.2f}", f"tokens {result['tokens']}",
              f"batches {result['batches']}"]
    return " | ".join(parts)


def report(result: dict, json_path: Optional[str]) -> None:
    """Rank 0: the one line, and the JSON file."""
    print(summary_line(result), flush=True)
    if json_path:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
        Path(json_path).write_text(json.dumps(clean, indent=2) + "\n")


def launched() -> bool:
    """Started by the deepspeed launcher (or torchrun): the environment names this rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_ranks(timeout_s: Optional[float] = None) -> int:
    """Join the launcher's ranks, every collective waiting at most timeout_s (a no-op in one
    process); this rank's number."""
    if launched():
        from meo_ds.distributed import init_distributed

        init_distributed(timeout_s)
    return int(os.environ.get("RANK", "0"))


def stop_ranks() -> None:
    if launched():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def evaluate_and_report(args: argparse.Namespace, rank: int) -> int:
    """`prepare`, `run`, then rank 0 reports; bad input is one line on rank 0 and exit status 2 on
    every rank; a failed collective one line on each surviving rank and status 4."""
    from meo_ds.checkpoint import CheckpointError
    from meo_ds.config import ConfigError
    from meo_ds.data.readers import CorpusError
    from meo_ds.distributed import describe_collective_failure
    from meo_ds.export.errors import ExportError

    try:
        job = prepare(args)
    except (ValueError, CheckpointError, ExportError, ConfigError, CorpusError, OSError, KeyError) as err:
        if rank == 0:  # every rank meets the same input, before any collective
            print(f"meo-eval: error: {err}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    try:
        result = run(job, args)  # past the checks an exception is a bug (its traceback), or a lost peer
    except RuntimeError as err:
        failure = describe_collective_failure(err, "--timeout-s")
        if failure is None:
            raise
        print(f"meo-eval: error: {failure}", file=sys.stderr, flush=True)
        return EXIT_COLLECTIVE  # no barrier or teardown: a peer is gone
    if rank == 0:
        report(result, args.json)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rank = start_ranks(args.timeout_s)
    code = evaluate_and_report(args, rank)
    if code == 0:
        stop_ranks()
    return code


def cli() -> NoReturn:
    """`meo-eval` and `python -m meo_ds.checkpoint_eval` (every launched rank): main(), then end the
    process through distributed.exit_process (why not plain sys.exit: its docstring)."""
    from meo_ds.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
