"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, following the
authors' reference (mit-han-lab/smoothquant: calibration.get_act_scales, smooth.smooth_lm).

A few input channels of a linear carry activations far larger than the rest, for every token,
so a per-token activation scale is set by them and the other channels lose their precision.
For each norm that feeds linears, SmoothQuant divides those channels by s and multiplies the
matching weight columns by s (exact in float), with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)    (both clamped at 1e-5)

where max|X_j| is over every calibration token and max|W_j| over the linears that read the
norm. alpha trades activation range for weight range (0.85 for Llama-2/3, 0.8 for Mistral,
0.5 for OPT in the reference; family defaults live in the model YAMLs). The reference
leaves o_proj and down_proj unsmoothed; `smooth_linears` also smooths those whose producer
can absorb the scales (not v_proj -> o_proj under grouped-query attention).

The activation maxima come from the float model, as the reference calibrates the unquantized
model before it smooths anything (`float_inputs`), also inside a pipeline such as
`smoothquant+gptq` that propagates quantized activations. SmoothQuant only transforms: the
weights are rounded by the next quantizer, or to nearest when it runs alone (its W8A8).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ptq.engine import BlockStep, ModelStep, Observer, Specs, Stage
from ptq.models.adapters import ScalingGroup
from ptq.registry import register_method
from ptq.transforms import fold_scales, scales_fold

CLAMP = 1e-5  # the reference's floor for weight maxima and scales


@dataclass(frozen=True)
class SmoothQuantParams:
    alpha: float = 0.5  # the reference's default; the model YAMLs set their family's
    smooth_linears: bool = False  # also v_proj -> o_proj and up_proj -> down_proj (the reference does not)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per input channel, the weight maximum taken over
    every linear that reads the channel; float32, like the statistics."""
    weight_max = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=CLAMP)
    return (act_max.float().pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=CLAMP)


@register_method("smoothquant", params=SmoothQuantParams, tracks=("A", "B"), role="transform", calibrated=True)
class SmoothQuant(Stage):
    float_inputs = True

    def __init__(self, params: SmoothQuantParams, specs: Specs, final: bool) -> None:
        super().__init__(params, specs, final)
        self.smoothed: set[str] = set()
        self.act_max: dict[str, torch.Tensor] = {}  # the current block's, by inspected module

    def groups(self, block: nn.Module, groups: tuple[ScalingGroup, ...]) -> list[ScalingGroup]:
        """The scaling groups to smooth: after a norm, and after a linear when asked and possible."""
        return [group for group in groups if scales_fold(block, group)
                and (self.params.smooth_linears or not isinstance(block.get_submodule(group.prev), nn.Linear))]

    def _observe(self, name: str, _batch: int, x: torch.Tensor) -> None:
        """max |x| per channel over all tokens"""
        batch_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        act_max = self.act_max
        act_max[name] = torch.maximum(act_max[name], batch_max) if name in act_max else batch_max

    def float_observers(self, step: BlockStep) -> dict[str, Observer]:
        # A group's input is its inspected module's: every token for an MoE block, whose experts each
        # see only their routed tokens; a module no token reached (an unrouted expert) is not smoothed.
        self.act_max = {}
        return {group.inspect: partial(self._observe, group.inspect)
                for group in self.groups(step.block, step.adapter.scaling_groups)}

    def on_block(self, step: BlockStep) -> None:
        groups = self.groups(step.block, step.adapter.scaling_groups)
        if not step.float_observed:  # a stage before this one changed the block: a pass of its own
            observers = self.float_observers(step)
            step.float_runner.feed_inputs({name: step.block.get_submodule(name) for name in observers},
                                          lambda name, batch, x: observers[name](batch, x))
        act_max = self.act_max
        for group in groups:
            if group.inspect not in act_max:
                continue
            # the float readers (an MoE router) count in the weight maximum, as in the reference's Mixtral
            weights = [step.block.get_submodule(name).weight for name in group.linears + group.float_readers]
            scales = smoothing_scales(act_max[group.inspect], weights, self.params.alpha)
            fold_scales(step.block, group, scales.to(weights[0].dtype), step.adapter.norm_offset)
            self.smoothed.add(group.label)

    def after_blocks(self, step: ModelStep) -> None:
        step.result.notes.append(f"SmoothQuant alpha {self.params.alpha}, smoothed in every block: "
                                 f"{'; '.join(sorted(self.smoothed))}")
