"""Model transforms shared by methods: fold per-channel scales, fuse norms and rotate linears
(QuaRot), quantize linear inputs (and optionally outputs) as the model runs, and what rounded
weights cost in storage."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ptq.hadamard import describe_order, hadamard_factors, hadamard_transform, kron_transform
from ptq.models.adapters import ArchAdapter, ScalingGroup
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


# ------------------------------------------------------------------ norms and rotations (QuaRot)
#
# Conventions: a linear computes y = x Wᵀ + b on row vectors. Every rewrite is done in float64
# and written back in the parameter's dtype.


def _set(parameter: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.to(parameter.dtype))


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


def own_parameters_outside(model: nn.Module, blocks: nn.Module) -> None:
    """Give every parameter outside `blocks` (embeddings, final norm, LM head) a copy of its own,
    assigned, not written: a cell's model shares them with the loaded model (ptq.cell.CellCopy),
    and the rewrites below write in place. Tied parameters stay tied (one copy for both)."""
    inside = {id(p) for p in blocks.parameters()}
    copies: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) not in inside:
                if id(parameter) not in copies:
                    copies[id(parameter)] = nn.Parameter(parameter.detach().clone(),
                                                         requires_grad=parameter.requires_grad)
                setattr(module, name, copies[id(parameter)])


def untie_lm_head(model: nn.Module, lm_head: str, embedding: str) -> bool:
    """Give the LM head its own copy of a weight it shares with the token embedding (tied
    embeddings, as SmolLM2's), so that each can be changed alone; True if they were tied."""
    head, embed = model.get_submodule(lm_head), model.get_submodule(embedding)
    if head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None:  # so that a later tie_weights() leaves them apart
        config.tie_word_embeddings = False
    return True


def fuse_norm(norm: nn.Module, linears: Sequence[nn.Linear], offset: float = 0.0) -> None:
    """The norm's affine part moves into the linears that read it: W (γ ⊙ n(x) + β) + b =
    (W diag γ) n(x) + (b + W β), γ = offset + weight (Gemma's norms compute n(x)·(1 + w)). The
    norm is left computing n(x) alone (γ 1, bias 0); a linear without a bias gets one when the
    norm has one."""
    gamma = _f64(norm.weight) + offset
    beta = None if getattr(norm, "bias", None) is None else _f64(norm.bias)
    for linear in linears:
        weight = _f64(linear.weight)
        if beta is not None:
            bias = weight @ beta + (0 if linear.bias is None else _f64(linear.bias))
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.empty_like(bias, dtype=linear.weight.dtype))
            _set(linear.bias, bias)
        _set(linear.weight, weight * gamma)
    with torch.no_grad():
        norm.weight.fill_(1 - offset)
        if beta is not None:
            norm.bias.zero_()


