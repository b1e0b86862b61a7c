"""Evaluation: validation loss/perplexity (LM and translation) and BLEU/chrF with beam search.

Which of these a run computes is its task's choice (meo_ds/tasks.py: Task.evaluate runs
`validation_loss`, and for translation `bleu_chrf`, inside `evaluation_mode`).

All functions are collective: every rank calls them. Validation batches are split over the
ranks; their token-weighted losses are summed on the device and reduced once, through
meo_ds.distributed.all_reduce, at the end. Beam search runs the same
sentences on every rank (with expert parallelism every rank must take part in every forward,
and identical inputs make every rank stop at the same step); rank 0 scores them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch

from meo_ds import distributed
from meo_ds.config import RunConfig
from meo_ds.data.batch import model_inputs, target_tokens
from meo_ds.data.mt import MTDataset


@contextmanager
def evaluation_mode(engine: Any) -> Iterator[None]:
    """The model in eval mode without gradients; its training mode comes back afterwards."""
    was_training = engine.module.training
    engine.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            engine.train()


def validation_loss(engine: Any, loader: Any, max_batches: int, device: torch.device) -> dict:
    """Token-weighted mean cross-entropy (not label-smoothed) over the first `max_batches`
    validation batches of every rank, and its perplexity."""
    sums = loss_sums(engine, loader, range(min(len(loader), max_batches)), device)
    return loss_figures(*distributed.all_reduce(sums).tolist())


def loss_sums(model: Any, loader: Any, steps: Iterable[int], device: torch.device,
              forwards: Optional[int] = None) -> torch.Tensor:
    """[sum over `steps` (batches of the loader's first epoch) of batch mean NLL x its target tokens,
    target tokens] as one float64 tensor on `device`: this rank's part of a token-weighted mean.

    `forwards`: run exactly that many forwards (>= len(steps)); the ones past `steps` run the
    loader's first batch and count nothing. Expert parallelism needs it where ranks score unequal
    numbers of batches: every rank of an expert-parallel group takes part in every forward."""
    steps = list(steps)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_sum = 0
    for i in range(len(steps) if forwards is None else forwards):
        batch = loader.batch(0, steps[i] if i < len(steps) else 0)
        out = model(**model_inputs(batch, device, loader.MODEL_INPUTS))
        if i < len(steps):
            tokens = target_tokens(batch)
            nll_sum += out.nll_loss.detach().double() * tokens
            token_sum += tokens
    return torch.stack([nll_sum, nll_sum.new_full((), token_sum)])


def loss_figures(total_nll: float, total_tokens: float) -> dict:
    """Mean loss, its perplexity and the tokens of the ranks' reduced `loss_sums`."""
    loss = total_nll / total_tokens if total_tokens > 0 else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total_tokens)}


def bleu_chrf(model: torch.nn.Module, cfg: RunConfig, device: torch.device, batch_size: int = 64) -> dict:
    """sacrebleu BLEU and chrF of beam-search translations of the first N validation pairs."""
    dataset = MTDataset(cfg.data.path, cfg.data.val_split)
    n = min(len(dataset), cfg.eval.bleu_sentences)
    hyps, refs = translate_pairs(model, dataset, range(n), cfg, device, batch_size)
    samples = [{"hyp": h, "ref": r} for h, r in list(zip(hyps, refs))[:3]]
    return {**corpus_scores(hyps, refs), "bleu_sentences": n, "samples": samples}


def translate_pairs(model: torch.nn.Module, dataset: MTDataset, indices: Iterable[int], cfg: RunConfig,
                    device: torch.device, batch_size: int = 64) -> tuple[list[str], list[str]]:
    """Beam-search translations of the pairs `indices` of `dataset` (cfg.eval's beam settings) and
    their references, both decoded to text with the corpus's tokenizer."""
    tok = dataset.tokenizer()
    indices = list(indices)
    hyps, refs = [], []
    for start in range(0, len(indices), batch_size):
        pairs = [dataset.pair(i) for i in indices[start:start + batch_size]]
        src_ids, src_mask = source_batch([s for s, _ in pairs], tok.eos_id, tok.pad_id)
        out = translate(model, src_ids.to(device), src_mask.to(device), cfg, tok)
        hyps += [tok.decode(strip_special(ids, tok)) for ids in out]
        refs += [tok.decode([int(t) for t in tgt]) for _, tgt in pairs]
    return hyps, refs


def corpus_scores(hyps: list[str], refs: list[str]) -> dict:
    """sacrebleu corpus BLEU and chrF of hypotheses against one reference each."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score)}


def source_batch(sources: list, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids (+ eos) padded to one tensor, and the mask (True = real token)."""
    lens = [len(s) + 1 for s in sources]
    ids = torch.full((len(sources), max(lens)), pad_id, dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, : len(s)] = torch.as_tensor([int(t) for t in s], dtype=torch.long)
        ids[i, len(s)] = eos_id
    mask = torch.arange(ids.shape[1]) < torch.as_tensor(lens)[:, None]
    return ids, mask


def strip_special(ids: Any, tok: Any) -> list[int]:
    """Token ids up to the first eos, without bos/pad, ready to decode. A model vocabulary may be
    larger than the tokenizer's (padded, or a preset's size); ids the tokenizer lacks become unk,
    so they count as errors in BLEU instead of failing the decode."""
    out = []
    for t in (ids.tolist() if torch.is_tensor(ids) else ids):
        if t == tok.eos_id:
            break
        if t not in (tok.bos_id, tok.pad_id):
            out.append(int(t) if t < tok.vocab_size else tok.unk_id)
    return out


def translate(model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor, cfg: RunConfig, tok: Any) -> list:
    """Beam-search translations (one id list per source) with the eval section's settings."""
    from meo_ds.models.generation import translate as beam_translate

    return beam_translate(model, src_ids, src_mask, bos_id=tok.bos_id, eos_id=tok.eos_id, beam_size=cfg.eval.beam_size,
                          max_new_tokens=cfg.eval.max_new_tokens, length_penalty=cfg.eval.length_penalty)
