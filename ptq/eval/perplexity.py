"""Perplexity in the GPTQ/AWQ-paper convention.

The split's rows are joined with "\n\n" and tokenized once (see ptq.data); the token
stream is cut into non-overlapping windows of `seqlen` tokens (a last partial window is
dropped) and every window is scored independently; PPL = exp(mean NLL over all predicted
tokens). `max_windows` keeps the first windows only, for CPU budgets; a text that holds fewer
(a truncated file) is an error unless fewer are allowed. Each window's mean NLL is kept, so two
models scored on the same windows can be compared window by window (ptq.stats).

With `prefill_chunk`, each window is fed in chunks of that many tokens through a fresh cache
(the cell's, or a float one), so every chunk attends to the earlier ones only through what the
cache stored: the protocol for KV-cache quantization. With a float cache it scores exactly
what the one-shot forward scores.

The decoder runs on a batch of windows, the LM head on one window at a time (`window_logits`),
so memory holds one window's full-vocabulary logits, not the batch's; before the first batch the
split is checked against the model's own forward on the start of the first window.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ptq import progress
from ptq.errors import NonFiniteMetric, TooFewWindows
from ptq.eval.decode import float_cache, prefill


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_scored: int
    seconds: float
    prefill_chunk: int | None = None  # None: each window in one forward
    window_nll: tuple[float, ...] = ()  # each window's mean NLL, in window order; ppl = exp(their mean)


def windows_of(input_ids: torch.Tensor, seqlen: int, max_windows: int | None, allow_fewer: bool = False,
               source: str = "the evaluation text") -> torch.Tensor:
    """[1, N] token ids -> [W, seqlen] non-overlapping windows from the start. Fewer than
    `max_windows` (when set) is an error unless `allow_fewer`; none at all always is."""
    tokens = input_ids.shape[1]
    available = tokens // seqlen
    count = available if max_windows is None else min(available, max_windows)
    if count == 0 or (max_windows is not None and count < max_windows and not allow_fewer):
        raise TooFewWindows(
            f"{source} has {tokens} tokens: {available} window(s) of {seqlen}, fewer than the "
            f"{max_windows if max_windows is not None else 1} to score (eval.max_windows). Is the data file "
            "truncated? Restore it"
            + ("" if count == 0 else f", or set eval.allow_fewer_windows: true to score {count}"))
    return input_ids[0, : count * seqlen].reshape(count, seqlen)


def batch_logits(model: torch.nn.Module, batch: torch.Tensor, make_cache: Callable[[], Cache] | None = None,
                 prefill_chunk: int | None = None) -> torch.Tensor:
    """Logits [B, T, V] of a batch of windows: one forward, through a fresh cache from `make_cache`
    when given, or chunk by chunk through such a cache (a float one by default) with `prefill_chunk`."""
    if prefill_chunk is not None:
        cache = make_cache() if make_cache is not None else float_cache(model.config)
        return prefill(model, batch, cache, prefill_chunk, all_logits=True)
    if make_cache is not None:
        return model(batch, past_key_values=make_cache(), use_cache=True).logits
    return model(batch, use_cache=False).logits


@dataclass(frozen=True)
class SplitModel:
    """A causal LM as its decoder (to the final norm) and its LM head, as its forward composes
    them (with Gemma's final soft-capping of the logits)."""

    decoder: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> SplitModel | None:
        """None for a model that does not expose both parts (transformers' get_decoder and
        get_output_embeddings)."""
        decoder = getattr(model, "get_decoder", lambda: None)()
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if decoder is None or head is None or decoder is model:
            return None
        return cls(decoder, head, getattr(model.config, "final_logit_softcapping", None))

    def hidden(self, batch: torch.Tensor, make_cache: Callable[[], Cache] | None,
               prefill_chunk: int | None, config: object) -> torch.Tensor:
        """The decoder's output [B, T, d] for the batch, fed as `batch_logits` feeds the model."""
        if prefill_chunk is None:
            cached = {"past_key_values": make_cache(), "use_cache": True} if make_cache \
                else {"use_cache": False}
            return self.decoder(input_ids=batch, **cached).last_hidden_state
        cache = make_cache() if make_cache is not None else float_cache(config)
        return torch.cat([self.decoder(input_ids=chunk, past_key_values=cache, use_cache=True)
                          .last_hidden_state for chunk in batch.split(prefill_chunk, dim=1)], dim=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# how far the split model's logits may be from its forward's on the same input: the two may
# order the head's sums differently (other matmul shapes), nothing more
SPLIT_TOLERANCE = 1e-4
CHECK_TOKENS = 64  # what the check feeds both ways: a causal model's logits there need no more
# Positions whose full-vocabulary log-probabilities exist at once (the loss, the KLD, the top-k
# store): each is a row of its own, so a window a part at a time gives the same numbers, and a
# window's temporaries are a part's (128 x 49k floats, 25 MB) instead of the window's.
POSITIONS = 128


def position_spans(count: int) -> list[slice]:
    """`count` positions as consecutive spans of at most POSITIONS."""
    return [slice(start, min(start + POSITIONS, count)) for start in range(0, count, POSITIONS)]


def window_logits(model: torch.nn.Module, batch: torch.Tensor, make_cache: Callable[[], Cache] | None = None,
                  prefill_chunk: int | None = None, check: bool = False) -> Iterator[torch.Tensor]:
    """Logits [1, T, V] of each window of the batch, in order, computed as `batch_logits` computes
    them, but with the LM head applied one window at a time: a batch's full-vocabulary logits never
    exist at once (8 windows of 2048 tokens with a 128k vocabulary are 8 GB in float32). With
    `check`, the split is first compared with the model's own forward on the start of the first
    window (two short forwards more); a model whose forward is not its decoder then its head fails
    loudly."""
    split = SplitModel.of(model)
    if split is None:
        yield from batch_logits(model, batch, make_cache, prefill_chunk).split(1)
        return
    if check:
        # on the same input: with per-tensor dynamic activation scales a window's logits depend on
        # the other windows of its batch
        first = batch[:1, :CHECK_TOKENS]
        _check_split(model, split.logits(split.hidden(first, make_cache, prefill_chunk, model.config)),
                     batch_logits(model, first, make_cache, prefill_chunk))
    hidden = split.hidden(batch, make_cache, prefill_chunk, model.config)
    for row in hidden.split(1):
        yield split.logits(row)


def _check_split(model: torch.nn.Module, logits: torch.Tensor, whole: torch.Tensor) -> None:
    finite = torch.isfinite(whole)  # a broken model's NaNs are for the metrics to report
    scale = max(whole[finite].abs().max().item(), 1e-30) if finite.any() else 1.0
    error = (logits - whole)[finite].abs().max().item() / scale if finite.any() else 0.0
    if not (torch.equal(torch.isfinite(logits), finite) and error <= SPLIT_TOLERANCE):
        raise RuntimeError(f"{type(model).__name__}: its decoder then LM head give logits {error:.2e} "
                           "(relative) from its forward's on the same window: its forward does more than "
                           "that; ptq.eval.perplexity.SplitModel must learn it")


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None,
    batch_size: int,
    make_cache: Callable[[], Cache] | None = None,
    prefill_chunk: int | None = None,
    allow_fewer_windows: bool = False,
    source: str = "the evaluation text",
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> PerplexityResult:
    """Score windows in batches; with `make_cache`, attention reads keys/values through that
    cache; with `prefill_chunk`, windows are fed chunk by chunk (see the module docstring).
    `source` names the text in errors; `on_logits(window, logits)` sees each window's logits
    ([1, T] and [1, T, V], in order: the KLD)."""
    device = next(model.parameters()).device
    windows = windows_of(input_ids, seqlen, max_windows, allow_fewer_windows, source)
    window_sums: list[torch.Tensor] = []
    start = time.perf_counter()
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("evaluating window", index * batch_size + len(batch), len(windows))
        batch = batch.to(device)
        rows = window_logits(model, batch, make_cache, prefill_chunk, check=index == 0)
        for row, logits in enumerate(rows):
            window = batch[row : row + 1]
            if on_logits is not None:
                on_logits(window, logits)
            targets = window[0, 1:]
            token_nll = torch.cat([F.cross_entropy(logits[0, span].float(), targets[span], reduction="none")
                                   for span in position_spans(logits.shape[1] - 1)])
            window_sums.append(token_nll.double().sum().reshape(1).cpu())
    seconds = time.perf_counter() - start
    sums = torch.cat(window_sums)
    per_window = seqlen - 1  # predicted tokens per window
    scored = per_window * len(windows)
    mean_nll = sums.sum().item() / scored
    # exp overflows float64 above ~709: such a model is as broken as one producing NaN.
    ppl = math.exp(mean_nll) if mean_nll < 709 else float("nan" if math.isnan(mean_nll) else "inf")
    if not math.isfinite(ppl):
        raise NonFiniteMetric(
            f"perplexity is {ppl} (mean NLL {mean_nll}): the model produced NaN/inf logits or overflowed"
        )
    return PerplexityResult(ppl, len(windows), seqlen, scored, seconds, prefill_chunk,
                            tuple((sums / per_window).tolist()))
