"""The shared quantizer (ptq.quant): exactness on the grid, error bounds, code ranges,
group layout, parameter shapes and validation of QuantSpec."""

from __future__ import annotations

import itertools

import pytest
import torch

from ptq.quant import QuantizedTensor, QuantSpec, fake_quantize, quantize

BITS = (2, 3, 4, 8)
GRANULARITIES = ("tensor", "channel", "token", "group")


def group_sizes_by_hand(row_length: int, granularity: str, group_size: int) -> list[int]:
    if granularity != "group":
        return [row_length]
    sizes = [group_size] * (row_length // group_size)
    if row_length % group_size:
        sizes.append(row_length % group_size)
    return sizes


def expand(params: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-group parameters [..., n_groups] -> per element [..., sum(sizes)] (independent of ptq)."""
    return torch.cat([params[..., i : i + 1].expand(*params.shape[:-1], size) for i, size in enumerate(sizes)], dim=-1)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


# --------------------------------------------------------------------------- exact grid


def on_grid(shape: tuple[int, int], spec: QuantSpec, seed: int):
    """Codes, scales (powers of two, so every product is exact) and zero points built by hand,
    with every group using its full range, and the tensor they represent."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    _, qmax = qrange(spec.bits, spec.symmetric)
    if spec.granularity == "tensor":
        param_shape = (1, 1)
        sizes = [cols]
        # one group: the whole tensor; its range ends go into the first row
        segments = [(0, 0)]
    else:
        sizes = group_sizes_by_hand(cols, spec.granularity, spec.group_size)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        param_shape = (rows, len(sizes))
        segments = [(r, start) for r in range(rows) for start in starts]
    scale = 2.0 ** torch.randint(-6, 3, param_shape, generator=gen).float()
    if spec.symmetric:
        codes = torch.randint(-qmax, qmax + 1, shape, generator=gen)
        zero = None
    else:
        codes = torch.randint(0, qmax + 1, shape, generator=gen)
        zero = torch.randint(0, qmax + 1, param_shape, generator=gen).float()
    # Each group reaches the ends of its range, so the quantizer recovers exactly these parameters.
    for r, start in segments:
        if spec.symmetric:
            codes[r, start] = qmax if (r + start) % 2 else -qmax
        else:
            codes[r, start] = 0
            codes[r, start + 1] = qmax
    if spec.granularity == "tensor":
        per_elem_scale = scale.expand(shape)
        per_elem_zero = None if zero is None else zero.expand(shape)
    else:
        per_elem_scale = expand(scale, sizes)
        per_elem_zero = None if zero is None else expand(zero, sizes)
    values = codes.float() - (per_elem_zero if per_elem_zero is not None else 0)
    x = values * per_elem_scale
    return x, codes, scale, zero


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_values_on_the_grid_round_trip_exactly(bits: int, symmetric: bool, granularity: str) -> None:
    # 6 rows of 40: with group_size 16, groups of 16, 16 and a last one of 8.
    spec = QuantSpec(bits, symmetric=symmetric, granularity=granularity, group_size=16)
    x, codes, scale, zero = on_grid((6, 40), spec, seed=bits * 10 + symmetric)

    assert torch.equal(fake_quantize(x, spec), x)
    q = quantize(x, spec)
    assert torch.equal(q.codes.long(), codes)
    assert torch.equal(q.scale, scale)
    if symmetric:
        assert q.zero is None
    else:
        assert torch.equal(q.zero, zero)


# ------------------------------------------------------------------------- error bound


def random_weights(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows of different magnitudes, a few outliers, and an uneven last group (300 = 4 * 64 + 44)
    x = torch.randn(8, 300, generator=gen) * torch.logspace(-2, 1, 8).unsqueeze(1)
    x[2, 17] *= 25
    x[5, 290] *= -40
    return x


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_error_is_at_most_half_a_step_and_shrinks_with_bits(symmetric: bool, granularity: str) -> None:
    x = random_weights()
    mean_errors = []
    for bits in BITS:
        spec = QuantSpec(bits, symmetric=symmetric, granularity=granularity, group_size=64)
        q = quantize(x, spec)
        if granularity == "tensor":
            assert q.scale.numel() == 1
            step = q.scale.reshape(()).expand(x.shape)
        else:
            step = expand(q.scale, group_sizes_by_hand(x.shape[-1], granularity, 64))
        error = (x - q.dequantize()).abs()
        bound = step / 2 * (1 + 1e-5) + 1e-7
        assert (error <= bound).all(), f"bits={bits}: worst excess {(error - step / 2).max().item()}"
        assert torch.equal(q.dequantize(), fake_quantize(x, spec))
        mean_errors.append(error.mean().item())
    assert all(a > b for a, b in itertools.pairwise(mean_errors)), mean_errors


def test_finer_granularity_is_not_worse_on_rows_of_different_scales() -> None:
    x = random_weights()
    err = {g: (x - fake_quantize(x, QuantSpec(4, granularity=g, group_size=64))).abs().mean().item()
           for g in ("tensor", "channel", "group")}
    assert err["group"] < err["channel"] < err["tensor"]


# -------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_code_ranges_and_dtypes(bits: int, granularity: str) -> None:
    x = random_weights(seed=bits)
    sym = quantize(x, QuantSpec(bits, symmetric=True, granularity=granularity, group_size=64))
    assert sym.codes.dtype == torch.int8
    assert sym.codes.shape == x.shape
    assert -(2 ** (bits - 1)) <= sym.codes.min().item() and sym.codes.max().item() <= 2 ** (bits - 1) - 1
    assert (sym.spec.qmin, sym.spec.qmax) == qrange(bits, True)
    # scale = absmax / (2^(b-1) - 1): the largest magnitude lands on the top code
    assert sym.codes.abs().max().item() == 2 ** (bits - 1) - 1

    asym = quantize(x, QuantSpec(bits, symmetric=False, granularity=granularity, group_size=64))
    assert asym.codes.dtype == torch.uint8
    assert 0 <= asym.codes.min().item() and asym.codes.max().item() <= 2**bits - 1
    assert (asym.spec.qmin, asym.spec.qmax) == qrange(bits, False)
    assert asym.codes.min().item() == 0  # the minimum maps to code 0
    assert asym.zero is not None and ((asym.zero >= 0) & (asym.zero <= 2**bits - 1)).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_asymmetric_range_contains_zero(bits: int, granularity: str) -> None:
    gen = torch.Generator().manual_seed(bits)
    spec = QuantSpec(bits, symmetric=False, granularity=granularity, group_size=32)
    mixed = torch.randn(4, 96, generator=gen) + 0.3
    mixed[:, ::7] = 0.0  # zeros in every row and every group
    out = fake_quantize(mixed, spec)
    zeros = mixed == 0
    assert (out[zeros] == 0).all()

    # rows entirely positive or entirely negative: the range is stretched to include zero
    positive = torch.rand(4, 96, generator=gen) + 1.0  # in [1, 2)
    q = quantize(positive, spec)
    assert (q.zero == 0).all()
    assert torch.allclose(q.scale, _amax(positive, spec) / (2**bits - 1))
    negative = -positive
    q = quantize(negative, spec)
    assert (q.zero == 2**bits - 1).all()
    assert torch.equal(fake_quantize(torch.cat([positive, torch.zeros(4, 1)], 1), spec)[:, -1], torch.zeros(4))


def _amax(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "tensor":
        return x.abs().max().reshape(1, 1)
    sizes = group_sizes_by_hand(x.shape[-1], spec.granularity, spec.group_size)
    return torch.stack([part.abs().amax(dim=-1) for part in x.split(sizes, dim=-1)], dim=-1)


def test_symmetric_zero_maps_to_zero() -> None:
    x = torch.tensor([[0.0, 1.0, -3.0, 0.5], [2.0, 0.0, 0.0, -0.25]])
    out = fake_quantize(x, QuantSpec(3, symmetric=True, granularity="token"))
    assert (out[x == 0] == 0).all()


# -------------------------------------------------------------------------------- groups


def test_uneven_groups_576_by_128() -> None:
    spec = QuantSpec(4, symmetric=False, granularity="group", group_size=128)
    assert spec.group_sizes(576) == [128, 128, 128, 128, 64]
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    q = quantize(x, spec)
    assert q.scale.shape == (3, 5) and q.zero.shape == (3, 5)
    # the last column of parameters comes from the 64 tail elements alone
    tail = x[:, 512:]
    expected = (tail.amax(-1).clamp(min=0) - tail.amin(-1).clamp(max=0)) / 15
    assert torch.allclose(q.scale[:, 4], expected)

    note = spec.describe(576)
    assert note is not None and "4 groups of 128" in note and "last group of 64" in note
    assert spec.describe(512) is None  # divides evenly
    assert spec.describe(100) is None  # one (short) group per row
    assert QuantSpec(4, granularity="channel").describe(576) is None
    assert QuantSpec(4, granularity="token", group_size=128).describe(576) is None


@pytest.mark.parametrize("group", range(5))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_a_group_scale_depends_only_on_its_own_elements(group: int, symmetric: bool) -> None:
    spec = QuantSpec(4, symmetric=symmetric, granularity="group", group_size=128)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    before = quantize(x, spec)
    y = x.clone()
    y[1, 128 * group + 5] = 50.0  # a new maximum in (row 1, group k)
    after = quantize(y, spec)
    changed = before.scale != after.scale
    assert changed[1, group]
    assert changed.sum() == 1
    if not symmetric:
        assert ((before.zero != after.zero).nonzero().tolist()) in ([], [[1, group]])
    # codes outside that group are untouched
    start, stop = 128 * group, min(128 * (group + 1), 576)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, start:stop] = False
    assert torch.equal(before.codes[mask], after.codes[mask])


@pytest.mark.parametrize("granularity", ["group", "channel", "token"])
def test_groups_never_span_rows(granularity: str) -> None:
    spec = QuantSpec(3, symmetric=False, granularity=granularity, group_size=128)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3))
    before = quantize(x, spec)
    y = x.clone()
    y[2] = y[2] * 100 - 7  # perturb a whole row
    after = quantize(y, spec)
    others = [0, 1, 3]
    assert torch.equal(before.scale[others], after.scale[others])
    assert torch.equal(before.zero[others], after.zero[others])
    assert torch.equal(before.codes[others], after.codes[others])
    assert torch.equal(fake_quantize(x, spec)[others], fake_quantize(y, spec)[others])
    assert (before.scale[2] != after.scale[2]).all()


def test_group_larger_than_row_is_one_group_per_row() -> None:
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(4))
    grouped = quantize(x, QuantSpec(4, granularity="group", group_size=128))
    per_row = quantize(x, QuantSpec(4, granularity="channel"))
    assert grouped.scale.shape == (3, 1)
    assert torch.equal(grouped.scale, per_row.scale)
    assert torch.equal(grouped.dequantize(), per_row.dequantize())


