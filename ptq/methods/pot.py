"""Power-of-two (POT) and additive power-of-two (APoT, Li, Dong & Wang, ICLR 2020) weight grids.

Weights are roughly bell-shaped, so a grid denser near zero than a uniform one can fit them
better at the same bit width, and power-of-two levels turn multiplications into shifts. POT
puts its levels at 2^-e; at more than 3 bits they crowd uselessly close to zero (the
"rigid resolution" the APoT paper points out). APoT makes each level a sum of a few powers
of two, which spreads the levels out while keeping them shift-and-add friendly.

Both are symmetric codebooks over [-1, 1] (1 sign bit + `bits - 1` magnitude bits, so
2^bits - 1 levels with zero shared), applied per group with the group's absmax as scale by
the shared `ptq.quant.codebook_fake_quantize`. No calibration.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from ptq.engine import BlockStep, ModelStep, Stage
from ptq.quant import codebook_fake_quantize
from ptq.registry import register_method


def _signed(magnitudes: list[float]) -> torch.Tensor:
    """Magnitudes (0 included) scaled to a max of 1 and mirrored: the sorted symmetric level set."""
    top = max(magnitudes)
    levels = {m / top for m in magnitudes} | {-m / top for m in magnitudes}
    return torch.tensor(sorted(levels), dtype=torch.float64)


def pot_levels(bits: int) -> torch.Tensor:
    """{0, ±2^-(2^(bits-1) - 2), ..., ±1/2, ±1}: 2^bits - 1 levels (the `additive=False` set of
    the APoT authors' code)."""
    return _signed([0.0] + [2.0**-e for e in range(2 ** (bits - 1) - 1)])


def apot_levels(bits: int, k: int = 2) -> torch.Tensor:
    """APoT levels: each magnitude is a sum of terms, one value chosen per term among {0} and
    powers of two, scaled to a max of 1; 2^bits - 1 levels with the sign.

    With m = bits - 1 magnitude bits and m a multiple of k, this is the paper's set: n = m / k
    terms, term i choosing from {0} ∪ {2^-(i + j n) : j = 0 .. 2^k - 2}. The exponents are dealt
    round-robin: round j gives the next n exponents to terms 0 .. n-1.

    When k does not divide m (e.g. 4-bit weights: m = 3), the authors' code (build_power_value
    for B = 3 and 5, k = 2) adds one short term with the r = m mod k leftover bits, which
    joins only the last round and takes its first exponent: for m = 3 the terms are
    {0, 2^-1, 2^-2, 2^-4} and {0, 2^-3}, giving magnitudes {0, .1, .2, .3, .4, .6, .8, 1}.
    For other k the short term's 2^r - 1 values go first in each of the last 2^r - 1 rounds
    (our generalization; it agrees with the code wherever the code is defined).

    With bits = 2 (one magnitude bit) there is only the short term and the set is {-1, 0, 1},
    the uniform ternary grid the authors' code also falls back to for 2-bit weights.
    """
    if k < 1:
        raise ValueError(f"APoT needs k >= 1 bits per additive term, got {k}")
    full, short = divmod(bits - 1, k)
    rounds = 2**k - 1
    # choices[t]: the values term t can take; the short term, if any, is the last one.
    choices: list[list[float]] = [[0.0] for _ in range(full + (short > 0))]
    exponent = 0
    for j in range(rounds):
        dealt = list(range(full))
        if short and j >= rounds - (2**short - 1):
            dealt.insert(0, full)
        for term in dealt:
            choices[term].append(2.0**-exponent)
            exponent += 1
    return _signed([sum(values) for values in itertools.product(*choices)])


class CodebookStage(Stage):
    """Every block linear onto a symmetric codebook, per group of the weight spec, with the
    group's absmax as scale. An asymmetric spec runs as symmetric (the grid has no zero point),
    and the result says so: its bits per weight count one scale per group, no zero point."""

    def levels(self) -> torch.Tensor:
        raise NotImplementedError

    def before_blocks(self, step: ModelStep) -> None:
        if not self.specs.weight.symmetric:
            step.result.notes.append(f"{self.name} levels are symmetric: the weight spec's symmetric: false was "
                                     "run as symmetric (per-group absmax scale, no zero point)")

    def on_block(self, step: BlockStep) -> None:
        spec, levels = dataclasses.replace(self.specs.weight, symmetric=True), self.levels()
        for name, linear in step.linears().items():
            step.quantized(name, codebook_fake_quantize(linear.weight, levels, spec), spec)


@dataclass(frozen=True)
class PotParams:
    """POT has no knobs beyond the weight spec."""


@dataclass(frozen=True)
class ApotParams:
    k: int = 2  # bits per additive term, as in the paper

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 bit per additive term, got {self.k}")


@register_method("pot", params=PotParams, tracks=("A",), role="quantizer", reads=("weight",))
class Pot(CodebookStage):
    def levels(self) -> torch.Tensor:
        return pot_levels(self.specs.weight.bits)


@register_method("apot", params=ApotParams, tracks=("A",), role="quantizer", reads=("weight",))
class Apot(CodebookStage):
    def levels(self) -> torch.Tensor:
        return apot_levels(self.specs.weight.bits, self.params.k)
