"""Calibration-free weight quantizers (ptq.methods.hqq, ptq.methods.pot): HQQ against min/max
round-to-nearest and an independent transcription of the authors' loop, the POT/APoT level
sets against the paper, codebook outputs on the levels, and the methods' registration and
wiring on a toy model (no real model is loaded)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from ptq.config import CellConfig, parse_override
from ptq.engine import QuantResult
from ptq.errors import ConfigError
from ptq.matrix import Catalog, Selection
from ptq.methods.hqq import HqqParams, hqq_params, hqq_quantize
from ptq.methods.pot import ApotParams, PotParams, apot_levels, pot_levels
from ptq.models.adapters import OPT
from ptq.pipeline import quantize
from ptq.quant import QuantSpec, codebook_fake_quantize, fake_quantize
from ptq.registry import discover
from ptq.transforms import bits_per_weight

DEFAULTS = dataclasses.asdict(HqqParams())
BENCH = Path(__file__).resolve().parents[1] / "bench"
ROWS, COLS, GROUP = 64, 576, 128  # 576 = 4 x 128 + 64: every row ends with a smaller group


def weights(kind: str, seed: int = 0, shape: tuple[int, int] = (ROWS, COLS)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen)
    # Student-t with 3 degrees of freedom: heavy tails, like LLM weight outliers.
    normal = torch.randn(shape, generator=gen)
    chi2 = torch.randn((*shape, 3), generator=gen).pow(2).sum(-1)
    return normal / (chi2 / 3).sqrt()


def groups(x: torch.Tensor, size: int = GROUP) -> list[torch.Tensor]:
    """The groups of every row, as [rows, len] slices (independent of ptq.quant)."""
    return [x[:, start : start + size] for start in range(0, x.shape[-1], size)]


def minmax_rtn(w: torch.Tensor, bits: int, round_zero: bool) -> torch.Tensor:
    """Asymmetric round-to-nearest from each group's min/max, zero not forced into the range."""
    qmax = 2**bits - 1
    out = []
    for g in groups(w):
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo) / qmax
        zero = -lo / scale
        zero = zero.round() if round_zero else zero
        out.append(((g / scale + zero).round().clamp(0, qmax) - zero) * scale)
    return torch.cat(out, dim=-1)


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


def frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm().item()


# ------------------------------------------------------------------------------- HQQ


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("kind", ("gaussian", "student_t"))
def test_hqq_beats_minmax_rtn_it_starts_from(kind: str, bits: int) -> None:
    w = weights(kind)
    spec = QuantSpec(bits=bits, group_size=GROUP)
    hqq, rtn = hqq_quantize(w, spec), minmax_rtn(w, bits, round_zero=HqqParams().rounds_zero(bits))
    assert mean_abs(w, hqq) < mean_abs(w, rtn)
    assert frobenius(w, hqq) < frobenius(w, rtn)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_hqq_beats_integer_zero_rtn_on_gaussian_weights(bits: int) -> None:
    """Against the usual RTN (integer zero point; the shared quantizer's, since every group here
    straddles 0). On heavy tails at 2 bits HQQ's float start loses to it: see the report."""
    w = weights("gaussian", seed=1)
    spec = QuantSpec(bits=bits, group_size=GROUP)
    rtn = minmax_rtn(w, bits, round_zero=True)
    assert torch.equal(rtn, fake_quantize(w, spec))
    assert mean_abs(w, hqq_quantize(w, spec)) < mean_abs(w, rtn)
    assert frobenius(w, hqq_quantize(w, spec)) < frobenius(w, rtn)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_hqq_output_is_on_its_grid(bits: int) -> None:
    w = weights("student_t", seed=2)
    spec = QuantSpec(bits=bits, group_size=GROUP)
    scale, zero = hqq_params(w, spec)
    out = hqq_quantize(w, spec)
    assert scale.shape == zero.shape == (ROWS, 5)
    for i, g in enumerate(groups(out)):
        orig = groups(w)[i]
        assert torch.allclose(scale[:, i], (orig.amax(-1) - orig.amin(-1)) / spec.qmax)
        codes = g / scale[:, i : i + 1] + zero[:, i : i + 1]
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.round().min() >= 0 and codes.round().max() <= spec.qmax
    assert not torch.equal(zero, zero.round())  # zero points stay floats


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("kind", ("gaussian", "student_t"))
def test_hqq_matches_the_authors_library(kind: str, bits: int) -> None:
    """Same dequantized weight as mobiusml/hqq's Quantizer with hqq_base_quant_config's weight
    settings (optimize, round_zero at 4 bits, groups along the input dimension). hqq 0.2.8's
    legacy loop never applies kappa (beta stays fixed); with kappa = 1 the loops are the same."""
    quantize = pytest.importorskip("hqq.core.quantize", reason="the `reference` extra").Quantizer
    w = weights(kind, seed=3, shape=(48, 256))
    codes, meta = quantize.quantize(w, nbits=bits, channel_wise=True, group_size=GROUP, optimize=True,
                                    round_zero=bits == 4, axis=1, bitpack=False, device="cpu")
    expected = quantize.dequantize(codes, meta).float().reshape(w.shape)
    fixed_beta = HqqParams(kappa=1.0)
    assert torch.allclose(hqq_quantize(w, QuantSpec(bits=bits, group_size=GROUP), fixed_beta), expected, atol=1e-5)


