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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

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


def window_logits(model: torch.nn.Module, batch: torch.Tensor, make_cache: Callable[[], Cache] | None = None,
                  prefill_chunk: int | None = None) -> torch.Tensor:
    """Logits [B, T, V] of a batch of windows: one forward, through a fresh cache from `make_cache`
    when given, or chunk by chunk through such a cache (a float one by default) with `prefill_chunk`."""
    if prefill_chunk is not None:
        cache = make_cache() if make_cache is not None else float_cache(model.config)
        return prefill(model, batch, cache, prefill_chunk, all_logits=True)
    if make_cache is not None:
        return model(batch, past_key_values=make_cache(), use_cache=True).logits
    return model(batch, use_cache=False).logits


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
    `source` names the text in errors; `on_logits(batch, logits)` sees each batch's logits (KLD)."""
    device = next(model.parameters()).device
    windows = windows_of(input_ids, seqlen, max_windows, allow_fewer_windows, source)
    window_sums: list[torch.Tensor] = []
    start = time.perf_counter()
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("evaluating window", index * batch_size + len(batch), len(windows))
        batch = batch.to(device)
        logits = window_logits(model, batch, make_cache, prefill_chunk)
        if on_logits is not None:
            on_logits(batch, logits)
        token_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                    reduction="none")
        window_sums.append(token_nll.view(len(batch), -1).double().sum(dim=1).cpu())
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
