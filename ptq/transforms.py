"""Model transforms shared by methods: fold per-channel scales, quantize linear inputs, and what\nrounded weights cost in storage."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ptq.models.adapters import ScalingGroup
from ptq.quant import QuantSpec, fake_quantize


def group_notes(weight_specs: Mapping[str, QuantSpec], linears: Mapping[str, nn.Linear]) -> list[str]:
    """The uneven-group notes of the specs the linears were rounded with, once each, for records."""
    return sorted({note for name, spec in weight_specs.items()
                   if (note := spec.describe(linears[name].in_features))})


def bits_per_weight(linears: Mapping[str, nn.Linear], weight_specs: Mapping[str, QuantSpec],
                    meta_bits: int = 16) -> float:
    """Mean storage bits per weight of these linears (weighted by size): each as rounded with its spec
    in `weight_specs`, scales and zero points at `meta_bits` each, or, if absent, at its float width."""
    total_bits = sum(
        linear.weight.numel() * (weight_specs[name].bits_per_weight(linear.in_features, linear.out_features,
                                                                    meta_bits)
                                 if name in weight_specs else linear.weight.element_size() * 8)
        for name, linear in linears.items())
    return total_bits / sum(linear.weight.numel() for linear in linears.values())


def scales_fold(block: nn.Module, group: ScalingGroup) -> bool:
    """Whether per-channel scales of the group's input can be folded into `group.prev`: a norm
    always can; a linear only if its outputs (or the rows `prev_rows` of a fused one) are exactly the
    group's inputs (not so for v_proj -> o_proj under grouped-query attention)."""
    prev = block.get_submodule(group.prev)
    first = block.get_submodule(group.linears[0])
    if not isinstance(prev, nn.Linear):
        return True
    start, stop = group.prev_rows or (0, prev.out_features)
    return stop - start == first.in_features


def fold_scales(block: nn.Module, group: ScalingGroup, scales: torch.Tensor,
                norm_offset: float = 0.0) -> None:
    """y = prev(x) / s feeds W·s: the block computes the same function (up to float rounding),
    with the input channels of the group's linears scaled by s (AWQ, SmoothQuant). A norm computing
    x̂·(norm_offset + w) takes w' = (norm_offset + w) / s - norm_offset (Gemma's x̂·(1 + w)); a fused
    linear divides only the rows `prev_rows` feeding the group; float readers of the input (an MoE
    router) take s like the linears."""
    prev = block.get_submodule(group.prev)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            rows = slice(*group.prev_rows) if group.prev_rows else slice(None)
            prev.weight[rows].div_(scales.view(-1, 1))
            if prev.bias is not None:
                prev.bias[rows].div_(scales)
        else:  # a norm: scale its affine weight (and bias)
            wide = torch.promote_types(prev.weight.dtype, torch.float32)  # (1 + w) of a bf16 w, not rounded
            prev.weight.copy_((prev.weight.to(wide) + norm_offset) / scales.to(wide) - norm_offset)
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(scales)
        for name in group.linears + group.float_readers:
            block.get_submodule(name).weight.mul_(scales.view(1, -1))


class ActQuantLinear(nn.Module):
    """A linear layer whose input is fake-quantized dynamically (scales from the input itself)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        super().__init__()
        self.linear = linear
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(fake_quantize(x, self.spec))

    def extra_repr(self) -> str:
        return f"act={self.spec}"


def quantize_inputs(model: nn.Module, linear_names: list[str], spec: QuantSpec) -> None:
    """Wrap the named linears of `model` so their inputs are quantized with `spec`."""
    for name in linear_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ActQuantLinear(getattr(parent, child), spec))
