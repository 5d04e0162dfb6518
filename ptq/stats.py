"""Noise-aware comparisons of two models scored on the same evaluation windows.

A perplexity is exp(mean NLL) over windows (ptq.eval.perplexity keeps each window's mean NLL).
Two models scored on the same windows are compared by resampling windows *jointly*: each
bootstrap replicate draws windows with replacement and takes the same draw for both models,
so what the windows share (some text is hard for every model) cancels out and the interval
reflects only how the two differ from window to window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RatioInterval:
    """PPL(quantized) / PPL(reference) over the same windows, with a percentile bootstrap interval."""

    ratio: float
    low: float
    high: float
    level: float  # e.g. 0.95
    n_boot: int
    seed: int
    windows: int


def paired_bootstrap_ratio(nll_quant: Sequence[float], nll_fp: Sequence[float], n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> RatioInterval:
    """The PPL ratio exp(mean(nll_quant) - mean(nll_fp)) and its `level` percentile-bootstrap
    interval, resampling the windows jointly (the i-th entries of both lists are one window).

    Each replicate's ratio is exp of the mean, over the drawn windows, of the per-window NLL
    differences; the interval is the (1 - level)/2 and (1 + level)/2 quantiles of the replicates
    (linear interpolation). Deterministic for a seed."""
    quant = np.asarray(nll_quant, dtype=np.float64)
    fp = np.asarray(nll_fp, dtype=np.float64)
    if quant.ndim != 1 or quant.shape != fp.shape or quant.size == 0:
        raise ValueError(f"need two equally long, non-empty lists of per-window NLLs, got {quant.shape} and "
                         f"{fp.shape}")
    if not (np.isfinite(quant).all() and np.isfinite(fp).all()):
        raise ValueError("per-window NLLs must be finite")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    difference = quant - fp
    draws = np.random.default_rng(seed).integers(0, difference.size, size=(n_boot, difference.size))
    replicates = difference[draws].mean(axis=1)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return RatioInterval(math.exp(difference.mean()), math.exp(low), math.exp(high), level, n_boot, seed,
                         difference.size)
