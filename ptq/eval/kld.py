"""KL divergence of a quantized model to the float model on the evaluation windows.

What llama.cpp's perplexity tool reports for its quantized models (`--kl-divergence-base`, then
`--kl-divergence`): at every predicted position, KL(P || Q) between the float model's
next-token distribution P and the quantized model's Q; their mean, percentiles, and how often
both models' most likely next token is the same ("same top p"). More sensitive than PPL, and it
sees a PPL that improved by accident (Q further from P, closer to the text by chance).

The two models are never in memory together: `float_topk` runs the float model once per
evaluation set and stores, per predicted position, a compact description of P (`TopKLogprobs`,
saved with safetensors); `kl_divergence` then runs the quantized model on the same windows
against it. llama.cpp stores every logit instead (2 bytes per vocabulary entry per token: 98 kB
a token for SmolLM2's 49k vocabulary, 1.6 GB for the CPU profile's 32 × 511 scored positions).

What is stored, and how the tail is handled. With T the k tokens P finds most likely and R
the rest (the tail), KL(P || Q) splits exactly into

    KL(P' || Q')  +  P(R) · KL(P_R || Q_R)

where P', Q' are P and Q coarse-grained to the k + 1 outcomes {each token of T, R} and P_R, Q_R
are P and Q restricted to R and renormalized. The first term is computed exactly from the
stored top-k log-probabilities and log P(R), and from Q's full distribution (Q(R) included).
The second is estimated without bias from `samples` tokens drawn from P_R (seeded), stored with
their log-probabilities: the mean over them of log P_R(x) - log Q_R(x). So each position's value
is an unbiased estimate of its KLD, and the mean over thousands of positions is precise (its
tail part averages over tokens x samples). With `samples = 0` the first term alone is kept: a
lower bound of the KLD (merging outcomes never raises a KL divergence), never negative; with
k = vocabulary size there is no tail and the value is exact.

Measured on smollm2-135m, RTN W4 g128 against the float model, 8 WikiText-2 windows of 512
tokens (mean KLD 0.4125 with the full vocabulary): the first term alone holds 60% of it at
k = 8, 74% at k = 32, 85% at k = 128, 96% at k = 1024 (P's mass outside its top 32: 19%). So the
default keeps k = 32 (ids and log-probs) and adds 16 tail samples: (32 + 16) x 8 + 4 = 388
bytes a token, 6.3 MB for the CPU profile.

Positions are those perplexity scores: 0..T-2 of each window, predicting tokens 1..T-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache

from ptq import progress
from ptq.eval.perplexity import position_spans, window_logits

DEFAULT_TOP_K = 32
DEFAULT_TAIL_SAMPLES = 16
FORMAT = "ptq-topk-logprobs/2"  # safetensors metadata "format" of a saved store
STORED = ("windows", "ids", "logprobs", "tail", "samples", "sample_logprobs")


@dataclass(frozen=True)
class TopKLogprobs:
    """The float model's next-token distributions on a set of windows: top k, tail mass, tail samples."""

    windows: torch.Tensor  # [W, T] token ids the float model scored
    ids: torch.Tensor  # [W, T-1, k] int32: its k most likely next tokens per position, most likely first
    logprobs: torch.Tensor  # [W, T-1, k] float32: their log-probabilities
    tail: torch.Tensor  # [W, T-1] float32: log of the probability of all other tokens (-inf when k = vocab)
    samples: torch.Tensor  # [W, T-1, m] int32: tokens drawn from the distribution restricted to the tail
    sample_logprobs: torch.Tensor  # [W, T-1, m] float32: their log-probabilities (unrestricted)
    vocab_size: int
    seed: int  # of the draws

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def save(self, path: Path) -> None:
        save_file({name: getattr(self, name).contiguous() for name in STORED}, str(path),
                  metadata={"format": FORMAT, "vocab_size": str(self.vocab_size), "seed": str(self.seed)})

    @classmethod
    def load(cls, path: Path) -> TopKLogprobs:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a store of top-k log-probabilities ({FORMAT}): "
                             f"its format is {metadata.get('format')!r}")
        tensors = load_file(str(path))
        return cls(*(tensors[name] for name in STORED), int(metadata["vocab_size"]), int(metadata["seed"]))


@dataclass(frozen=True)
class KLDResult:
    """KL(float || quantized) per predicted token (nats), over every scored position."""

    mean: float
    mean_stderr: float  # of the mean, positions taken as independent (as llama.cpp reports it)
    median: float
    p90: float
    p99: float
    max: float
    min: float  # can be slightly negative: a position's tail part is an estimate
    top1_agreement: float  # share of positions where the float model's top token is the quantized one's too
    tokens: int
    k: int
    tail_samples: int
    mean_top_k_bound: float  # the mean of the exact first term alone: a lower bound of `mean`'s target
    mean_tail_mass: float  # mean probability the float model puts outside its top k
    window_kld: tuple[float, ...]  # mean KLD of each window, in window order (for paired comparisons)


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [B, P, V] of logits [B, P, V] (predicted positions), in float32."""
    return torch.log_softmax(logits.float(), dim=-1)


def _tail_in_place(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`, from the full distribution; `logprobs` keeps only the
    tail's entries afterwards (the others become -inf)."""
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