# ------------------------------------------------------------------------ shapes, zeros


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_parameter_shapes_per_granularity(symmetric: bool) -> None:
    x2 = torch.randn(4, 10)
    x3 = torch.randn(2, 3, 10)
    expected = {
        "tensor": ((1, 1), (1, 1)),
        "channel": ((4, 1), (2, 3, 1)),
        "token": ((4, 1), (2, 3, 1)),
        "group": ((4, 3), (2, 3, 3)),  # group_size 4: 4 + 4 + 2
    }
    for granularity, (shape2, shape3) in expected.items():
        spec = QuantSpec(8, symmetric=symmetric, granularity=granularity, group_size=4)
        for x, shape in ((x2, shape2), (x3, shape3)):
            q = quantize(x, spec)
            assert tuple(q.scale.shape) == shape, granularity
            assert (q.zero is None) == symmetric
            if not symmetric:
                assert q.zero.shape == q.scale.shape
            assert q.codes.shape == x.shape
            assert fake_quantize(x, spec).shape == x.shape


def test_tensor_granularity_shares_one_scale() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(5))
    q = quantize(x, QuantSpec(4, symmetric=True, granularity="tensor"))
    assert q.scale.item() == pytest.approx(x.abs().max().item() / 7)


def test_channel_and_token_are_the_same_reduction() -> None:
    x = torch.randn(6, 33, generator=torch.Generator().manual_seed(6))
    for symmetric in (True, False):
        a = quantize(x, QuantSpec(4, symmetric=symmetric, granularity="channel"))
        b = quantize(x, QuantSpec(4, symmetric=symmetric, granularity="token"))
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        scale = (x.abs().amax(-1, keepdim=True) / 7) if symmetric else (
            (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 15)
        assert torch.allclose(a.scale, scale)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_all_zero_tensor_round_trips_without_nan(symmetric: bool, granularity: str) -> None:
    spec = QuantSpec(4, symmetric=symmetric, granularity=granularity, group_size=8)
    x = torch.zeros(3, 20)
    q = quantize(x, spec)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    out = q.dequantize()
    assert torch.isfinite(out).all()
    assert torch.equal(out, x)


def test_an_all_zero_group_next_to_others_stays_zero() -> None:
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(7))
    x[1, 8:16] = 0.0
    for symmetric in (True, False):
        spec = QuantSpec(4, symmetric=symmetric, granularity="group", group_size=8)
        out = fake_quantize(x, spec)
        assert torch.isfinite(out).all()
        assert (out[1, 8:16] == 0).all()
        assert (out - x).abs().max() <= quantize(x, spec).scale.max() / 2 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(4, 64).to(dtype)
    q = quantize(x, QuantSpec(4, group_size=32))
    assert q.dtype == dtype
    assert fake_quantize(x, QuantSpec(4, group_size=32)).dtype == dtype


