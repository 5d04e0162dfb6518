"""Calibration data: n samples x seqlen tokens drawn with a seed, as the GPTQ authors do
(C4: a random document longer than seqlen, then a random window of it; WikiText-2: a random
window of the tokenized split). The engine (ptq.engine) walks the blocks with them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ptq.config import CalibConfig
from ptq.data import load_text, tokenize_once
from ptq.errors import DataUnavailable

CALIB_SPLITS = {"c4": "calibration", "wikitext2": "validation"}
MAX_DRAWS_PER_SAMPLE = 100  # C4: documents tried per sample before concluding the data is too short


@dataclass(frozen=True)
class CalibrationSet:
    tokens: torch.Tensor  # [n_samples, seqlen]
    record: dict[str, Any]  # dataset, split, origin, text sha256, seed, token sha256, for the cell record


def _draw_c4(tokenizer: PreTrainedTokenizerBase, rows: tuple[str, ...], config: CalibConfig,
             rng: random.Random) -> list[torch.Tensor]:
    samples = []
    for _ in range(config.n_samples):
        for _attempt in range(MAX_DRAWS_PER_SAMPLE):
            ids = tokenizer(rows[rng.randint(0, len(rows) - 1)], return_tensors="pt").input_ids[0]
            if ids.shape[0] > config.seqlen:
                break
        else:
            raise DataUnavailable(
                f"calibration data shorter than requested: no C4 document of more than {config.seqlen} tokens "
                f"in {MAX_DRAWS_PER_SAMPLE} draws; lower calib.seqlen")
        start = rng.randint(0, ids.shape[0] - config.seqlen - 1)
        samples.append(ids[start:start + config.seqlen])
    return samples


def calibration_set(tokenizer: PreTrainedTokenizerBase, config: CalibConfig) -> CalibrationSet:
    """Seeded calibration windows, reproducible from the record alone."""
    text = load_text(config.dataset, CALIB_SPLITS[config.dataset])
    rng = random.Random(config.seed)
    if config.dataset == "c4":
        samples = _draw_c4(tokenizer, text.rows, config, rng)
    else:
        ids = tokenize_once(tokenizer, text)[0]
        if ids.shape[0] <= config.seqlen:
            raise DataUnavailable(f"calibration data shorter than requested: {text.dataset}/{text.split} has "
                                  f"{ids.shape[0]} tokens, fewer than one window of {config.seqlen}")
        starts = [rng.randint(0, ids.shape[0] - config.seqlen - 1) for _ in range(config.n_samples)]
        samples = [ids[s:s + config.seqlen] for s in starts]
    tokens = torch.stack(samples)
    record = {**text.describe(), "seed": config.seed, "n_samples": config.n_samples, "seqlen": config.seqlen,
              "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
    return CalibrationSet(tokens, record)
