"""The quantizer primitive every method and track shares.

A `QuantSpec` says how to quantize (bits, symmetric or asymmetric, and the granularity
over which one scale is shared); `quantize` turns a tensor into integer codes plus
scales and zero points, and `fake_quantize` returns the dequantized tensor.

Granularities all reduce over the last dimension, which is the input dimension of a
weight row ([out, in]) and the feature dimension of an activation or KV vector:
  tensor   one scale for the whole tensor
  channel  one scale per output row of a weight
  token    one scale per token (the same reduction, named for activations and KV)
  group    one scale per `group_size` consecutive elements of a row; when the size does
           not divide the row, the last group of each row is smaller (as in the GPTQ
           authors' code), and a group never spans two rows.
Ranges follow the GPTQ reference: asymmetric ranges always contain zero (so zero is
exactly representable), symmetric ranges are signed with scale = absmax / (2^(b-1) - 1).

Formats: `int` (integer codes, above) or `fp8_e4m3` (8 bits, symmetric: scale = absmax / 448
and every value rounded to the nearest float8 e4m3fn number, as FP8 weights and activations
are deployed on current GPUs; the codes are float8_e4m3fn tensors).

Activations (`ActSpec`, a QuantSpec whose rows are tokens) are quantized per token, per
tensor or in groups of a token's channels, dynamically (parameters from each tensor as it
arrives), or per tensor with static parameters from calibration ranges (`RangeObserver`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "token", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "token", "group")
Format = Literal["int", "fp8_e4m3"]
FORMATS: tuple[str, ...] = ("int", "fp8_e4m3")
MIN_BITS, MAX_BITS = 2, 8
FP8_E4M3_MAX = 448  # float8 e4m3fn's largest finite value, 1.75 * 2^8 (it has no infinities)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool = False
    granularity: Granularity = "group"
    group_size: int = 128
    format: Format = "int"

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and not (self.group_size > 0 or self.group_size == -1):
            raise ValueError(f"group_size must be positive, or -1 for one group per row, got {self.group_size}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "fp8_e4m3" and (self.bits != 8 or not self.symmetric):
            raise ValueError(f"format fp8_e4m3 is 8 bits with a sign and no zero point: it needs bits 8 and "
                             f"symmetric true, got bits {self.bits}, symmetric {self.symmetric}")

    @property
    def qmin(self) -> int:
        """The smallest code (float8: the most negative finite value)."""
        if self.format == "fp8_e4m3":
            return -FP8_E4M3_MAX
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """The largest code; a symmetric scale is absmax / qmax."""
        if self.format == "fp8_e4m3":
            return FP8_E4M3_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def group_sizes(self, row_length: int) -> list[int]:
        """Lengths of the groups along one row; the last one is smaller when the size does not divide it."""
        if self.granularity != "group" or self.group_size == -1:
            return [row_length]
        full, tail = divmod(row_length, self.group_size)
        return [self.group_size] * full + ([tail] if tail else [])

    def bits_per_weight(self, row_length: int, rows: int = 1, meta_bits: int = 16) -> float:
        """Storage bits per element of a [rows, row_length] tensor: `bits` per code plus, per group,
        a scale (and a zero point when asymmetric) stored at `meta_bits` each. Tensor granularity
        has one group for the whole tensor; channel and token granularities one per row. FP8 is
        8 bits per element plus its scales, like symmetric INT8."""
        params_per_group = 1 if self.symmetric else 2
        groups = 1 if self.granularity == "tensor" else rows * len(self.group_sizes(row_length))
        return self.bits + groups * params_per_group * meta_bits / (rows * row_length)

    def describe(self, row_length: int) -> str | None:
        """A note for records when groups are uneven, else None."""
        sizes = self.group_sizes(row_length)
        if len(sizes) > 1 and sizes[-1] != sizes[0]:
            return (
                f"group size {self.group_size} does not divide row length {row_length}: "
                f"each row has {len(sizes) - 1} groups of {self.group_size} and a last group of {sizes[-1]}"
            )
        return None


@dataclass(frozen=True)
class ActSpec(QuantSpec):
    """How a tensor flowing through the model (a linear's input, or its output) is quantized: a
    QuantSpec over its last dimension, so a row is a token. Dynamic parameters come from each
    tensor as it arrives; static ones (`dynamic` false) are fixed from calibration ranges and
    are per tensor, since a range fixed in advance cannot follow each token."""

    granularity: Granularity = "token"
    dynamic: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity == "channel":
            raise ValueError("granularity channel is one scale per weight row; activations are quantized per "
                             "token, per tensor or in groups of a token's channels")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError(f"dynamic false (static ranges from calibration) needs granularity tensor, got "
                             f"{self.granularity}: a range fixed in advance cannot follow each token")


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes with one scale (and zero point, if asymmetric) per group along the last dim."""

    codes: torch.Tensor  # same shape as the input; int8 (symmetric), uint8 (asymmetric) or float8_e4m3fn
    scale: torch.Tensor  # [..., n_groups]
    zero: torch.Tensor | None  # [..., n_groups], None when symmetric
    spec: QuantSpec
    dtype: torch.dtype  # the dtype to dequantize to

    def dequantize(self) -> torch.Tensor:
        codes = as_rows(self.codes, self.spec).to(self.scale.dtype)
        sizes = self.spec.group_sizes(codes.shape[-1])
        scale = expand_groups(self.scale, sizes)
        if self.zero is not None:
            codes = codes - expand_groups(self.zero, sizes)
        return (codes * scale).reshape(self.codes.shape).to(self.dtype)

    def nbytes(self) -> int:
        """Storage if codes were packed at `spec.bits` each, plus scales and zero points as stored."""
        code_bytes = (self.codes.numel() * self.spec.bits + 7) // 8
        param_bytes = self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            param_bytes += self.zero.numel() * self.zero.element_size()
        return code_bytes + param_bytes


def group_views(x: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, slice]]:
    """The last dim of `x` as views [..., n, size] of equal groups (the full groups, then the
    smaller last group if there is one), each with the slice of group indices it covers."""
    size = sizes[0]
    full = sum(1 for s in sizes if s == size)
    views = [(x[..., : full * size].unflatten(-1, (full, size)), slice(0, full))]
    if full < len(sizes):
        views.append((x[..., full * size :].unsqueeze(-2), slice(full, full + 1)))
    return views


