"""KL divergence of a quantized model to the float model on the evaluation windows.

What llama.cpp's perplexity tool reports for its quantized models (`--kl-divergence-base`, then
`--kl-divergence`): at every predicted position, KL(P || Q) between the float model's
next-token distribution P and the quantized model's Q; their mean, percentiles, and how often
both models' most likely next token is the same ("same top p"). More sensitive than PPL, and it
sees a PPL that improved by accident (Q further from P, closer to the text by chance).

The two models are never in memory together: `float_topk` runs the float model once per
evaluation set and keeps, per predicted position, its k most likely tokens with their
log-probabilities and the log-probability of all other tokens as one "tail" bucket
(`TopKLogprobs`, saved with safetensors); `kl_divergence` then runs the quantized model on the
same windows against that store. llama.cpp stores every logit (2 bytes per vocabulary entry
per token: 98 kB a token for SmolLM2's 49k vocabulary, 1.6 GB for the CPU profile's 32 × 511
scored positions); k = 32 costs 260 bytes a token (a 4-byte id and log-prob each, plus the
tail): 4.3 MB.

The tail is handled exactly, not dropped: the KLD computed is that between P and Q both
coarse-grained to the k + 1 outcomes {top-k tokens of P, everything else}, with Q's tail mass
computed from Q's full distribution. By the log-sum inequality, merging outcomes never raises a
KL divergence, so this is a lower bound of the full KLD, equal to it when k is the vocabulary
size (no tail); what it leaves out is P's tail mass times the KL between P and Q *within* the
tail. It is never negative. (llama.cpp instead drops the tokens whose base log-probability is
below -16, which can make a token's KLD slightly negative.)

Positions are those perplexity scores: 0..T-2 of each window, predicting tokens 1..T-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache

from ptq import progress
from ptq.eval.perplexity import window_logits

DEFAULT_TOP_K = 32
FORMAT = "ptq-topk-logprobs/1"  # safetensors metadata "format" of a saved store


@dataclass(frozen=True)
class TopKLogprobs:
    """The float model's next-token distributions on a set of windows, kept as top-k + tail."""

    windows: torch.Tensor  # [W, T] token ids the float model scored
    ids: torch.Tensor  # [W, T-1, k] int32: its k most likely next tokens per position, most likely first
    logprobs: torch.Tensor  # [W, T-1, k] float32: their log-probabilities
    tail: torch.Tensor  # [W, T-1] float32: log of the probability of every other token (-inf when k = vocab)
    vocab_size: int

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def save(self, path: Path) -> None:
        save_file({"windows": self.windows.contiguous(), "ids": self.ids.contiguous(),
                   "logprobs": self.logprobs.contiguous(), "tail": self.tail.contiguous()},
                  str(path), metadata={"format": FORMAT, "vocab_size": str(self.vocab_size)})

    @classmethod
    def load(cls, path: Path) -> TopKLogprobs:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a store of top-k log-probabilities ({FORMAT}): "
                             f"its format is {metadata.get('format')!r}")
        tensors = load_file(str(path))
        return cls(tensors["windows"], tensors["ids"], tensors["logprobs"], tensors["tail"],
                   int(metadata["vocab_size"]))


@dataclass(frozen=True)
class KLDResult:
    """KL(float || quantized) per predicted token (nats), over every scored position."""

    mean: float
    median: float
    p90: float
    p99: float
    max: float
    min: float  # never below 0 but for rounding (llama.cpp's truncation can go below)
    top1_agreement: float  # share of positions where the float model's top token is the quantized one's too
    tokens: int
    k: int
    mean_tail_mass: float  # mean probability the float model puts outside its top k
    window_kld: tuple[float, ...]  # mean KLD of each window, in window order (for paired comparisons)


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, T-1, V] at the predicted positions, in float32."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _tail_in_place(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`, from the full distribution (overwrites `logprobs`)."""
    return logprobs.scatter_(-1, ids, float("-inf")).logsumexp(dim=-1)