def test_hqq_is_deterministic_and_keeps_shape_and_dtype() -> None:
    w = weights("gaussian", seed=4)
    spec = QuantSpec(bits=3, group_size=GROUP)
    assert torch.equal(hqq_quantize(w, spec), hqq_quantize(w, spec))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = hqq_quantize(w.to(dtype), spec)
        assert out.shape == (ROWS, COLS) and out.dtype == dtype
    # coarser granularities are the same optimization over one group per row / per tensor
    per_row = hqq_quantize(w, QuantSpec(bits=3, group_size=COLS))
    assert torch.equal(hqq_quantize(w, QuantSpec(bits=3, granularity="channel")), per_row)
    whole = hqq_quantize(w.reshape(1, -1), QuantSpec(bits=3, granularity="channel")).reshape(w.shape)
    assert torch.equal(hqq_quantize(w, QuantSpec(bits=3, granularity="tensor")), whole)


def test_hqq_handles_constant_groups() -> None:
    w = torch.full((2, 256), 0.25)
    w[1, 128:] = 0.0
    assert torch.equal(hqq_quantize(w, QuantSpec(bits=4, group_size=GROUP)), w)


def test_hqq_rejects_symmetric_specs() -> None:
    with pytest.raises(ValueError, match="zero point"):
        hqq_quantize(weights("gaussian"), QuantSpec(bits=4, symmetric=True))


def test_hqq_defaults_are_the_references() -> None:
    assert DEFAULTS == {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20, "round_zero": None}
    assert [HqqParams().rounds_zero(bits) for bits in (2, 3, 4, 8)] == [False, False, True, False]


# --------------------------------------------------------------------------- POT / APoT

ALL_BITS = range(2, 9)


@pytest.mark.parametrize("levels_of", (pot_levels, apot_levels), ids=("pot", "apot"))
@pytest.mark.parametrize("bits", ALL_BITS)
def test_level_sets_are_symmetric_codebooks(levels_of, bits: int) -> None:
    levels = levels_of(bits)
    assert levels.numel() == 2**bits - 1
    assert torch.all(levels[1:] > levels[:-1])  # sorted, distinct
    assert torch.equal(levels, -levels.flip(0))
    assert levels.max() == 1 and (levels == 0).any()


def test_pot_levels_are_powers_of_two() -> None:
    expected = {0.0} | {s * 2.0**-e for s in (1, -1) for e in range(7)}
    assert set(pot_levels(4).tolist()) == expected
    assert pot_levels(2).tolist() == [-1.0, 0.0, 1.0]