def tail_kld(p_tail: torch.Tensor, p_samples: torch.Tensor, q_tail: torch.Tensor,
             q_samples: torch.Tensor) -> torch.Tensor:
    """P(R) · KL(P_R || Q_R) per position, estimated from m tokens drawn from P_R: P(R) times the
    mean of log P_R(x) - log Q_R(x), where log P_R(x) = log p(x) - log P(R) (likewise for Q).
    Zero when nothing was drawn or P(R) = 0. In float64."""
    if p_samples.shape[-1] == 0:
        return torch.zeros(p_tail.shape, dtype=torch.float64)
    p_tail, p_samples, q_tail, q_samples = (x.double() for x in (p_tail, p_samples, q_tail, q_samples))
    within = ((p_samples - p_tail.unsqueeze(-1)) - (q_samples - q_tail.unsqueeze(-1))).mean(dim=-1)
    mass = p_tail.exp()
    return torch.where(mass > 0, mass * within, torch.zeros_like(mass))


class FloatTopK:
    """The float model's top-k store of windows, built from each window's logits as a pass
    produces them, in window order: `float_topk`'s own forward, or the FP baseline's perplexity
    pass over the same windows, which then needs no forward of its own. The tail draws come from
    one seeded generator, window by window (what one draw over a batch gives, too)."""

    def __init__(self, k: int = DEFAULT_TOP_K, samples: int = DEFAULT_TAIL_SAMPLES, seed: int = 0) -> None:
        self.k, self.samples, self.seed = k, samples, seed
        self.generator: torch.Generator | None = None  # on the logits' device, at the first window
        self.windows: list[torch.Tensor] = []
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in STORED[1:]}
        self.vocab = 0
        self.nan_windows = 0  # windows with NaN logits: a broken model, whose perplexity fails the pass

    @torch.inference_mode()
    def add(self, window: torch.Tensor, logits: torch.Tensor) -> None:
        """One window [1, T] and its logits [1, T, V], a span of predicted positions at a time (the
        tail draws too: position after position, as over the whole window)."""
        if window.shape[0] != 1:
            raise ValueError(f"one window at a time (its draws follow its positions), got {window.shape[0]}")
        self.vocab = logits.shape[-1]
        if not 0 < self.k <= self.vocab or self.samples < 0:
            raise ValueError(f"k must be between 1 and the vocabulary size {self.vocab}, and samples >= 0; "
                             f"got k={self.k}, samples={self.samples}")
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        parts = [self._positions(logits[:, span]) for span in position_spans(logits.shape[1] - 1)]
        if any(part is None for part in parts):  # nothing to draw from; the pass's perplexity reports NaNs
            self.nan_windows += 1
            return
        for name, values in zip(STORED[1:], zip(*parts)):
            self.parts[name].append(torch.cat(values, dim=1).cpu())
        self.windows.append(window.cpu())

    def _positions(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The stored values (STORED[1:]) at some predicted positions; None with NaN logits."""
        full = _logprobs(logits)
        top, top_ids = full.topk(self.k, dim=-1)
        tail = _tail_in_place(full, top_ids)  # `full` now holds the tail's log-probabilities only
        if torch.isnan(tail).any():
            return None
        draws = self.samples if self.k < self.vocab else 0
        if draws:
            weights = (full - tail.unsqueeze(-1)).exp_()  # P restricted to the tail, normalized
            drawn = torch.multinomial(weights.flatten(0, 1), draws, replacement=True,
                                      generator=self.generator)
            drawn = drawn.view(*tail.shape, draws)
        else:
            drawn = torch.zeros(*tail.shape, 0, dtype=torch.long, device=full.device)
        return top_ids.int(), top, tail, drawn.int(), full.gather(-1, drawn)

    def store(self) -> TopKLogprobs:
        if self.nan_windows:
            raise ValueError(f"{self.nan_windows} windows had NaN logits: there is no top-k store of them")
        stored = {name: torch.cat(values) for name, values in self.parts.items()}
        return TopKLogprobs(torch.cat(self.windows), **stored, vocab_size=self.vocab, seed=self.seed)


@torch.inference_mode()
def float_topk(model: torch.nn.Module, windows: torch.Tensor, k: int = DEFAULT_TOP_K,
               samples: int = DEFAULT_TAIL_SAMPLES, batch_size: int = 4, seed: int = 0) -> TopKLogprobs:
    """What `kl_divergence` needs of the float model at every predicted position of the [W, T]
    windows (one plain forward per batch of windows): its top-k log-probabilities, the log of its
    tail mass, and `samples` seeded draws from its tail (none when k is the vocabulary size)."""
    device = next(model.parameters()).device
    collector = FloatTopK(k, samples, seed)
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("float top-k window", index * batch_size + len(batch), len(windows))
        batch = batch.to(device)
        for row, logits in enumerate(window_logits(model, batch, check=index == 0)):
            collector.add(batch[row : row + 1], logits)
    return collector.store()


class KLDivergence:
    """KL(float || a model) accumulated from that model's logits on the windows `store` was
    computed on, batch by batch as an evaluation produces them (no forward of its own)."""

    def __init__(self, store: TopKLogprobs) -> None:
        self.store = store
        self.bounds: list[torch.Tensor] = []
        self.tails: list[torch.Tensor] = []
        self.agreements: list[torch.Tensor] = []
        self.next_row = 0

    @torch.inference_mode()
    def add(self, batch: torch.Tensor, logits: torch.Tensor) -> None:
        """The logits [B, T, V] of the next `batch` [B, T] of windows (one window at a time in an
        evaluation), in window order."""
        store, rows = self.store, slice(self.next_row, self.next_row + len(batch))
        if not torch.equal(batch.cpu(), store.windows[rows]):
            raise ValueError(f"windows {rows.start}..{rows.stop - 1} are not those the float model's top-k store "
                             f"was computed on ({tuple(store.windows.shape)}): compute it on these windows")
        if logits.shape[-1] != store.vocab_size:
            raise ValueError(f"the model has {logits.shape[-1]} logits per token, "
                             f"the store {store.vocab_size}")
        parts = [self._positions(logits[:, span], rows, span) for span in position_spans(logits.shape[1] - 1)]
        for kept, values in zip((self.agreements, self.bounds, self.tails), zip(*parts)):
            kept.append(torch.cat(values, dim=1))
        self.next_row = rows.stop

    def _positions(self, logits: torch.Tensor, rows: slice, span: slice) -> tuple[torch.Tensor, ...]:
        """Top-1 agreement, the coarse KLD and the tail term at the predicted positions `span` of the
        windows `rows`, from their logits."""
        store = self.store
        full = _logprobs(logits)
        ids = store.ids[rows, span].to(full.device).long()
        top = full.gather(-1, ids).cpu()
        sampled = full.gather(-1, store.samples[rows, span].to(full.device).long()).cpu()
        # ties: the float model's top token agrees when it is (one of) the quantized model's most likely
        agreement = top[..., 0] == full.max(dim=-1).values.cpu()
        tail = _tail_in_place(full, ids).cpu()
        return (agreement, coarse_kld(store.logprobs[rows, span], store.tail[rows, span], top, tail),
                tail_kld(store.tail[rows, span], store.sample_logprobs[rows, span], tail, sampled))

    def result(self) -> KLDResult:
        store = self.store
        if self.next_row != len(store.windows):
            raise ValueError(f"{self.next_row} of the store's {len(store.windows)} windows were scored")
        bound = torch.cat(self.bounds)  # [W, T-1]
        per_token = bound + torch.cat(self.tails)
        values = per_token.flatten().numpy()
        median, p90, p99 = np.quantile(values, [0.5, 0.9, 0.99])  # interpolated linearly, as llama.cpp does
        stderr = math.sqrt(values.var(ddof=1) / values.size) if values.size > 1 else 0.0
        return KLDResult(mean=float(values.mean()), mean_stderr=stderr, median=float(median), p90=float(p90),
                         p99=float(p99), max=float(values.max()), min=float(values.min()),
                         top1_agreement=float(torch.cat(self.agreements).double().mean()), tokens=values.size,
                         k=store.k, tail_samples=store.samples.shape[-1], mean_top_k_bound=float(bound.mean()),
                         mean_tail_mass=float(store.tail.double().exp().mean()),
                         window_kld=tuple(per_token.mean(dim=1).tolist()))


@torch.inference_mode()
def kl_divergence(model: torch.nn.Module, windows: torch.Tensor, store: TopKLogprobs, batch_size: int = 4,
                  make_cache: Callable[[], Cache] | None = None,
                  prefill_chunk: int | None = None) -> KLDResult:
    """KL(float || this model) on the windows `store` was computed on, read through the cell's cache
    (`make_cache`, `prefill_chunk`) as perplexity reads it: one forward per batch of windows."""
    device = next(model.parameters()).device
    divergence = KLDivergence(store)
    if windows.shape != store.windows.shape:
        raise ValueError(f"the windows ({tuple(windows.shape)}) are not those the float model's top-k store "
                         f"was computed on ({tuple(store.windows.shape)}): compute it on these windows")
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("KLD window", index * batch_size + len(batch), len(windows))
        for row, logits in enumerate(window_logits(model, batch.to(device), make_cache, prefill_chunk)):
            divergence.add(batch[row : row + 1], logits)
    return divergence.result()