def coarse_kld(p_top: torch.Tensor, p_tail: torch.Tensor, q_top: torch.Tensor,
               q_tail: torch.Tensor) -> torch.Tensor:
    """KL(P' || Q') per position from log-probabilities of the same k tokens ([..., k]) and of the
    rest ([...]): sum over the k + 1 outcomes of p (log p - log q), with 0 log 0 = 0. In float64,
    each side renormalized over its k + 1 outcomes first (float32 log-probabilities sum to 1 only to
    about 1e-7, which would let a near-zero KLD come out negative)."""

    def normalized(top: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        logs = torch.cat([top.double(), tail.double().unsqueeze(-1)], dim=-1)
        return logs - logs.logsumexp(dim=-1, keepdim=True)

    log_p, log_q = normalized(p_top, p_tail), normalized(q_top, q_tail)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


@torch.inference_mode()
def float_topk(model: torch.nn.Module, windows: torch.Tensor, k: int = DEFAULT_TOP_K,
               batch_size: int = 4) -> TopKLogprobs:
    """The float model's top-k log-probabilities and tail mass at every predicted position of the
    [W, T] windows (one plain forward per batch of windows)."""
    device = next(model.parameters()).device
    ids, logprobs, tails = [], [], []
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("float top-k window", index * batch_size + len(batch), len(windows))
        full = _logprobs(window_logits(model, batch.to(device)))
        if not 0 < k <= full.shape[-1]:
            raise ValueError(f"k must be between 1 and the vocabulary size {full.shape[-1]}, got {k}")
        top, top_ids = full.topk(k, dim=-1)
        tails.append(_tail_in_place(full, top_ids).cpu())
        ids.append(top_ids.int().cpu())
        logprobs.append(top.cpu())
    return TopKLogprobs(windows.cpu(), torch.cat(ids), torch.cat(logprobs), torch.cat(tails), full.shape[-1])


@torch.inference_mode()
def kl_divergence(model: torch.nn.Module, windows: torch.Tensor, store: TopKLogprobs, batch_size: int = 4,
                  make_cache: Callable[[], Cache] | None = None,
                  prefill_chunk: int | None = None) -> KLDResult:
    """KL(float || this model) on the windows `store` was computed on, read through the cell's cache
    (`make_cache`, `prefill_chunk`) as perplexity reads it."""
    if not torch.equal(windows.cpu(), store.windows):
        raise ValueError(f"the windows ({tuple(windows.shape)}) are not those the float model's top-k store "
                         f"was computed on ({tuple(store.windows.shape)}): compute it on these windows")
    device = next(model.parameters()).device
    klds, agreements = [], []
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("KLD window", index * batch_size + len(batch), len(windows))
        rows = slice(index * batch_size, index * batch_size + len(batch))
        full = _logprobs(window_logits(model, batch.to(device), make_cache, prefill_chunk))
        if full.shape[-1] != store.vocab_size:
            raise ValueError(f"the model has {full.shape[-1]} logits per token, the store {store.vocab_size}")
        ids = store.ids[rows].to(device).long()
        top = full.gather(-1, ids)
        # ties: the float model's top token agrees when it is (one of) the quantized model's most likely
        agreements.append((top[..., 0] == full.max(dim=-1).values).cpu())
        tail = _tail_in_place(full, ids)
        klds.append(coarse_kld(store.logprobs[rows], store.tail[rows], top.cpu(), tail.cpu()))
    per_token = torch.cat(klds)  # [W, T-1]
    values = per_token.flatten().numpy()
    median, p90, p99 = np.quantile(values, [0.5, 0.9, 0.99])  # interpolated linearly, as llama.cpp does
    return KLDResult(mean=float(values.mean()), median=float(median), p90=float(p90), p99=float(p99),
                     max=float(values.max()), min=float(values.min()),
                     top1_agreement=float(torch.cat(agreements).double().mean()),
                     tokens=values.size, k=store.k, mean_tail_mass=float(store.tail.double().exp().mean()),
                     window_kld=tuple(per_token.mean(dim=1).tolist()))
