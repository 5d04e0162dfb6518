"""Activation quantization: ActSpec validation, FP8 E4M3 against torch's float8_e4m3fn cast,
error bounds and round trips per mode (per-token / per-tensor dynamic, per-tensor static),
the broadcast fast path of fake_quantize against the generic codes path, the range observer
and the wrappers (inputs, outputs, static parameters, what is quantized where)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ptq.calib import CalibrationSet
from ptq.config import CalibConfig, CellConfig, Layer, parse_override, read_yaml_layer, resolve
from ptq.dependencies import fingerprint, settings
from ptq.engine import QuantResult
from ptq.errors import ConfigError
from ptq.matrix import Catalog, Cell, Selection
from ptq.models.adapters import adapter_for
from ptq.pipeline import quantize_activations
from ptq.registry import discover
from ptq.quant import (
    ActSpec,
    QuantSpec,
    RangeObserver,
    fake_quantize,
    fake_quantize_with,
    quantize,
)
from ptq.transforms import ActQuantizer, ActQuantLinear, act_quant_sites, quantize_inputs, recording_ranges

FP8 = torch.float8_e4m3fn
BENCH = Path(__file__).resolve().parents[1] / "bench"
INT8_TOKEN = ActSpec(8, symmetric=True, granularity="token")
FP8_TOKEN = ActSpec(8, symmetric=True, granularity="token", format="fp8_e4m3")


def activations(seed: int, shape: tuple[int, ...] = (3, 17, 96)) -> torch.Tensor:
    """Token vectors of very different magnitudes with a few outlier channels, as in LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[-2]).unsqueeze(-1)
    x[..., 5] *= 30
    x[..., 40] -= 3
    return x


# ----------------------------------------------------------------------------- ActSpec