def test_apot_levels_match_the_paper_and_the_authors_code() -> None:
    # 4-bit weights: 3 magnitude bits, the authors' build_power_value(B=3) (terms
    # {0, 2^-1, 2^-2, 2^-4} and {0, 2^-3}, scaled by 1 / 0.625).
    magnitudes = [0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1]
    expected = torch.tensor(sorted({s * m for s in (1, -1) for m in magnitudes}), dtype=torch.float64)
    assert torch.allclose(apot_levels(4, k=2), expected, atol=1e-12)
    # 5-bit weights: the paper's b = 4, k = 2 example, p0 in {0, 1, 2^-2, 2^-4}, p1 in {0, 2^-1, 2^-3, 2^-5}.
    p0, p1 = (0, 1, 2**-2, 2**-4), (0, 2**-1, 2**-3, 2**-5)
    sums = {a + b for a, b in itertools.product(p0, p1)}
    expected = torch.tensor(sorted({s * m / 1.5 for s in (1, -1) for m in sums}), dtype=torch.float64)
    assert torch.allclose(apot_levels(5, k=2), expected, atol=1e-12)
    for value in (1.125 / 1.5, 0.75 / 1.5, (2**-4 + 2**-5) / 1.5, 2**-5 / 1.5):
        assert torch.isclose(apot_levels(5), torch.tensor(value, dtype=torch.float64)).any()
    # 6-bit weights, 5 magnitude bits: build_power_value(B=5), terms {0, 2^-1, 2^-3, 2^-6},
    # {0, 2^-2, 2^-4, 2^-7} and the short {0, 2^-5}
    terms = ((0, 2**-1, 2**-3, 2**-6), (0, 2**-2, 2**-4, 2**-7), (0, 2**-5))
    sums = {sum(choice) for choice in itertools.product(*terms)}
    expected = torch.tensor(sorted({s * m / max(sums) for s in (1, -1) for m in sums}), dtype=torch.float64)
    assert torch.allclose(apot_levels(6, k=2), expected, atol=1e-12)
    # one additive term is plain POT; one magnitude bit is the ternary grid
    assert torch.equal(apot_levels(3), pot_levels(3))
    assert apot_levels(2).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("levels_of", (pot_levels, apot_levels), ids=("pot", "apot"))
@pytest.mark.parametrize("bits", (3, 4, 5))
def test_codebook_outputs_are_levels_times_group_absmax(levels_of, bits: int) -> None:
    w = weights("student_t", seed=5)
    levels = levels_of(bits).float()
    out = codebook_fake_quantize(w, levels, QuantSpec(bits=bits, symmetric=True, group_size=GROUP))
    for g_out, g_in in zip(groups(out), groups(w)):
        normalized = g_out / g_in.abs().amax(-1, keepdim=True)
        nearest = (normalized.unsqueeze(-1) - levels).abs().amin(-1)
        assert nearest.max() < 1e-6


