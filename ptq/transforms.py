"""Model transforms shared by methods: fold per-channel scales, quantize linear inputs (and
optionally outputs) as the model runs, and what rounded weights cost in storage."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ptq.models.adapters import ScalingGroup
from ptq.quant import ActSpec, QuantSpec, RangeObserver, fake_quantize, fake_quantize_with


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
    always can; a linear only if its outputs are exactly the group's inputs (not so for
    v_proj -> o_proj under grouped-query attention)."""
    prev = block.get_submodule(group.prev)
    first = block.get_submodule(group.linears[0])
    return not isinstance(prev, nn.Linear) or prev.out_features == first.in_features


def fold_scales(block: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """y = prev(x) / s feeds W·s: the block computes the same function (up to float rounding),
    with the input channels of the group's linears scaled by s (AWQ, SmoothQuant)."""
    prev = block.get_submodule(group.prev)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(scales.view(-1, 1))
        else:  # a norm: scale its affine weight
            prev.weight.div_(scales)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales)
        for name in group.linears:
            block.get_submodule(name).weight.mul_(scales.view(1, -1))


Sites = Mapping[str, Mapping[str, RangeObserver]]  # linear name -> "input" / "output" -> its range


class ActQuantizer(nn.Module):
    """Fake-quantizes the tensors it is given under an ActSpec: dynamically (parameters from each
    tensor), or with fixed static parameters (buffers, so they follow the module's device)."""

    def __init__(self, spec: ActSpec, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None) -> None:
        super().__init__()
        if spec.dynamic and (scale is not None or zero is not None):
            raise ValueError("a dynamic activation spec takes its parameters from each tensor, "
                             "not fixed ones")
        if not spec.dynamic and scale is None:
            raise ValueError("static activation quantization (dynamic false) needs calibrated ranges: "
                             "observe the calibration inputs with a RangeObserver and pass its params")
        if not spec.dynamic and (zero is None) != spec.symmetric:
            raise ValueError("a static zero point goes with an asymmetric spec, and only with it")
        self.spec = spec
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            return fake_quantize(x, self.spec)
        return fake_quantize_with(x.float(), self.scale, self.zero, self.spec).to(x.dtype)

    def describe(self) -> dict[str, Any]:
        """The spec, and the static scale and zero point when fixed: for records."""
        out: dict[str, Any] = dataclasses.asdict(self.spec)
        if self.scale is not None:
            out["scale"] = self.scale.item()
            out["zero"] = None if self.zero is None else self.zero.item()
        return out

    def extra_repr(self) -> str:
        return str(self.spec)


class ActQuantLinear(nn.Module):
    """A linear layer whose input, and optionally output, is fake-quantized. Quantizing the
    outputs of the q, k and v projections simulates quantized attention matmul inputs, as
    SmoothQuant's `quantize_bmm_input` (before rotary embeddings, as the reference does)."""

    def __init__(self, linear: nn.Linear, input_quant: ActQuantizer,
                 output_quant: ActQuantizer | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.input_quant = input_quant
        self.output_quant = output_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.input_quant(x))
        return y if self.output_quant is None else self.output_quant(y)


def _quantizer(spec: ActSpec, ranges: Sites | None, name: str, site: str,
               device: torch.device) -> ActQuantizer:
    if spec.dynamic:
        return ActQuantizer(spec)
    observed = None if ranges is None else ranges.get(name, {}).get(site)
    if observed is None:
        raise ValueError(f"static activation quantization needs the calibrated range of {name} ({site}); "
                         "none was observed")
    scale, zero = observed.params(spec)
    return ActQuantizer(spec, scale.to(device), None if zero is None else zero.to(device))


def quantize_inputs(model: nn.Module, linear_names: Iterable[str], spec: ActSpec, *,
                    outputs: Iterable[str] = (), ranges: Sites | None = None) -> None:
    """Wrap the named linears of `model` so their inputs are quantized with `spec`, and the outputs
    of those named in `outputs` too. A static spec takes each site's parameters from `ranges`
    (see `recording_ranges`), placed on the linear's device."""
    names, outputs = list(linear_names), set(outputs)
    if not outputs <= set(names):
        raise ValueError("outputs to quantize must be among the wrapped linears, not "
                         f"{sorted(outputs - set(names))}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        device = linear.weight.device
        output = _quantizer(spec, ranges, name, "output", device) if name in outputs else None
        inputs = _quantizer(spec, ranges, name, "input", device)
        setattr(parent, child, ActQuantLinear(linear, inputs, output))


def act_quant_sites(model: nn.Module) -> dict[str, dict[str, dict[str, Any] | None]]:
    """What is quantized where, read from the model itself: each wrapped linear by full name, with
    its input's and output's spec (and static parameters), None for an output left in float."""
    return {
        name: {"input": module.input_quant.describe(),
               "output": None if module.output_quant is None else module.output_quant.describe()}
        for name, module in model.named_modules() if isinstance(module, ActQuantLinear)
    }


@contextmanager
def recording_ranges(model: nn.Module, linear_names: Iterable[str],
                     outputs: Iterable[str] = ()) -> Iterator[Sites]:
    """While open, every forward through the named linears widens the range of their inputs (and
    of the outputs of those in `outputs`): run the calibration batches inside, then pass the
    ranges to `quantize_inputs` for static quantization."""
    outputs = set(outputs)
    ranges: dict[str, dict[str, RangeObserver]] = {}
    handles = []
    for name in linear_names:
        linear = model.get_submodule(name)
        ranges[name] = {"input": RangeObserver()}
        site = ranges[name]
        handles.append(linear.register_forward_pre_hook(lambda _m, args, r=site: r["input"].observe(args[0])))
        if name in outputs:
            ranges[name]["output"] = RangeObserver()
            handles.append(linear.register_forward_hook(lambda _m, _a, y, r=site: r["output"].observe(y)))
    try:
        yield ranges
    finally:
        for handle in handles:
            handle.remove()