def test_act_spec_defaults_to_dynamic_per_token_int() -> None:
    spec = ActSpec(8, symmetric=True)
    assert (spec.granularity, spec.dynamic, spec.format) == ("token", True, "int")
    assert isinstance(spec, QuantSpec)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 8, "granularity": "channel"}, "granularity channel is one scale per weight row"),
    ({"bits": 8, "granularity": "token", "dynamic": False}, "dynamic false .* got token"),
    ({"bits": 8, "granularity": "group", "dynamic": False}, "needs granularity tensor, got group"),
    ({"bits": 4, "symmetric": True, "format": "fp8_e4m3"}, "format fp8_e4m3 .* needs bits 8 .* got bits 4"),
    ({"bits": 8, "symmetric": False, "format": "fp8_e4m3"}, "needs bits 8 and symmetric true"),
    ({"bits": 8, "format": "fp4"}, "format must be one of"),
    ({"bits": 1}, "bits must be between 2 and 8"),
])
def test_act_spec_rejects_what_it_cannot_express(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ActSpec(**kwargs)


def test_fp8_weight_spec_is_a_quant_spec_too() -> None:
    with pytest.raises(ValueError, match="needs bits 8"):
        QuantSpec(6, symmetric=True, granularity="channel", format="fp8_e4m3")
    spec = QuantSpec(8, symmetric=True, granularity="channel", format="fp8_e4m3")
    # 8-bit codes and one 16-bit scale per row of 576, as symmetric INT8 per channel
    assert spec.bits_per_weight(576, rows=3) == pytest.approx(8 + 16 / 576, rel=1e-12)
    int8 = QuantSpec(8, symmetric=True, granularity="channel")
    assert spec.bits_per_weight(576, rows=3) == int8.bits_per_weight(576, rows=3)


HEADER = ("model: {name: m, family: llama, source: {kind: hub, id: org/m}}\n"
          "track: {name: B}\n\n")  # the blank line keeps the spec on line 4, as with a method line


def resolve_rtn(layers: list[Layer]) -> CellConfig:
    return resolve(layers, {name: info.params for name, info in discover().items()}, ("rtn",), "rtn")


def cell_from(tmp_path: Path, text: str):
    path = tmp_path / "cell.yaml"
    path.write_text(HEADER + text)
    return resolve_rtn([read_yaml_layer(path)]), path


@pytest.mark.parametrize(("text", "expected"), [
    ("act: {bits: 8, symmetric: true, granularity: token}\n", ActSpec(8, symmetric=True)),
    ("act: {bits: 8, symmetric: true, granularity: tensor, dynamic: false}\n",
     ActSpec(8, symmetric=True, granularity="tensor", dynamic=False)),
    ("act: {bits: 8, symmetric: true, granularity: token, format: fp8_e4m3}\n", FP8_TOKEN),
    ("weight: {bits: 8, symmetric: true, granularity: channel, format: fp8_e4m3}\n", None),
])
def test_yaml_expresses_each_activation_mode(tmp_path: Path, text: str, expected: ActSpec | None) -> None:
    config, _ = cell_from(tmp_path, text)
    assert config.act == expected
    if expected is None:
        assert config.weight == QuantSpec(8, symmetric=True, granularity="channel", format="fp8_e4m3")


@pytest.mark.parametrize(("text", "message"), [
    ("act: {bits: 8, symmetric: true, granularity: token, dynamic: false}\n", "act: dynamic false"),
    ("act: {bits: 8, format: fp16}\n", "act.format must be 'int' | 'fp8_e4m3', got 'fp16'"),
    ("act: {bits: 4, symmetric: true, format: fp8_e4m3}\n", "act: format fp8_e4m3"),
    ("kv: {key: {bits: 8, symmetric: true, format: fp8_e4m3, granularity: token}, value: {bits: 8}}\n",
     "kv: key: format fp8_e4m3 is not implemented for the KV cache"),
])
def test_yaml_mistakes_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cell_from(tmp_path, text)
    assert str(info.value).startswith(f"{tmp_path / 'cell.yaml'}:4: ")
    assert message in str(info.value)


# ------------------------------------------------------------------- FP8 E4M3 vs torch


def e4m3_by_definition() -> tuple[torch.Tensor, torch.Tensor]:
    """The non-negative float8 e4m3fn values from the format's definition (OCP FP8 spec: exponent
    bias 7, 3 mantissa bits, no infinities, S.1111.111 is NaN), in code order, which is value
    order: subnormals m/8 * 2^-6, then normals (1 + m/8) * 2^(e-7) for e = 1..15. Returns the
    values and their codes (float64, so distances below are exact)."""
    values = [m / 8 * 2.0**-6 for m in range(8)]
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return torch.tensor(values, dtype=torch.float64), torch.arange(len(values))


def nearest_e4m3_by_definition(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to the even code, after saturating at +-448: by search over the grid."""
    grid, codes = e4m3_by_definition()
    magnitude = v.double().abs().clamp(max=448)
    above = torch.searchsorted(grid, magnitude).clamp(max=len(grid) - 1)
    below = (above - 1).clamp(min=0)
    to_above, to_below = grid[above] - magnitude, magnitude - grid[below]
    tie = torch.where(codes[above] % 2 == 0, above, below)
    pick = torch.where(to_above < to_below, above, torch.where(to_below < to_above, below, tie))
    return (grid[pick] * v.double().sign()).float()


def scaled_probe_values() -> torch.Tensor:
    """Values in units of the scale: every grid value, every midpoint between neighbours (ties:
    round to even), one float32 ulp either side of each midpoint, subnormals and values below
    the smallest subnormal, random values across all binades, and values beyond 448."""
    positive = e4m3_by_definition()[0][1:].float()
    mids = (positive[1:] + positive[:-1]) / 2
    near = torch.cat([torch.nextafter(mids, torch.zeros_like(mids)),
                      torch.nextafter(mids, torch.full_like(mids, 1e9))])
    tiny = torch.tensor([2.0**-10, 2.0**-10 * 1.0001, 3 * 2.0**-11, 2.0**-11, 2.0**-12, 1e-30, 0.0])
    gen = torch.Generator().manual_seed(0)
    random = torch.exp2(torch.empty(4000).uniform_(-12, 9, generator=gen))
    beyond = torch.tensor([448.0, 449.0, 463.9, 464.0, 465.0, 479.0, 480.0, 500.0, 1e4, float("inf")])
    magnitudes = torch.cat([positive, mids, near, tiny, random, beyond])
    return torch.cat([magnitudes, -magnitudes])


def test_torchs_float8_e4m3fn_is_the_formats_definition() -> None:
    """The independent reference first: torch's 254 finite codes decode to the definition's 127
    non-negative values and their negatives, and its cast rounds as the definition says."""
    decoded = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = e4m3_by_definition()[0].float()
    assert decoded.isnan().sum() == 2 and torch.equal(decoded[decoded.isfinite()].unique(),
                                                      torch.cat([-grid[1:].flip(0), grid]))
    v = scaled_probe_values()
    assert torch.equal(v.clamp(-448, 448).to(FP8).float(), nearest_e4m3_by_definition(v))


def test_fp8_fake_quantization_equals_torchs_cast_on_normals_subnormals_ties_and_saturation() -> None:
    spec = QuantSpec(8, symmetric=True, granularity="tensor", format="fp8_e4m3")
    v = scaled_probe_values()
    for scale in (1.0, 2.0**-7, 0.37):  # a power of two keeps x / scale exact; 0.37 does not
        x = v * scale
        ours = fake_quantize_with(x, torch.tensor(scale), None, spec)
        assert torch.equal(ours, (x / scale).clamp(-448, 448).to(FP8).float() * scale)
        assert torch.equal(ours, nearest_e4m3_by_definition(x / scale) * scale)
    # saturation beyond the range; ties to even: 2^-10 (half the smallest subnormal) -> 0, 1.5 * 2^-9 -> 2^-8
    probes = torch.tensor([1e4, -500.0, float("inf"), 2.0**-10, 3 * 2.0**-10, 0.5625, 17.0, 19.0])
    ours = fake_quantize_with(probes, torch.tensor(1.0), None, spec)
    assert ours.tolist() == [448.0, -448.0, 448.0, 0.0, 2.0**-8, 0.5625, 16.0, 20.0]


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_activations_as_deployed(granularity: str, dtype: torch.dtype) -> None:
    """scale = absmax / 448 per token (or per tensor), values cast to float8_e4m3fn, dequantized."""
    x = activations(1).to(dtype)
    spec = ActSpec(8, symmetric=True, granularity=granularity, format="fp8_e4m3")
    absmax = x.float().abs().amax(dim=-1, keepdim=True) if granularity == "token" else x.float().abs().max()
    scale = absmax / 448
    expected = ((x.float() / scale).to(FP8).float() * scale).to(dtype)
    assert torch.equal(fake_quantize(x, spec), expected)
    q = quantize(x, spec)
    assert q.codes.dtype == FP8 and torch.equal(q.codes.float(), (x.float() / scale).to(FP8).float())
    assert torch.equal(q.dequantize(), expected)
    assert q.nbytes() == x.numel() + q.scale.numel() * 4  # a byte per code, float32 scales as held


def test_fp8_weights_per_channel() -> None:
    w = activations(2, (64, 96))
    spec = QuantSpec(8, symmetric=True, granularity="channel", format="fp8_e4m3")
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    assert torch.equal(fake_quantize(w, spec), (w / scale).to(FP8).float() * scale)


def test_fp8_relative_error_bound_on_normals_and_absolute_on_subnormals() -> None:
    x = activations(3)
    spec = ActSpec(8, symmetric=True, format="fp8_e4m3")
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    error = (x - fake_quantize(x, spec)).abs()
    normal = x.abs() >= scale * 2.0**-6
    # 3 mantissa bits: neighbours are 2^-3 apart relative to the binade, rounding errs by half of that
    assert (error[normal] <= x.abs()[normal] * 2.0**-4 * (1 + 1e-6)).all()
    assert normal.float().mean() > 0.9
    assert (error[~normal] <= (scale * 2.0**-10).expand_as(x)[~normal] * (1 + 1e-6)).all()  # half of 2^-9


# ------------------------------------------------------------- INT activations, dynamic


def int_steps(x: torch.Tensor, bits: int, symmetric: bool, per_token: bool) -> torch.Tensor:
    """The step of each element's grid, from the range by hand (GPTQ's convention: asymmetric
    ranges contain 0)."""
    reduce = (lambda t, f: f(t, dim=-1, keepdim=True)) if per_token else (lambda t, f: f(t))
    if symmetric:
        return reduce(x.abs(), torch.amax) / (2 ** (bits - 1) - 1)
    return (reduce(x, torch.amax).clamp(min=0) - reduce(x, torch.amin).clamp(max=0)) / (2**bits - 1)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_int_activation_error_is_at_most_half_a_step(bits: int, symmetric: bool, granularity: str) -> None:
    x = activations(bits)
    spec = ActSpec(bits, symmetric=symmetric, granularity=granularity)
    step = int_steps(x, bits, symmetric, granularity == "token").expand_as(x)
    out = fake_quantize(x, spec)
    assert ((x - out).abs() <= step / 2 * (1 + 1e-5)).all()
    # each value is on its grid: an integer number of steps from the zero point
    xmin = x.amin(-1, keepdim=True) if granularity == "token" else x.min()
    codes = out / step + (0 if symmetric else torch.round(-xmin.clamp(max=0) / step))
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert all((t.unique().numel() <= 2**bits) for t in out.reshape(-1, x.shape[-1]))


def test_per_token_int8_equals_smoothquants_absmax_formula() -> None:
    """SmoothQuant's fake quantization (fake_quant.py, quantize_activation_per_token_absmax): scale =
    max|x| of the token (clamped at 1e-5) / 127, then x / scale rounded, times scale."""
    x = activations(4)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    assert torch.equal(fake_quantize(x, INT8_TOKEN), (x / scale).round() * scale)
    per_tensor = x.abs().max().clamp(min=1e-5) / 127
    assert torch.equal(fake_quantize(x, ActSpec(8, symmetric=True, granularity="tensor")),
                       (x / per_tensor).round() * per_tensor)


# ------------------------------------------------------- fast path against generic path


SPECS = [
    *(QuantSpec(bits, symmetric=sym, granularity=gran, group_size=group)
      for bits, sym, gran, group in itertools.product((2, 3, 4, 8), (True, False),
                                                      ("tensor", "channel", "token", "group"), (16, 36))),
    QuantSpec(4, granularity="group", group_size=-1),
    QuantSpec(4, granularity="group", group_size=500),  # larger than the row: one group per row
    *(QuantSpec(8, symmetric=True, granularity=gran, group_size=36, format="fp8_e4m3")
      for gran in ("tensor", "channel", "token", "group")),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_fake_quantize_equals_codes_then_dequantize_bit_for_bit(spec: QuantSpec,
                                                                     dtype: torch.dtype) -> None:
    """fake_quantize broadcasts parameters over group views; quantize().dequantize() materializes
    codes and per-element parameters. Same float operations on every element: equal bits."""
    x = activations(5, (2, 9, 96)).to(dtype)  # 96 = 2 * 36 + 24: uneven groups of 36, even groups of 16
    fast, generic = fake_quantize(x, spec), quantize(x, spec).dequantize()
    assert fast.dtype == generic.dtype == dtype
    assert torch.equal(fast, generic)


def test_fake_quantize_leaves_its_input_alone() -> None:
    x = activations(6)
    before = x.clone()
    fake_quantize(x, INT8_TOKEN)
    fake_quantize(x, FP8_TOKEN)
    assert torch.equal(x, before)


# ------------------------------------------------------------------ static, observer


def batches(seed: int, n: int = 4) -> list[torch.Tensor]:
    return [activations(seed + i, (2, 11, 96)) * (1 + i) for i in range(n)]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_observer_range_is_the_range_of_all_batches(symmetric: bool) -> None:
    observer = RangeObserver()
    seen = batches(7)
    for x in seen:
        observer.observe(x)
    every = torch.cat([x.flatten() for x in seen])
    assert observer.xmin == every.min() and observer.xmax == every.max()
    spec = ActSpec(8, symmetric=symmetric, granularity="tensor", dynamic=False)
    scale, zero = observer.params(spec)
    if symmetric:  # SmoothQuant's static scale: absmax over every calibration token / 127
        assert zero is None and scale == every.abs().max() / 127
    else:
        assert scale == (every.max() - every.min()) / 255 and zero == torch.round(-every.min() / scale)
    # the same parameters as dynamic per-tensor quantization of everything at once
    dynamic = quantize(every, QuantSpec(8, symmetric=symmetric, granularity="tensor"))
    assert torch.equal(scale.reshape(1, 1), dynamic.scale)


def test_observer_needs_data_and_gives_per_tensor_parameters_only() -> None:
    with pytest.raises(ValueError, match="no tensor was observed"):
        RangeObserver().params(ActSpec(8, symmetric=True, granularity="tensor", dynamic=False))
    observer = RangeObserver()
    observer.observe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="per-tensor parameters, not per token"):
        observer.params(INT8_TOKEN)


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (6, False)])
def test_static_int_error_bound_inside_the_range_and_clamping_outside(bits: int, symmetric: bool) -> None:
    spec = ActSpec(bits, symmetric=symmetric, granularity="tensor", dynamic=False)
    observer = RangeObserver()
    for x in batches(8):
        observer.observe(x)
    quantizer = ActQuantizer(spec, *observer.params(spec))
    lo, hi = observer.xmin.clamp(max=0), observer.xmax.clamp(min=0)  # asymmetric ranges contain 0
    if symmetric:  # codes -2^(b-1) .. 2^(b-1) - 1, scale absmax / (2^(b-1) - 1): int8 codes as kernels clamp
        step = torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
        ends = (-(2 ** (bits - 1)) * step, (2 ** (bits - 1) - 1) * step)
    else:  # codes 0 .. 2^b - 1 with an integer zero point: the ends are within half a step of the range
        step = (hi - lo) / (2**bits - 1)
        ends = ((0 - torch.round(-lo / step)) * step, (2**bits - 1 - torch.round(-lo / step)) * step)
    x = activations(99, (2, 11, 96)) * 3  # new data, partly outside the calibrated range
    x[0, 0, :4] = torch.tensor([1e3, -1e3, 5 * hi.item(), 5 * lo.item()])  # far outliers
    out = quantizer(x)
    inside = (x >= ends[0]) & (x <= ends[1])
    assert inside.float().mean() > 0.5 and (~inside).any()
    assert ((x - out).abs()[inside] <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # values outside are clamped to the ends of the grid
    assert torch.allclose(out[x > ends[1]], ends[1], rtol=1e-6)
    assert torch.allclose(out[x < ends[0]], ends[0], rtol=1e-6)
    assert (x > ends[1]).any() and (x < ends[0]).any()


def test_static_values_on_the_grid_round_trip_exactly() -> None:
    spec = ActSpec(8, symmetric=False, granularity="tensor", dynamic=False)
    scale, zero = torch.tensor(2.0**-4), torch.tensor(37.0)  # grid: (code - 37) / 16, codes 0..255
    codes = torch.randint(0, 256, (5, 64), generator=torch.Generator().manual_seed(0)).float()
    x = (codes - zero) * scale
    assert torch.equal(ActQuantizer(spec, scale, zero)(x), x)


def test_static_fp8_saturates_outside_the_calibrated_range() -> None:
    spec = ActSpec(8, symmetric=True, granularity="tensor", dynamic=False, format="fp8_e4m3")
    observer = RangeObserver()
    observer.observe(torch.tensor([-2.0, 1.0]))
    scale, zero = observer.params(spec)
    assert zero is None and scale == 2.0 / 448
    x = torch.tensor([0.3, -1.7, 3.0, -100.0])
    expected = (x / scale).clamp(-448, 448).to(FP8).float() * scale
    assert torch.equal(ActQuantizer(spec, scale)(x), expected)
    assert ActQuantizer(spec, scale)(x)[2:].tolist() == [2.0, -2.0]


def test_quantizer_rejects_missing_or_unneeded_parameters() -> None:
    static = ActSpec(8, symmetric=True, granularity="tensor", dynamic=False)
    with pytest.raises(ValueError, match="needs calibrated ranges"):
        ActQuantizer(static)
    with pytest.raises(ValueError, match="dynamic activation spec takes its parameters from each tensor"):
        ActQuantizer(INT8_TOKEN, torch.tensor(1.0))
    with pytest.raises(ValueError, match="zero point goes with an asymmetric spec"):
        ActQuantizer(static, torch.tensor(1.0), torch.tensor(3.0))


# ----------------------------------------------------------------------------- wrappers


def test_wrapper_quantizes_the_input_and_optionally_the_output() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = activations(9)
    plain = ActQuantLinear(linear, ActQuantizer(INT8_TOKEN))
    both = ActQuantLinear(linear, ActQuantizer(INT8_TOKEN), ActQuantizer(FP8_TOKEN))
    with torch.no_grad():
        assert torch.equal(plain(x), linear(fake_quantize(x, INT8_TOKEN)))
        assert torch.equal(both(x), fake_quantize(linear(fake_quantize(x, INT8_TOKEN)), FP8_TOKEN))


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_sites_report_exactly_what_is_quantized_where() -> None:
    model = tiny_llama()
    adapter = adapter_for(model)
    linears = list(adapter.quantizable_linears(model))
    qkv = adapter.attention_projections(model)
    assert qkv == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]
    quantize_inputs(model, linears, INT8_TOKEN, outputs=qkv)
    sites = act_quant_sites(model)
    assert list(sites) == linears and len(linears) == 2 * 7
    spec_fields = {"bits": 8, "symmetric": True, "granularity": "token", "group_size": 128, "format": "int",
                   "dynamic": True}
    for name, site in sites.items():
        assert site["input"] == spec_fields
        assert site["output"] == (spec_fields if name in qkv else None)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert model(ids).logits.isfinite().all()


def test_outputs_must_be_among_the_wrapped_linears() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="outputs to quantize must be among the wrapped linears"):
        quantize_inputs(model, ["model.layers.0.mlp.up_proj"], INT8_TOKEN,
                        outputs=["model.layers.0.self_attn.q_proj"])


def test_static_quantization_of_a_model_from_calibration_ranges() -> None:
    """Ranges recorded over calibration batches (float model) become each site's static scale:
    absmax of everything that site saw / 127, checked against inputs collected by hand."""
    model = tiny_llama()
    adapter = adapter_for(model)
    linears = list(adapter.quantizable_linears(model))
    qkv = adapter.attention_projections(model)
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 128, (2, 24), generator=gen) for _ in range(3)]
    seen: dict[tuple[str, str], list[torch.Tensor]] = {}
    handles = []
    for name in linears:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda _m, a, n=name: seen.setdefault((n, "input"), []).append(a[0])))
        handles.append(module.register_forward_hook(
            lambda _m, _a, y, n=name: seen.setdefault((n, "output"), []).append(y)))
    with torch.inference_mode(), recording_ranges(model, linears, outputs=qkv) as ranges:
        float_logits = [model(ids).logits for ids in calibration]
    for handle in handles:
        handle.remove()
    static = ActSpec(8, symmetric=True, granularity="tensor", dynamic=False)
    quantize_inputs(model, linears, static, outputs=qkv, ranges=ranges)
    sites = act_quant_sites(model)
    for name in linears:
        for where in ("input", "output"):
            if where == "output" and name not in qkv:
                assert sites[name]["output"] is None
                continue
            absmax = max(t.abs().max().item() for t in seen[(name, where)])
            assert sites[name][where]["scale"] == pytest.approx(absmax / 127, rel=1e-6)
            assert sites[name][where]["dynamic"] is False and sites[name][where]["zero"] is None
    with torch.inference_mode():
        quantized = model(calibration[0]).logits
    assert quantized.isfinite().all() and not torch.equal(quantized, float_logits[0])
    # 8-bit static ranges fitted on these very inputs: close to float
    assert (quantized - float_logits[0]).abs().max() < 0.1 * float_logits[0].abs().max()
    # and the hooks of recording_ranges are gone: another forward observes nothing
    before = ranges[linears[0]]["input"].xmax.clone()
    with torch.inference_mode():
        model(calibration[0] * 0 + 3)
    assert torch.equal(ranges[linears[0]]["input"].xmax, before)


def test_static_spec_without_ranges_is_a_clear_error() -> None:
    model = tiny_llama()
    static = ActSpec(8, symmetric=True, granularity="tensor", dynamic=False)
    with pytest.raises(ValueError, match=r"calibrated range of model.layers.0.mlp.up_proj \(input\)"):
        quantize_inputs(model, ["model.layers.0.mlp.up_proj"], static)


def test_dynamic_model_output_matches_per_linear_fake_quantization() -> None:
    """Wrapping is transparent: the W8A8 model's logits equal those of a model whose linears call
    the generic quantize().dequantize() on their inputs."""
    reference, wrapped = tiny_llama(), tiny_llama()
    linears = list(adapter_for(wrapped).quantizable_linears(wrapped))
    quantize_inputs(wrapped, linears, INT8_TOKEN)
    for name in linears:
        module = reference.get_submodule(name)
        module.register_forward_pre_hook(lambda _m, a: (quantize(a[0], INT8_TOKEN).dequantize(),))
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(wrapped(ids).logits, reference(ids).logits)
    assert math.isfinite(wrapped(ids).logits.sum().item())


def test_new_spec_fields_change_the_fingerprint_only_away_from_their_defaults(tmp_path: Path) -> None:
    """Committed baselines are keyed by fingerprint: int / dynamic specs keep theirs (see also
    test_committed_baselines_match_the_default_cells), FP8 and static ones get their own."""
    base = "act: {bits: 8, symmetric: true, granularity: token}\nweight: {bits: 8, symmetric: true}\n"
    int8, _ = cell_from(tmp_path, base)
    payload = settings(int8)
    assert {"format", "dynamic"}.isdisjoint(payload["act"]) and "format" not in payload["weight"]
    fingerprints = {fingerprint(int8, "cpu")}
    assert "act_attention_inputs" not in payload
    for text in ("act: {format: fp8_e4m3}\n", "act: {granularity: tensor, dynamic: false}\n",
                 "weight: {format: fp8_e4m3}\n", "act_attention_inputs: true\n"):
        (tmp_path / "top.yaml").write_text(text)
        (tmp_path / "cell.yaml").write_text(HEADER + base)
        config = resolve_rtn([read_yaml_layer(tmp_path / "cell.yaml"), read_yaml_layer(tmp_path / "top.yaml")])
        fingerprints.add(fingerprint(config, "cpu"))
    assert len(fingerprints) == 5


def rtn_b_cell(*overrides: str) -> Cell:
    """rtn's track-B cell on smollm2-135m as the catalog resolves it (the model is not loaded)."""
    selection = Selection(models=("smollm2-135m",), methods=("rtn",), tracks=("B",),
                          overrides=tuple(parse_override(text) for text in overrides))
    (cell,) = Catalog(BENCH).cells(selection, "cpu")
    return cell


def test_static_activation_cells_read_the_calibration_set_and_say_so() -> None:
    """A static act spec makes any method's cell read the calibration set (its dataset enters the
    id and the fingerprint); a dynamic one does not; the FP baseline never quantizes activations."""
    dynamic = rtn_b_cell()
    static = rtn_b_cell("act.granularity=tensor", "act.dynamic=false", "act_attention_inputs=true")
    assert dynamic.config.calib is None and dynamic.id == "smollm2-135m-rtn-B"
    assert static.config.calib is not None and static.id == "smollm2-135m-rtn-c4-B"
    assert static.config.static_act and static.config.act_attention_inputs
    assert static.baseline_config.act is None and static.baseline_config.calib is None
    assert not rtn_b_cell("act=null", "act_attention_inputs=true").config.act_attention_inputs


def test_static_ranges_come_from_the_calibration_set_through_the_quantized_model() -> None:
    """quantize_activations with a static spec: each input's scale is its absmax over every
    calibration token / 127 (SmoothQuant's per-tensor static scale), observed with the weights
    as quantized and activations in float, here collected by hand; with act_attention_inputs the
    q, k, v outputs get theirs. Without calibration data it refuses."""
    model = tiny_llama()
    adapter = adapter_for(model)
    linears = list(adapter.quantizable_linears(model))
    qkv = adapter.attention_projections(model)
    with torch.no_grad():
        for name in linears:  # the weights as a W8 stage would leave them
            weight = model.get_submodule(name).weight
            weight.copy_(fake_quantize(weight, QuantSpec(8, symmetric=True, granularity="channel")))
    tokens = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(3))
    absmax: dict[tuple[str, str], float] = {}

    def keep(name: str, where: str, x: torch.Tensor) -> None:
        absmax[name, where] = max(absmax.get((name, where), 0.0), x.abs().max().item())

    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, a, n=name: keep(n, "input", a[0])) for name in linears]
    handles += [model.get_submodule(name).register_forward_hook(
        lambda _m, _a, y, n=name: keep(n, "output", y)) for name in qkv]
    with torch.no_grad():
        model(tokens)  # all five sequences at once; the ranges are observed in batches of two
    for handle in handles:
        handle.remove()

    static = ActSpec(8, symmetric=True, granularity="tensor", dynamic=False)
    config = dataclasses.replace(rtn_b_cell().config, act=static, act_attention_inputs=True,
                                 calib=CalibConfig(n_samples=5, seqlen=24, batch_size=2))
    with pytest.raises(ValueError, match="needs the calibration set"):
        quantize_activations(QuantResult(model), adapter, config)
    result = QuantResult(model)
    quantize_activations(result, adapter, config, CalibrationSet(tokens, record={}))
    sites = act_quant_sites(model)
    for (name, where), value in absmax.items():
        assert sites[name][where]["scale"] == pytest.approx(value / 127, rel=1e-6), (name, where)
    assert set(result.act_specs) == set(linears) and set(result.act_output_specs) == set(qkv)
    assert any("static activation ranges" in note for note in result.notes)
