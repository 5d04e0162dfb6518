"""Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"): a five-digit key hidden
at some depth of repetitive filler, asked for at the end. The prompt is prefilled through the
cell's cache in chunks and the answer decoded greedily, so every token of the key is read back
through the (quantized) cache."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ptq.eval.decode import CacheFactory, greedy_decode, prefill

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


@torch.inference_mode()
def passkey_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, make_cache: CacheFactory,
                     chunk: int, cases: list[PasskeyTrial]) -> dict[str, object]:
    """Share of trials whose greedy answer contains the key, overall and per length."""
    device = next(model.parameters()).device
    hits: dict[int, list[bool]] = {}
    tokens: dict[int, list[int]] = {}
    for trial in cases:
        ids = prompt_ids(tokenizer, trial).to(device)
        cache = make_cache()
        answer = greedy_decode(model, cache, prefill(model, ids, cache, chunk, all_logits=False), ANSWER_TOKENS - 1)
        text = tokenizer.decode(answer.tokens[0], skip_special_tokens=True)
        hits.setdefault(trial.length, []).append(str(trial.key) in text)
        tokens.setdefault(trial.length, []).append(int(ids.shape[1]))
    every = [hit for group in hits.values() for hit in group]
    return {
        "accuracy": sum(every) / len(every),
        "trials": len(every),
        "by_length": {str(length): sum(group) / len(group) for length, group in hits.items()},
        "prompt_tokens": {str(length): sum(group) / len(group) for length, group in tokens.items()},
    }
