"""Running a model through a KV cache: chunked prefill, greedy decoding, and the cache's
cost per token. Shared by chunked-prefill perplexity, the passkey probe and decode speed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache

from ptq.kv import cache_bytes, kv_elements

CacheFactory = Callable[[], Cache]


def float_cache(model_config) -> Cache:
    """The unquantized cache the model makes for itself (a sliding-window layer keeps its window):
    what every quantized cache is compared with."""
    return DynamicCache(config=model_config)


@torch.inference_mode()
def prefill(model: torch.nn.Module, ids: torch.Tensor, cache: Cache, chunk: int, all_logits: bool) -> torch.Tensor:
    """Feed `ids` [batch, tokens] in chunks of `chunk` tokens; each chunk attends to the earlier
    ones only through `cache`. Returns the logits of every position, or of the last one (then the
    LM head sees each chunk's last position alone: a fifth of the forward's multiply-adds for
    SmolLM2's 49k vocabulary, spent on logits nobody reads)."""
    parts = []
    keep = {} if all_logits else {"logits_to_keep": 1}
    for start in range(0, ids.shape[1], chunk):
        forward = model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True, **keep)
        parts.append(forward.logits)
    return torch.cat(parts, dim=1) if all_logits else parts[-1]


@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor  # [batch, steps + 1]: the token chosen after the prompt, then one per step
    seconds: float  # wall time of the `steps` decoding forwards (prefill excluded)


@torch.inference_mode()
def greedy_decode(model: torch.nn.Module, cache: Cache, last_logits: torch.Tensor, steps: int) -> Decoded:
    """Greedy decoding after a prefill whose last logits are `last_logits` [batch, 1, vocab]."""
    token = last_logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    device = token.device
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Decoded(torch.cat(tokens, dim=1), time.perf_counter() - start)


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, prompt: torch.Tensor, make_cache: CacheFactory, chunk: int,
                 steps: int) -> dict[str, float | int]:
    """Greedy decoding of `steps` tokens after a chunked prefill of `prompt` [1, tokens]; the
    cache's stored bytes per token are read at the end, with prompt and decoded tokens in it."""
    cache = make_cache()
    decoded = greedy_decode(model, cache, prefill(model, prompt, cache, chunk, all_logits=False), steps)
    tokens = cache.get_seq_length()
    elements = kv_elements(model.config, tokens)  # what the float cache holds at this length
    stored = cache_bytes(cache)
    return {
        "decode_tokens_per_s": steps / decoded.seconds,
        "decode_steps": steps,
        "prompt_tokens": int(prompt.shape[1]),
        "bytes_per_token": stored / tokens,
        "float_bytes_per_token": elements * next(model.parameters()).element_size() / tokens,
        "bits_per_element": stored * 8 / elements,
        "measured_at_tokens": tokens,
    }