# ---------------------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_spec_rejects_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits)


def test_spec_accepts_every_bit_width_in_range() -> None:
    for bits in range(2, 9):
        assert QuantSpec(bits).bits == bits


def test_spec_rejects_unknown_granularity() -> None:
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(4, granularity="row")  # type: ignore[arg-type]


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_spec_rejects_non_positive_group_size_for_groups(group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, granularity="group", group_size=group_size)
    # other granularities ignore the group size
    assert QuantSpec(4, granularity="channel", group_size=group_size).group_sizes(10) == [10]


# -------------------------------------------------------------------------------- nbytes


def test_nbytes_counts_packed_codes_plus_parameters() -> None:
    # 4 x 200, 3 bits, asymmetric groups of 64 -> groups 64, 64, 64, 8: 4 per row
    q = quantize(torch.randn(4, 200), QuantSpec(3, symmetric=False, granularity="group", group_size=64))
    code_bytes = 4 * 200 * 3 // 8  # 2400 bits = 300 bytes
    scale_bytes = 4 * 4 * 4  # 16 float32 scales
    zero_bytes = 4 * 4 * 4  # 16 float32 zero points
    assert q.nbytes() == code_bytes + scale_bytes + zero_bytes == 428

    # 3 x 7 codes at 3 bits = 63 bits -> 8 bytes (rounded up), symmetric: 3 scales and no zeros
    q = quantize(torch.randn(3, 7), QuantSpec(3, symmetric=True, granularity="channel"))
    assert q.zero is None
    assert q.nbytes() == 8 + 3 * 4 == 20