def group_reduce(x: torch.Tensor, sizes: list[int], reduce: str) -> torch.Tensor:
    """Reduce the last dim of `x` group by group (`reduce` is a tensor method such as "amax"):
    [..., n] -> [..., n_groups]."""
    return torch.cat([getattr(view, reduce)(dim=-1) for view, _ in group_views(x, sizes)], dim=-1)


def expand_groups(params: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Broadcast per-group parameters back over the elements of each group ([..., n_groups] ->
    [..., sum(sizes)]): the equal groups as one broadcast view, then the smaller last group
    (repeat_interleave gives the same values several times slower)."""
    full = sum(1 for size in sizes if size == sizes[0])
    parts = [params[..., :full].unsqueeze(-1).expand(*params.shape[:-1], full, sizes[0]).flatten(-2)]
    if full < len(sizes):
        parts.append(params[..., full:].expand(*params.shape[:-1], sizes[-1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def as_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Tensor granularity is one group over everything: view it as a single row."""
    return x.reshape(1, -1) if spec.granularity == "tensor" else x


def find_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None if symmetric) per group of `x`, from its range: [..., n_groups]."""
    work = as_rows(x.float(), spec)
    sizes = spec.group_sizes(work.shape[-1])
    xmin = group_reduce(work, sizes, "amin")
    xmax = group_reduce(work, sizes, "amax")
    return params_from_range(xmin, xmax, spec)


def params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point covering [xmin, xmax] (extended to contain 0 when asymmetric)."""
    if spec.symmetric:
        scale = torch.maximum(xmin.abs(), xmax.abs()) / spec.qmax
    else:
        xmin = xmin.clamp(max=0)
        scale = (xmax.clamp(min=0) - xmin) / spec.qmax
    # An all-zero group gets scale 1: any scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = None if spec.symmetric else torch.round(-xmin / scale)
    return scale, zero


