"""HQQ, Half-Quadratic Quantization (Badri & Shaji, 2023): calibration-free weight quantization.

Round-to-nearest from the min/max range spends its error budget evenly; weights have heavy
tails, and an lp "norm" with p < 1 on the error lets a few outliers stay badly quantized
while the bulk lands closer to the grid. HQQ minimizes that, per group, over the zero point
only (kept as a float), by half-quadratic splitting: alternate a closed-form shrinkage of
the error and a closed-form zero update. It needs no data, only the weight itself.

Follows `Quantizer.quantize` with `optimize_weights_proximal_legacy` of the authors' code
(mobiusml/hqq 0.2.8, `hqq_base_quant_config`: groups along the input dimension, the initial
zero rounded at 4 bits only). The legacy loop returns the zero after the step that failed to
improve. One departure: hqq 0.2.8's legacy loop no longer grows beta by kappa; the paper and
the authors' earlier code do, and so does this module. `tests/test_weight_quantizers.py`
checks it against the library (with kappa = 1, where the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptq.engine import BlockStep, Specs, Stage
from ptq.quant import QuantSpec, as_rows, expand_groups, fake_quantize_with, group_reduce, quantize_with
from ptq.registry import register_method


@dataclass(frozen=True)
class HqqParams:
    """The reference's optimizer defaults (opt_params of optimize_weights_proximal_legacy)."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    # Round the min/max zero point before optimizing; None is hqq_base_quant_config's rule
    # (round at 4 bits only). It decides whether 0.0 starts on the grid, which matters at 3 bits.
    round_zero: bool | None = None

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1] (HQQ's sparsity-promoting lp norm), got {self.lp_norm}")
        for name in ("beta", "iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kappa < 1:
            raise ValueError(f"kappa must be >= 1 (beta grows by kappa each step), got {self.kappa}")

    def rounds_zero(self, bits: int) -> bool:
        return bits == 4 if self.round_zero is None else self.round_zero


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal step of |x|^p with weight 1/beta. Small errors
    are set to zero (absorbed by the zero point), large ones are kept as outliers."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.pow(p - 1) / beta)


def hqq_params(weight: torch.Tensor, spec: QuantSpec,
               params: HqqParams = HqqParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale (from min/max, zero not forced into the range) and optimized float zero
    point, [..., n_groups] as `ptq.quant.quantize_with` takes them. The loop stops at the first
    step that does not lower the mean absolute error over the whole tensor, keeping that
    step's zero update, as the reference does."""
    if spec.symmetric:
        raise ValueError("HQQ optimizes a zero point, so it needs an asymmetric weight spec (symmetric: false)")
    work = as_rows(weight.float(), spec)
    sizes = spec.group_sizes(work.shape[-1])
    xmin = group_reduce(work, sizes, "amin")
    scale = (group_reduce(work, sizes, "amax") - xmin) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is exact at any scale
    zero = -xmin / scale
    if params.rounds_zero(spec.bits):
        zero = zero.round()
    scale_full = expand_groups(scale, sizes)
    best_error, beta = math.inf, params.beta
    for _ in range(params.iters):
        error = work - fake_quantize_with(work, scale_full, expand_groups(zero, sizes), spec)
        # The reference's zero update, mean(W_q - (W - W_e) / scale), written with W_q = W_r / scale + zero.
        residual = error - shrink_lp(error, beta, params.lp_norm)
        zero = zero - group_reduce(residual, sizes, "mean") / scale
        beta *= params.kappa
        mean_error = error.abs().mean().item()
        if mean_error >= best_error:
            break
        best_error = mean_error
    return scale, zero


def hqq_quantize(weight: torch.Tensor, spec: QuantSpec, params: HqqParams = HqqParams()) -> torch.Tensor:
    """`weight` on the shared grid with HQQ's scale and zero points, dequantized (same shape and dtype)."""
    return quantize_with(weight, *hqq_params(weight, spec, params), spec).dequantize()


@register_method("hqq", params=HqqParams, tracks=("A",), role="quantizer", reads=("weight",))
class Hqq(Stage):
    @classmethod
    def check(cls, params: HqqParams, specs: Specs) -> None:
        if specs.weight.symmetric:
            raise ValueError("HQQ optimizes a zero point, so it needs an asymmetric weight spec (symmetric: false)")

    def on_block(self, step: BlockStep) -> None:
        spec = self.specs.weight
        for name, linear in step.linears().items():
            step.quantized(name, hqq_quantize(linear.weight, spec, self.params), spec)
