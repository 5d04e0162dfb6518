"""Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"): a five-digit key hidden
at some depth of repetitive filler, asked for at the end. The prompt is prefilled through the
cell's cache in chunks and the answer decoded greedily, so every token of the key is read back
through the (quantized) cache.

The trials' prompts begin alike (the same filler up to each needle), so whole chunks they have in
common are prefilled once (`shared_prefills`): on smollm2's six default trials 9,168 prompt tokens
become 5,968."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from ptq.eval.decode import CacheFactory, greedy_decode, prefill
from ptq.kv import QuantizedKVCache

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # enough for " 12345." with any tokenizer splitting digits


@dataclass(frozen=True)
class PasskeyTrial:
    length: int  # requested prompt length in tokens
    depth: float  # where the needle sits, as a fraction of the filler
    key: int


def trials(lengths: tuple[int, ...], per_length: int, seed: int) -> list[PasskeyTrial]:
    """Seeded keys and depths: the same trials for every cell of a run and across runs."""
    rng = random.Random(seed)
    return [PasskeyTrial(length, rng.uniform(0.05, 0.95), rng.randrange(10_000, 100_000))
            for length in lengths for _ in range(per_length)]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, trial: PasskeyTrial) -> torch.Tensor:
    """The trial's prompt, with as many filler repeats as fit in `trial.length` tokens."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    fixed = count(INTRO + NEEDLE.format(key=trial.key) + QUESTION)
    repeats = max(1, (trial.length - fixed) // count(FILLER))
    before = round(trial.depth * repeats)
    text = INTRO + FILLER * before + NEEDLE.format(key=trial.key) + FILLER * (repeats - before) + QUESTION
    return tokenizer(text, return_tensors="pt").input_ids


# The caches whose deep copies are exact (tests/test_kv.py); not transformers' QuantizedCache, whose
# quanto backend stores packed tensors that cannot be copied.
COPYABLE = (DynamicCache, QuantizedKVCache)


@torch.inference_mode()
def shared_prefills(model: torch.nn.Module, prompts: list[torch.Tensor], make_cache: CacheFactory,
                    chunk: int) -> Iterator[tuple[int, Cache, torch.Tensor]]:
    """For each prompt [1, tokens] (by index, in an order of its own): its cache and last logits after
    a chunked prefill, exactly as `prefill` into a fresh cache gives them. Prompts that begin with the
    same whole chunks (a prompt's last chunk aside) have those prefilled once, in a cache that copies
    exactly (COPYABLE): a copy of the cache at a chunk boundary is what each prompt's own prefill
    builds there (the same chunks, through the same computations). The caller may extend a yielded
    cache (decode) before taking the next."""
    cache = make_cache()
    if isinstance(cache, COPYABLE):
        chunks = [list(ids.split(chunk, dim=1)) for ids in prompts]
        yield from _descend(model, chunks, list(range(len(prompts))), 0, cache, chunk)
        return
    for index, ids in enumerate(prompts):
        own = cache if index == 0 else make_cache()
        yield index, own, prefill(model, ids, own, chunk, all_logits=False)


def _descend(model: torch.nn.Module, chunks: list[list[torch.Tensor]], members: list[int], depth: int,
             cache: Cache, chunk: int) -> Iterator[tuple[int, Cache, torch.Tensor]]:
    """The prompts `members`, whose first `depth` chunks are all in `cache`, grouped by their next
    chunk; a prompt alone in its group is prefilled to its end. Smaller groups go first, each on a
    copy, so the cache the most prompts share is extended in place and few copies live at once."""
    groups: dict[object, list[int]] = {}
    for index in members:
        alone = depth == len(chunks[index]) - 1  # its last chunk gives its logits: shared with none
        groups.setdefault(index if alone else tuple(chunks[index][depth][0].tolist()), []).append(index)
    ordered = sorted(groups.values(), key=len)
    for position, group in enumerate(ordered):
        own = cache if position == len(ordered) - 1 else copy.deepcopy(cache)
        if len(group) == 1:
            rest = torch.cat(chunks[group[0]][depth:], dim=1)
            yield group[0], own, prefill(model, rest, own, chunk, all_logits=False)
        else:
            prefill(model, chunks[group[0]][depth], own, chunk, all_logits=False)
            yield from _descend(model, chunks, group, depth + 1, own, chunk)


@torch.inference_mode()
def passkey_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, make_cache: CacheFactory,
                     chunk: int, cases: list[PasskeyTrial]) -> dict[str, object]:
    """Share of trials whose greedy answer contains the key, overall and per length."""
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, trial).to(device) for trial in cases]
    found = [False] * len(cases)
    for index, cache, last in shared_prefills(model, prompts, make_cache, chunk):
        answer = greedy_decode(model, cache, last, ANSWER_TOKENS - 1)
        found[index] = str(cases[index].key) in tokenizer.decode(answer.tokens[0], skip_special_tokens=True)
    hits: dict[int, list[bool]] = {}
    tokens: dict[int, list[int]] = {}
    for trial, ids, hit in zip(cases, prompts, found):
        hits.setdefault(trial.length, []).append(hit)
        tokens.setdefault(trial.length, []).append(int(ids.shape[1]))
    every = [hit for group in hits.values() for hit in group]
    return {
        "accuracy": sum(every) / len(every),
        "trials": len(every),
        "by_length": {str(length): sum(group) / len(group) for length, group in hits.items()},
        "prompt_tokens": {str(length): sum(group) / len(group) for length, group in tokens.items()},
    }
