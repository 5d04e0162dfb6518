"""Perplexity in the GPTQ/AWQ-paper convention.

The split's rows are joined with "\n\n" and tokenized once (see ptq.data); the token
stream is cut into non-overlapping windows of `seqlen` tokens (a last partial window is
dropped) and every window is scored independently; PPL = exp(mean NLL over all predicted
tokens). `max_windows` keeps the first windows only, for CPU budgets.

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
from ptq.errors import NonFiniteMetric
from ptq.eval.decode import float_cache, prefill


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_scored: int
    seconds: float
    prefill_chunk: int | None = None  # None: each window in one forward


def windows_of(input_ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """[1, N] token ids -> [W, seqlen] non-overlapping windows from the start."""
    count = input_ids.shape[1] // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {input_ids.shape[1]} tokens, fewer than one window of {seqlen}")
    return input_ids[0, : count * seqlen].reshape(count, seqlen)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None,
    batch_size: int,
    make_cache: Callable[[], Cache] | None = None,
    prefill_chunk: int | None = None,
) -> PerplexityResult:
    """Score windows in batches; with `make_cache`, attention reads keys/values through that
    cache; with `prefill_chunk`, windows are fed chunk by chunk (see the module docstring)."""
    device = next(model.parameters()).device
    windows = windows_of(input_ids, seqlen, max_windows)
    total_nll = 0.0
    scored = 0
    start = time.perf_counter()
    for index, batch in enumerate(windows.split(batch_size)):
        progress.report("evaluating window", index * batch_size + len(batch), len(windows))
        batch = batch.to(device)
        if prefill_chunk is not None:
            cache = make_cache() if make_cache is not None else float_cache(model.config)
            logits = prefill(model, batch, cache, prefill_chunk, all_logits=True)
        elif make_cache is not None:
            logits = model(batch, past_key_values=make_cache(), use_cache=True).logits
        else:
            logits = model(batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total_nll += nll.item()
        scored += batch[:, 1:].numel()
    seconds = time.perf_counter() - start
    mean_nll = total_nll / scored
    # exp overflows float64 above ~709: such a model is as broken as one producing NaN.
    ppl = math.exp(mean_nll) if mean_nll < 709 else float("nan" if math.isnan(mean_nll) else "inf")
    if not math.isfinite(ppl):
        raise NonFiniteMetric(
            f"perplexity is {ppl} (mean NLL {mean_nll}): the quantized model produced NaN/inf "
            "logits or overflowed; check the method's scales and the model dtype"
        )
    return PerplexityResult(ppl, len(windows), seqlen, scored, seconds, prefill_chunk)