def round_to_grid_(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Values already divided by their scale (and shifted by their zero point), rounded to the
    codes of `spec` (in place for INT): integers in [qmin, qmax], or the nearest float8 e4m3fn
    value, ties to even (torch's cast, checked against the format's definition by the tests).
    FP8 saturates: values beyond +-448 are clamped before the cast, as deployed FP8 kernels
    do; the cast alone is not reliable there (older torch versions give NaN from 480 on,
    torch 2.13 on CPU saturates, even infinities)."""
    if spec.format == "fp8_e4m3":
        return v.clamp_(spec.qmin, spec.qmax).to(torch.float8_e4m3fn).to(v.dtype)
    return v.round_().clamp_(spec.qmin, spec.qmax)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    shifted = x / scale  # a new tensor: everything after it works in place
    if zero is not None:
        shifted += zero
    return round_to_grid_(shifted, spec)


def fake_quantize_with(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """`x` rounded onto the grid of `scale`/`zero` (already broadcastable to `x`) and dequantized.
    Zero points may be fractional (HQQ optimizes them as floats)."""
    codes = _codes(x, scale, zero, spec)
    if zero is not None:
        codes -= zero
    return codes.mul_(scale)


def code_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.format == "fp8_e4m3":
        return torch.float8_e4m3fn
    return torch.int8 if spec.symmetric else torch.uint8


def quantize_with(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> QuantizedTensor:
    """Codes of `x` under given per-group parameters ([..., n_groups])."""
    work = as_rows(x.float(), spec)
    sizes = spec.group_sizes(work.shape[-1])
    zero_full = None if zero is None else expand_groups(zero, sizes)
    codes = _codes(work, expand_groups(scale, sizes), zero_full, spec)
    codes = codes.to(code_dtype(spec)).reshape(x.shape)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=spec, dtype=x.dtype)


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize `x` to codes, with parameters computed from `x` itself (dynamic / RTN)."""
    return quantize_with(x, *find_params(x, spec), spec)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize: the tensor as a kernel would see it, in `x`'s dtype.

    The same numbers as `quantize(x, spec).dequantize()` (the same float operations on each
    element; tested bit for bit), without materializing codes or per-element parameters:
    each group's scale and zero point broadcast over a [..., groups, size] view. This is the
    hot path of simulated activations, run on every linear input at every forward."""
    work = as_rows(x.float(), spec)
    scale, zero = find_params(work, spec)
    parts = [
        fake_quantize_with(view, scale[..., groups, None], None if zero is None else zero[..., groups, None],
                           spec).flatten(-2)
        for view, groups in group_views(work, spec.group_sizes(work.shape[-1]))
    ]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).reshape(x.shape).to(x.dtype)


class RangeObserver:
    """The running minimum and maximum of every tensor observed (the calibration batches): the
    range that static per-tensor parameters cover. For a symmetric spec that is the running
    absmax, as SmoothQuant's static scales (max |x| over all calibration tokens)."""

    def __init__(self) -> None:
        self.xmin: torch.Tensor | None = None
        self.xmax: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        xmin, xmax = torch.aminmax(x.detach().float())
        self.xmin = xmin if self.xmin is None else torch.minimum(self.xmin, xmin)
        self.xmax = xmax if self.xmax is None else torch.maximum(self.xmax, xmax)

    def params(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point (0-dim tensors; zero None if symmetric) covering the observed range."""
        if self.xmin is None or self.xmax is None:
            raise ValueError("no tensor was observed: static parameters need calibration data")
        if spec.granularity != "tensor":
            raise ValueError(f"an observed range gives per-tensor parameters, not per {spec.granularity}")
        return params_from_range(self.xmin, self.xmax, spec)


def codebook_fake_quantize(x: torch.Tensor, levels: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Non-uniform quantization: each group is scaled by its absmax and every element rounded to
    the nearest of `levels` (sorted, symmetric, within [-1, 1]), e.g. power-of-two grids."""
    work = as_rows(x.float(), spec)
    sizes = spec.group_sizes(work.shape[-1])
    alpha = expand_groups(group_reduce(work.abs(), sizes, "amax"), sizes)
    alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    levels = levels.to(work.device, work.dtype)
    midpoints = (levels[1:] + levels[:-1]) / 2
    nearest = levels[torch.bucketize(work / alpha, midpoints)]
    return (nearest * alpha).reshape(x.shape).to(x.dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (uint8, each < 2**bits) packed along the last dim, 8 // bits per byte,
    when `bits` divides 8; otherwise returned as they are (a byte per code). A ragged end is
    padded with zeros; `unpack_codes` needs the original length."""
    if 8 % bits:
        return codes
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    lanes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (lanes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes, last dim `length`."""
    if 8 % bits:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    lanes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return lanes.reshape(*packed.shape[:-1], -1)[..., :length]