class RMSNorm(nn.Module):
    """x / √(mean(x²) + eps), no affine part: what a LayerNorm computes on inputs of zero mean once
    its affine part is fused into the linears that read it (QuaRot's RMSN for LayerNorm models).
    Unlike LayerNorm it commutes with rotations of its input."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32, as LayerNorm does
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def center_embedding(embedding: nn.Embedding) -> None:
    """Each embedding vector minus its mean over features: with every block's output projections
    centered too (`center_output`), the residual stream has zero mean everywhere, so a LayerNorm
    reading it computes x / rms(x)."""
    weight = _f64(embedding.weight)
    _set(embedding.weight, weight - weight.mean(dim=-1, keepdim=True))


def center_output(linear: nn.Linear) -> None:
    """The linear's output vectors have zero mean over features: W ← W − mean over output rows,
    b ← b − mean(b) (the mean subtraction a LayerNorm after it would do)."""
    weight = _f64(linear.weight)
    _set(linear.weight, weight - weight.mean(dim=0, keepdim=True))
    if linear.bias is not None:
        bias = _f64(linear.bias)
        _set(linear.bias, bias - bias.mean())


def rotate_input(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """The linear's input arrives rotated, x R (R orthogonal): W ← W R keeps x R (W R)ᵀ = x Wᵀ.
    An R smaller than the input acts on each consecutive slice (R block-diagonal: per head)."""
    weight = _f64(linear.weight)
    r = rotation.shape[0]
    rotation = _f64(rotation).to(weight.device)
    _set(linear.weight, (weight.reshape(weight.shape[0], -1, r) @ rotation).reshape(weight.shape))


def rotate_output(linear: nn.Linear, rotation: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
    """The linear's output leaves rotated, y R: W ← Rᵀ W, b ← b R. An R smaller than the output
    acts on each consecutive slice (per head); `rows`: only those output rows (the value heads of a
    fused qkv_proj)."""
    part = slice(*rows) if rows else slice(None)
    weight = _f64(linear.weight[part])
    rotation = _f64(rotation).to(weight.device)
    r = rotation.shape[0]
    _set(linear.weight[part], (rotation.t() @ weight.reshape(-1, r, weight.shape[1])).reshape(weight.shape))
    if linear.bias is not None:
        _set(linear.bias[part], (_f64(linear.bias[part]).reshape(-1, r) @ rotation).reshape(-1))


def rotate_embedding(embedding: nn.Embedding, rotation: torch.Tensor) -> None:
    """Every embedding vector, a vector of the residual stream, rotated: E ← E R."""
    weight = _f64(embedding.weight)
    _set(embedding.weight, weight @ _f64(rotation).to(weight.device))


def norm_groups(block: nn.Module, adapter: ArchAdapter) -> list[tuple[str, tuple[str, ...]]]:
    """(norm, the linears reading it) in a block: the scaling groups fed by a norm, i.e. the
    linears reading the residual stream."""
    return [(group.prev, group.linears) for group in adapter.scaling_groups
            if not isinstance(block.get_submodule(group.prev), nn.Linear)]


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def fuse_norms(model: nn.Module, adapter: ArchAdapter) -> None:
    """Every norm's affine part fused into the linears reading it, the final norm's into the LM
    head (untie it first if it shares the embedding's weight): the norms then compute x / rms(x),
    which commutes with a rotation of x. For LayerNorm models also, as QuaRot does, the embeddings
    and the residual writers (attention and MLP output projections) are centred, so the stream
    has zero mean and each LayerNorm, computing x / rms(x) there, becomes an `RMSNorm`."""
    layer_norm = adapter.norm == "layer"
    if layer_norm:
        for name in adapter.embeddings:
            center_embedding(model.get_submodule(name))
    for block in adapter.decoder_blocks(model):
        for norm, linears in norm_groups(block, adapter):
            fuse_norm(block.get_submodule(norm), [block.get_submodule(name) for name in linears], adapter.norm_offset)
            if layer_norm:
                _replace(block, norm, RMSNorm(block.get_submodule(norm).eps))
        if layer_norm:
            center_output(block.get_submodule(adapter.attn_out))
            center_output(block.get_submodule(adapter.mlp_out))
    fuse_norm(model.get_submodule(adapter.final_norm), [model.get_submodule(adapter.lm_head)], adapter.norm_offset)
    if layer_norm:
        _replace(model, adapter.final_norm, RMSNorm(model.get_submodule(adapter.final_norm).eps))


def rotate_residual(model: nn.Module, adapter: ArchAdapter, rotation: torch.Tensor) -> None:
    """The residual stream rotated by the orthogonal `rotation` Q, exactly when the norms are fused
    (`fuse_norms`): embeddings E Q, the linears reading the stream W Q, those writing into it Qᵀ W,
    the LM head W Q."""
    for name in adapter.embeddings:
        rotate_embedding(model.get_submodule(name), rotation)
    rotate_input(model.get_submodule(adapter.lm_head), rotation)
    for block in adapter.decoder_blocks(model):
        for _, linears in norm_groups(block, adapter):
            for name in linears:
                rotate_input(block.get_submodule(name), rotation)
        rotate_output(block.get_submodule(adapter.attn_out), rotation)
        rotate_output(block.get_submodule(adapter.mlp_out), rotation)


class OnlineHadamard(nn.Module):
    """x ↦ x H / √n on the last dimension at run time (H: ptq.hadamard's order-n Hadamard, kept as
    its two Kronecker factors, buffers in the model's dtype that follow the module's device)."""

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.n = n
        small, power = hadamard_factors(n)
        self.register_buffer("small", small.to(dtype), persistent=False)
        self.register_buffer("power", power.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_transform(x, self.small.to(x.dtype), self.power.to(x.dtype))

    def extra_repr(self) -> str:
        return describe_order(self.n)


def _hadamard_pre_hook(linear: nn.Module, args: tuple) -> tuple:
    return (linear.input_hadamard(args[0]), *args[1:])


def hadamard_input(linear: nn.Linear) -> None:
    """QuaRot's online Hadamard: W ← W H/√n, and the input becomes x H/√n at run time, so the
    output is unchanged ((x H)(W H)ᵀ = x Wᵀ, H Hᵀ = n I) while the input the linear (and its
    quantizer) sees has its outliers spread over all channels. The transform is a forward
    pre-hook of the linear (the module `input_hadamard` inside it): statistics and activation
    quantizers hooked on the linear later see the transformed input."""
    _set(linear.weight, hadamard_transform(_f64(linear.weight)))
    linear.add_module("input_hadamard", OnlineHadamard(linear.in_features, linear.weight.dtype))
    linear.register_forward_pre_hook(_hadamard_pre_hook)


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
    """A linear layer whose input, and optionally output, is fake-quantized. The input quantizer
    is the linear's last forward pre-hook, so it sees the input as the linear receives it, after
    any input transform hooked before it (QuaRot's online Hadamard). Quantizing the outputs of
    the q, k and v projections simulates quantized attention matmul inputs, as SmoothQuant's
    `quantize_bmm_input` (before rotary embeddings, as the reference does)."""

    def __init__(self, linear: nn.Linear, input_quant: ActQuantizer,
                 output_quant: ActQuantizer | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.input_quant = input_quant
        self.output_quant = output_quant
        linear.register_forward_pre_hook(self._quantize_input)

    def _quantize_input(self, _linear: nn.Module, args: tuple) -> tuple:
        return (self.input_quant(args[0]), *args[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
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
