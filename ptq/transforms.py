"""Model transforms shared by methods: rewrite linear weights, quantize linear inputs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ptq.quant import QuantSpec, fake_quantize


def group_notes(linears: dict[str, nn.Linear], spec: QuantSpec) -> list[str]:
    """The uneven-group notes of `spec` over these layers, once each, for records."""
    return sorted({note for linear in linears.values() if (note := spec.describe(linear.in_features))})


def bits_per_weight(linears: dict[str, nn.Linear], spec: QuantSpec | None, meta_bits: int = 16) -> float:
    """Mean storage bits per weight of these linears (weighted by size): quantized under `spec` with
    scales and zero points at `meta_bits` each, or, without a spec, the float weights' own width."""
    weights = [linear.weight for linear in linears.values()]
    total_bits = sum(w.numel() * (w.element_size() * 8 if spec is None
                                  else spec.bits_per_weight(w.shape[1], w.shape[0], meta_bits)) for w in weights)
    return total_bits / sum(w.numel() for w in weights)


def replace_weights(linears: dict[str, nn.Linear], transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Overwrite each linear's weight with `transform(weight)` in place (no model-size copy)."""
    with torch.no_grad():
        for linear in linears.values():
            linear.weight.copy_(transform(linear.weight))


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
