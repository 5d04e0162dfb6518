"""The paired bootstrap of a PPL ratio (ptq.stats), on its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ptq.session import ratio_intervals
from ptq.stats import paired_bootstrap_ratio


def windows(n: int, seed: int) -> np.ndarray:
    """Per-window mean NLLs with a large spread between windows, as real text has."""
    return np.random.default_rng(seed).normal(3.3, 0.4, n)


def test_identical_inputs_give_one_with_a_zero_width_interval() -> None:
    fp = windows(32, 0)
    result = paired_bootstrap_ratio(fp, fp)
    assert (result.ratio, result.low, result.high) == (1.0, 1.0, 1.0)
    assert (result.windows, result.level, result.n_boot, result.seed) == (32, 0.95, 2000, 0)


@pytest.mark.parametrize("shift", (0.25, -0.125, 1.5))
def test_a_constant_shift_gives_exp_of_it_exactly(shift: float) -> None:
    # dyadic values: every sum and difference below is exact in binary floating point
    fp = np.random.default_rng(1).integers(8, 64, 40) / 8
    result = paired_bootstrap_ratio(fp + shift, fp)
    # the windows differ widely, but the pairing removes that: no uncertainty is left
    assert result.ratio == result.low == result.high == math.exp(shift)


@pytest.mark.parametrize("seed", range(5))
def test_the_interval_covers_the_point_estimate(seed: int) -> None:
    fp = windows(32, seed)
    quant = fp + np.random.default_rng(100 + seed).normal(0.05, 0.03, 32)
    result = paired_bootstrap_ratio(quant, fp, seed=seed)
    assert result.low < result.ratio < result.high
    assert result.ratio == pytest.approx(math.exp(quant.mean()) / math.exp(fp.mean()), rel=1e-12)
    assert result.low > 1  # a shift of 0.05 nats against noise of 0.03 / sqrt(32) per mean
    wider = paired_bootstrap_ratio(quant, fp, seed=seed, level=0.99)
    assert wider.low <= result.low and wider.high >= result.high


def test_deterministic_for_a_seed() -> None:
    fp = windows(16, 2)
    quant = fp + np.random.default_rng(3).normal(0.1, 0.1, 16)
    assert paired_bootstrap_ratio(quant, fp, seed=7) == paired_bootstrap_ratio(list(quant), list(fp), seed=7)
    assert paired_bootstrap_ratio(quant, fp, seed=7) != paired_bootstrap_ratio(quant, fp, seed=8)


def test_more_windows_give_a_narrower_interval() -> None:
    rng = np.random.default_rng(4)
    fp = windows(512, 5)
    quant = fp + rng.normal(0.05, 0.05, 512)
    few = paired_bootstrap_ratio(quant[:32], fp[:32])
    many = paired_bootstrap_ratio(quant, fp)
    assert many.high - many.low < (few.high - few.low) / 2  # about 1/sqrt(16) as wide


@pytest.mark.parametrize("quant, fp, kwargs, message", [
    ([1.0, 2.0], [1.0], {}, "equally long"),
    ([], [], {}, "non-empty"),
    ([1.0, float("nan")], [1.0, 2.0], {}, "finite"),
    ([1.0], [1.0], {"level": 1.0}, "0 < level < 1"),
    ([1.0], [1.0], {"n_boot": 0}, "n_boot >= 1"),
])
def test_invalid_inputs(quant: list, fp: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_ratio(quant, fp, **kwargs)


def test_ratio_intervals_pair_each_dataset_with_the_fp_windows() -> None:
    fp = {"window_nll": {"wikitext2": [2.0, 2.5, 3.0], "c4": [3.0, 3.1]}}
    same = ratio_intervals(fp, fp)
    assert same["wikitext2"]["low"] == same["wikitext2"]["high"] == 1.0  # identical windows: no noise
    shifted = {"window_nll": {"wikitext2": [2.1, 2.6, 3.1], "c4": [3.0]}}
    intervals = ratio_intervals(shifted, fp)
    assert intervals["wikitext2"]["low"] == pytest.approx(math.exp(0.1)) == intervals["wikitext2"]["high"]
    assert "c4" not in intervals  # not the same windows: no interval rather than a wrong one