@pytest.mark.parametrize("levels_of", (pot_levels, apot_levels), ids=("pot", "apot"))
def test_error_decreases_with_bits(levels_of) -> None:
    w = weights("gaussian", seed=6)
    errors = [mean_abs(w, codebook_fake_quantize(w, levels_of(b), QuantSpec(bits=b, symmetric=True)))
              for b in (3, 4, 5)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("bits", (4, 5))
def test_apot_beats_pot_on_gaussian_weights(bits: int) -> None:
    """The paper's point: POT levels crowd near zero, APoT's spread out."""
    w = weights("gaussian", seed=7)
    spec = QuantSpec(bits=bits, symmetric=True)
    pot = codebook_fake_quantize(w, pot_levels(bits), spec)
    apot = codebook_fake_quantize(w, apot_levels(bits), spec)
    assert mean_abs(w, apot) < mean_abs(w, pot) and frobenius(w, apot) < frobenius(w, pot)


# ------------------------------------------------------------------- registration, wiring

NEW_METHODS = ("hqq", "pot", "apot")


def test_methods_are_registered_for_track_a() -> None:
    registry = discover()
    for name in NEW_METHODS:
        assert registry[name].tracks == {"A"} and registry[name].reads == {"weight"}
        assert registry[name].role == "quantizer" and not registry[name].calibrated


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(BENCH)  # every registered method has a YAML and vice versa, or this raises


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(COLS, 32)
        self.down = nn.Linear(32, COLS)


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([ToyBlock(), ToyBlock()])


def run(catalog: Catalog, method: str, *overrides: str) -> tuple[ToyModel, QuantResult, CellConfig]:
    """Run `method` with track A's resolved configuration (and `overrides`) on a toy model (two
    blocks of linears)."""
    selection = Selection(models=("smollm2-135m",), methods=(method,), tracks=("A",),
                          overrides=tuple(parse_override(text) for text in overrides))
    (cell,) = catalog.cells(selection, "cpu")
    before = ToyModel()
    adapter = dataclasses.replace(OPT, blocks="layers")  # the methods read only the blocks
    return before, quantize(ToyModel(), adapter, cell.config, cell.pipeline, None, torch.device("cpu")), cell.config


@pytest.mark.parametrize("method", NEW_METHODS)
def test_yaml_params_are_the_defaults_and_every_linear_is_quantized(catalog: Catalog, method: str) -> None:
    before, result, config = run(catalog, method)
    assert config.weight == QuantSpec(bits=4, symmetric=False, group_size=128)
    (stage,) = config.method.stages
    assert stage.params == {"hqq": HqqParams(**DEFAULTS), "pot": PotParams(), "apot": ApotParams(k=2)}[method]
    assert any("does not divide row length 576" in note for note in result.notes)
    for (name, old), new in zip(before.named_modules(), result.model.modules()):
        if isinstance(old, nn.Linear):
            assert not torch.equal(old.weight, new.weight), name
            assert torch.equal(old.bias, new.bias)
    assert set(result.weight_specs) == {f"layers.{i}.{name}" for i in (0, 1) for name in ("up", "down")}


def test_hqq_weights_are_hqq_of_the_float_weights(catalog: Catalog) -> None:
    before, result, config = run(catalog, "hqq")
    assert torch.equal(result.model.layers[1].up.weight, hqq_quantize(before.layers[1].up.weight, config.weight))
    assert set(result.weight_specs.values()) == {config.weight}


@pytest.mark.parametrize("method", ("pot", "apot"))
def test_codebook_methods_run_symmetric_and_say_so(catalog: Catalog, method: str) -> None:
    before, result, config = run(catalog, method)
    assert not config.weight.symmetric
    assert any("run as symmetric" in note for note in result.notes)
    levels = {"pot": pot_levels, "apot": apot_levels}[method](4)
    spec = dataclasses.replace(config.weight, symmetric=True)
    assert torch.equal(result.model.layers[0].down.weight,
                       codebook_fake_quantize(before.layers[0].down.weight, levels, spec))
    # the result states the grid that ran: a scale per group and no zero point (4 + 16/128 bits
    # per weight where a group is whole), not the configured asymmetric spec
    assert set(result.weight_specs.values()) == {spec}
    linears = {f"layers.{i}.{n}": getattr(result.model.layers[i], n) for i in (0, 1) for n in ("up", "down")}
    configured = dict.fromkeys(linears, config.weight)
    assert bits_per_weight(linears, result.weight_specs) < bits_per_weight(linears, configured)


def test_apot_k_param_is_used(catalog: Catalog) -> None:
    before, result, config = run(catalog, "apot", "method.params.k=3")  # 3 magnitude bits in one term: POT
    expected = codebook_fake_quantize(before.layers[0].up.weight, pot_levels(4),
                                      dataclasses.replace(config.weight, symmetric=True))
    assert torch.equal(result.model.layers[0].up.weight, expected)


@pytest.mark.parametrize(("method", "override", "message"), [
    ("hqq", "method.params.lpnorm=0.5",
     r"method.params \['lpnorm'\]: no selected method has such a parameter \(hqq: lp_norm, beta, kappa, iters, "
     r"round_zero\)"),
    ("hqq", "method.params.iters=2.5", r"--override method.params.iters=2.5: stages.hqq.params.iters must be int"),
    ("hqq", "method.params.lp_norm=1.5", r"lp_norm must be in \(0, 1\]"),
    ("pot", "method.params.k=2", r"no selected method has such a parameter \(pot: none\)"),
    ("apot", "stages.apot.params.n=1", r"unknown key 'stages.apot.params.n' \(known keys here: k\)"),
    ("hqq", "weight.symmetric=true", "HQQ optimizes a zero point, so it needs an asymmetric weight spec"),
])
def test_unknown_mistyped_or_out_of_range_params_are_rejected_at_collection(catalog: Catalog, method: str,
                                                                            override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run(catalog, method, override)