def test_nbytes_uses_spec_bits_not_storage_dtype() -> None:
    x = torch.randn(8, 128)
    q8 = quantize(x, QuantSpec(8, granularity="tensor"))
    q4 = quantize(x, QuantSpec(4, granularity="tensor"))
    assert q8.codes.element_size() == q4.codes.element_size() == 1
    assert q8.nbytes() - q4.nbytes() == 8 * 128 * 4 // 8
    assert isinstance(q4, QuantizedTensor)


def test_group_size_minus_one_is_one_group_per_row() -> None:
    w = torch.randn(6, 576)
    per_row = QuantSpec(4, granularity="group", group_size=-1)
    assert per_row.group_sizes(576) == [576]
    assert torch.equal(fake_quantize(w, per_row), fake_quantize(w, QuantSpec(4, granularity="channel")))


# ------------------------------------------------------------------------- bits per weight


@pytest.mark.parametrize(("spec", "rows", "row_length", "expected"), [
    (QuantSpec(4, symmetric=False, group_size=128), 8, 1024, 4 + 2 * 16 / 128),  # the papers' 4.25
    (QuantSpec(4, symmetric=True, group_size=128), 8, 1024, 4 + 16 / 128),
    (QuantSpec(4, symmetric=False, group_size=128), 3, 576, 4 + 5 * 2 * 16 / 576),  # 4 groups of 128 + one of 64
    (QuantSpec(3, symmetric=False, granularity="group", group_size=-1), 3, 576, 3 + 2 * 16 / 576),
    (QuantSpec(8, symmetric=True, granularity="channel"), 3, 576, 8 + 16 / 576),
    (QuantSpec(8, symmetric=False, granularity="tensor"), 3, 576, 8 + 2 * 16 / (3 * 576)),
])
def test_bits_per_weight(spec: QuantSpec, rows: int, row_length: int, expected: float) -> None:
    assert spec.bits_per_weight(row_length, rows) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("bits", "symmetric", "granularity", "group"), [
    (4, False, "group", 128), (3, True, "group", 100), (8, True, "channel", 128), (2, False, "tensor", 128)])
def test_bits_per_weight_counts_the_quantizers_own_parameters(bits: int, symmetric: bool, granularity: str,
                                                              group: int) -> None:
    spec = QuantSpec(bits, symmetric=symmetric, granularity=granularity, group_size=group)
    weight = torch.randn(6, 576)
    q = quantize(weight, spec)
    params = q.scale.numel() + (0 if q.zero is None else q.zero.numel())
    assert spec.bits_per_weight(576, 6, meta_bits=16) == pytest.approx(bits + params * 16 / weight.numel(), rel=1e-12)


def test_bits_per_weight_of_linears_is_the_size_weighted_mean() -> None:
    from torch import nn

    from ptq.transforms import bits_per_weight

    linears = {"a": nn.Linear(576, 4, bias=False), "b": nn.Linear(1536, 2, bias=False)}
    spec = QuantSpec(4, symmetric=False, group_size=128)
    expected = ((4 * 576 * spec.bits_per_weight(576, 4) + 2 * 1536 * spec.bits_per_weight(1536, 2))
                / (4 * 576 + 2 * 1536))
    assert bits_per_weight(linears, {"a": spec, "b": spec}) == pytest.approx(expected, rel=1e-12)
    assert bits_per_weight(linears, {}) == 32  # float32 weights, as stored
    mixed = (4 * 576 * spec.bits_per_weight(576, 4) + 2 * 1536 * 32) / (4 * 576 + 2 * 1536)
    assert bits_per_weight(linears, {"a": spec}) == pytest.approx(mixed, rel=1e-12)  # each as it ran
