"""Calibrated weight quantizers (ptq.methods.gptq, ptq.methods.awq) and the calibration engine
(ptq.calib): GPTQ's solve against round-to-nearest on single layers (identity Hessian, layer
output error, grid, determinism, dampening), AWQ's scale and clipping searches, the engine's
block walk on a tiny random Llama, and both registered methods end to end on that model.
No real model is loaded; everything is seeded and runs in a few seconds on one thread."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ptq.calib import CalibrationSet
from ptq.config import CalibConfig, StageConfig
from ptq.engine import BlockRunner, BlockStep, ModelStep, QuantResult, Specs, Stage, capture_block_inputs, run_stages
from ptq.errors import ConfigError
from ptq.matrix import Catalog, Cell, Selection
from ptq.methods import awq
from ptq.methods.awq import activation_scales, search_clip, search_scales
from ptq.methods.gptq import GPTQ, GptqParams, GptqResult
from ptq.models.adapters import adapter_for
from ptq.pipeline import quantize
from ptq.quant import QuantSpec, fake_quantize
from ptq.transforms import fold_scales, scales_fold

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROWS, COLS, GROUP = 64, 576, 128  # 576 = 4 x 128 + 64: every row ends with a smaller group
TOKENS = 1024  # calibration inputs per layer: more than COLS, so X has full column rank
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_weight(seed: int = 0, shape: tuple[int, int] = (ROWS, COLS)) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed))


def rotation(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def inputs(kind: str, seed: int = 1, tokens: int = TOKENS, columns: int = COLS) -> torch.Tensor:
    """Calibration inputs [tokens, columns]: i.i.d. Gaussian, or ill-conditioned (singular values
    over four decades, in a random basis, plus a large common offset, so X Xᵀ is far from diagonal)."""
    z = torch.randn(tokens, columns, generator=gen(seed))
    if kind == "gaussian":
        return z
    spread = torch.logspace(-3, 1, columns)
    mean = 5 * torch.randn(columns, generator=gen(seed + 1))
    return z * spread @ rotation(columns, seed + 2) + mean


def gptq_solve(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, **params: object) -> GptqResult:
    stats = GPTQ(weight.shape[1])
    stats.add_batch(x.unsqueeze(0))  # one sequence of `tokens` inputs
    return stats.quantize(weight, spec, GptqParams(**params))


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """‖X W_qᵀ − X Wᵀ‖², in float64."""
    x, weight, quantized = x.double(), weight.double(), quantized.double()
    return float((x @ quantized.t() - x @ weight.t()).pow(2).sum())


SPECS = [
    pytest.param(QuantSpec(bits, symmetric, granularity, GROUP),
                 id=f"{granularity}-{'sym' if symmetric else 'asym'}-{bits}b")
    for granularity in ("group", "channel") for symmetric in (False, True) for bits in (3, 4)
]


# ------------------------------------------------------------------ GPTQ on one layer


@pytest.mark.parametrize("columns", (64, 192, 576, 1000), ids=lambda c: f"{c}cols")
def test_gptq_hessian_is_the_mean_of_2_x_xT_over_sequences(columns: int) -> None:
    """H = 2/n Σ x xᵀ over the n sequences seen, in float64 from its definition: the block-wise
    product (`add_gram_`, 192 rows at a time: one block, several, a short last one) and the
    running rescaling agree with it to float32 rounding."""
    batches = [inputs("ill", seed, tokens=3 * 100, columns=columns).reshape(3, 100, columns)
               for seed in (3, 5)]
    stats = GPTQ(columns)
    for batch in batches:
        stats.add_batch(batch)
    x = torch.cat([batch.reshape(-1, columns) for batch in batches]).double()
    expected = 2 / 6 * x.t() @ x
    assert stats.nsamples == 6 and stats.tokens == 600
    assert torch.allclose(stats.H.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("static", (False, True), ids=("plain", "act_order+static_groups"))
@pytest.mark.parametrize("spec", SPECS)
def test_gptq_with_identity_hessian_is_round_to_nearest(spec: QuantSpec, static: bool) -> None:
    # H = I: no column says anything about another, Hinv is diagonal, no error is propagated,
    # and every column is rounded with the parameters of its (unchanged) group: plain RTN.
    # With act_order and static groups the groups are still those of the original column order.
    weight = gaussian_weight()
    stats = GPTQ(COLS)
    stats.H = torch.eye(COLS)
    stats.nsamples = 1
    solved = stats.quantize(weight, spec, GptqParams(act_order=static, static_groups=static))
    assert torch.equal(solved.weight, fake_quantize(weight, spec))
    assert solved.damp_used == 0.01


GPTQ_VARIANTS = [
    pytest.param({}, id="in-order"),
    pytest.param({"act_order": True}, id="act_order"),
    pytest.param({"act_order": True, "static_groups": True}, id="act_order+static_groups"),
    pytest.param({"static_groups": True}, id="static_groups"),
]


@pytest.mark.parametrize("params", GPTQ_VARIANTS)
@pytest.mark.parametrize("kind", ("gaussian", "ill_conditioned"))
def test_gptq_layer_output_error_is_below_rtn(kind: str, params: dict) -> None:
    weight, x = gaussian_weight(), inputs(kind)
    spec = QuantSpec(3, False, "group", GROUP)
    solved = gptq_solve(weight, x, spec, **params)
    gptq_error = output_error(x, weight, solved.weight)
    rtn_error = output_error(x, weight, fake_quantize(weight, spec))
    assert solved.damp_used == 0.01
    # measured: ~0.72x RTN on Gaussian inputs, ~0.025x on ill-conditioned ones
    assert gptq_error < (0.9 if kind == "gaussian" else 0.1) * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("params", [p for p in GPTQ_VARIANTS if p.id != "act_order"])
@pytest.mark.parametrize("spec", [p for p in SPECS if p.values[0].granularity == "group"])
def test_gptq_values_lie_on_one_grid_per_group(spec: QuantSpec, params: dict) -> None:
    # GPTQ's scales come from the weights as updated so far, so they cannot be checked against
    # find_params(W); but each group of each row has one (scale, zero): at most 2^bits values,
    # all integer multiples of one step apart, spanning at most qmax - qmin steps.
    # (act_order without static groups is left out: its groups follow the permuted order.)
    weight, x = gaussian_weight(), inputs("ill_conditioned")
    q = gptq_solve(weight, x, spec, **params).weight
    start = 0
    for size in spec.group_sizes(COLS):
        for row in q[:, start:start + size]:
            values = torch.unique(row).double()
            assert len(values) <= 2**spec.bits
            if len(values) == 1:
                continue
            steps = (values - values[0]) / torch.diff(values).min()
            assert torch.allclose(steps, steps.round(), rtol=1e-3, atol=1e-3), steps
            assert steps[-1].round() <= spec.qmax - spec.qmin
        start += size


@pytest.mark.parametrize("params", GPTQ_VARIANTS[:2])
def test_gptq_is_deterministic(params: dict) -> None:
    spec = QuantSpec(4, False, "group", GROUP)
    first = gptq_solve(gaussian_weight(3), inputs("ill_conditioned", seed=4), spec, **params)
    second = gptq_solve(gaussian_weight(3), inputs("ill_conditioned", seed=4), spec, **params)
    assert torch.equal(first.weight, second.weight)
    assert first.loss == second.loss and first.damp_used == second.damp_used


def hessian_with_spectrum(eigenvalues: list[float], seed: int = 5) -> torch.Tensor:
    rot = rotation(len(eigenvalues), seed).double()
    h = rot @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ rot.t()
    return ((h + h.t()) / 2).float()


def solve_with_hessian(h: torch.Tensor, percdamp: float = 0.01) -> GptqResult:
    stats = GPTQ(h.shape[0])
    stats.H = h
    stats.nsamples = 1
    return stats.quantize(gaussian_weight(6, (8, h.shape[0])), QuantSpec(4, granularity="channel"),
                          GptqParams(percdamp=percdamp))


def test_gptq_dampening_falls_back_tenfold_until_positive_definite() -> None:
    # mean diagonal = mean eigenvalue = (15 - 0.05) / 16 ≈ 0.93: 0.01 x 0.93 does not lift the
    # eigenvalue -0.05 above zero, 0.1 x 0.93 does.
    h = hessian_with_spectrum([1.0] * 15 + [-0.05])
    solved = solve_with_hessian(h)
    assert solved.damp_used == pytest.approx(0.1)
    assert torch.isfinite(solved.weight).all()
    assert solve_with_hessian(h, percdamp=0.1).damp_used == pytest.approx(0.1)  # no fallback needed


@pytest.mark.parametrize("eigenvalues", [
    [1e6, 1e6, 1e6, -2.9e6],  # mean diagonal 2.5e4: even 0.01 x 10^4 x 2.5e4 = 2.5e6 < 2.9e6
    [-1.0] * 4,  # negative mean diagonal: dampening only makes it worse
], ids=("too_negative", "negative_definite"))
def test_gptq_hessian_no_dampening_fixes_raises(eigenvalues: list[float]) -> None:
    with pytest.raises(torch.linalg.LinAlgError):
        solve_with_hessian(hessian_with_spectrum(eigenvalues))


@pytest.mark.parametrize("params", ({}, {"act_order": True}, {"act_order": True, "static_groups": True}))
def test_stacked_rows_sharing_a_hessian_solve_as_each_layer_alone(params: dict) -> None:
    """GPTQ's rows are independent given H: q, k and v (one input) solve in one stacked call."""
    x = inputs("ill-conditioned")
    stats = GPTQ(COLS)
    stats.add_batch(x.unsqueeze(0))
    layers = [gaussian_weight(seed, (rows, COLS)) for seed, rows in ((10, 64), (11, 16), (12, 16))]
    spec = QuantSpec(4, False, "group", GROUP)
    stacked = stats.quantize(torch.cat(layers), spec, GptqParams(**params))
    start = 0
    for weight in layers:
        alone = stats.quantize(weight, spec, GptqParams(**params))
        torch.testing.assert_close(stacked.weight[start:start + len(weight)], alone.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(stacked.row_losses[start:start + len(weight)], alone.row_losses)
        start += len(weight)


@pytest.mark.parametrize(("bad", "message"), (({"percdamp": 0}, "percdamp must be > 0"),
                                              ({"percdamp": -0.01}, "percdamp must be > 0"),
                                              ({"blocksize": 0}, "blocksize must be > 0")))
def test_gptq_params_reject_non_positive_values(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GptqParams(**bad)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(BENCH)


def track_a_cell(catalog: Catalog, method: str, *overrides: str) -> Cell:
    """Track A's cell of `method` (a pipeline) on smollm2-135m (the model is not loaded)."""
    from ptq.config import parse_override

    selection = Selection(models=("smollm2-135m",), methods=(method,), tracks=("A",),
                          overrides=tuple(parse_override(text) for text in overrides))
    cells = catalog.cells(selection, "cpu")
    assert len(cells) == 1
    return cells[0]


def test_gptq_params_parse_from_yaml_and_reject_unknown_or_mistyped(catalog: Catalog) -> None:
    cell = track_a_cell(catalog, "gptq")
    assert cell.config.method.stages == (StageConfig("gptq", GptqParams()),)  # the YAML spells out the defaults
    with pytest.raises(ConfigError, match=r"method.params \['perc_damp'\]: no selected method has such a parameter"):
        track_a_cell(catalog, "gptq", "method.params.perc_damp=0.1")
    with pytest.raises(ConfigError, match="stages.gptq.params.act_order must be bool, got 'sometimes'"):
        track_a_cell(catalog, "gptq", "method.params.act_order=sometimes")


# ------------------------------------------------------------------------- AWQ pieces


def test_awq_alpha_zero_is_round_to_nearest() -> None:
    x_mean = torch.rand(COLS, generator=gen(7)) * 3
    x_mean[0] = 0  # 0^0 = 1 too
    assert torch.equal(activation_scales(x_mean, 0.0), torch.ones(COLS))
    weight = gaussian_weight(8)
    spec = QuantSpec(4, False, "group", GROUP)
    seen: list[list[torch.Tensor]] = []
    scales, alpha, loss = search_scales([weight], x_mean, spec, 1, lambda q: seen.append(q) or 1.5)
    assert alpha == 0.0 and loss == 1.5 and len(seen) == 1
    assert torch.equal(scales, torch.ones(COLS))
    assert torch.equal(seen[0][0], fake_quantize(weight, spec))


def test_awq_scales_are_normalized() -> None:
    x_mean = torch.rand(COLS, generator=gen(9)) + 0.01
    for alpha in (0.25, 0.5, 0.95):
        scales = activation_scales(x_mean, alpha)
        assert (scales.max() * scales.min()).item() == pytest.approx(1.0, rel=1e-5)
        assert torch.allclose(scales / scales[0], (x_mean / x_mean[0]).pow(alpha), rtol=1e-4)


def test_awq_scale_search_protects_outlier_channels() -> None:
    weight = gaussian_weight(10, (ROWS, 256))
    x = torch.randn(512, 256, generator=gen(11))
    x[:, [3, 50, 100, 200]] *= 50  # a few large-magnitude input channels, as in LLM activations
    spec = QuantSpec(3, False, "group", 32)
    reference = x @ weight.t()

    def error(quantized: list[torch.Tensor]) -> float:
        return float((x @ quantized[0].t() - reference).pow(2).mean())

    scales, alpha, loss = search_scales([weight], x.abs().mean(0), spec, 20, error)
    rtn_loss = error([fake_quantize(weight, spec)])
    assert loss <= rtn_loss
    assert alpha > 0
    assert loss < 0.5 * rtn_loss  # measured: ~0.13x
    assert loss == error([fake_quantize(weight * scales, spec) / scales])  # the returned scales give the loss


@pytest.mark.parametrize("spec", [QuantSpec(4, False, "group", GROUP), QuantSpec(3, True, "group", GROUP),
                                  QuantSpec(3, False, "channel")], ids=("group-asym-4b", "group-sym-3b", "channel"))
def test_awq_clip_search_bounds_and_error(spec: QuantSpec) -> None:
    weight = gaussian_weight(12)
    x = inputs("gaussian", seed=13, tokens=256)
    n_grid, max_shrink = 20, 0.5
    best_max = search_clip(weight, x, spec, n_grid, max_shrink)
    sizes = spec.group_sizes(COLS)
    assert best_max.shape == (ROWS, len(sizes))
    start = 0
    for index, size in enumerate(sizes):
        w, xg = weight[:, start:start + size], x[:, start:start + size]
        absmax = w.abs().amax(dim=1)
        assert (best_max[:, index] <= absmax).all()
        assert (best_max[:, index] >= (1 - max_shrink) * absmax * (1 - 1e-6)).all()
        # each group's contribution to the output, per row: the search picks the clip that
        # minimizes it, and no clip (shrink 0) is a candidate, so clipping never makes it worse.
        bound = best_max[:, index:index + 1]
        group_spec = dataclasses.replace(spec, granularity="channel")
        clipped = fake_quantize(torch.clamp(w, -bound, bound), group_spec)
        plain = fake_quantize(w, group_spec)
        err_clipped = (xg @ clipped.t() - xg @ w.t()).pow(2).sum(0)
        err_plain = (xg @ plain.t() - xg @ w.t()).pow(2).sum(0)
        assert (err_clipped <= err_plain * (1 + 1e-5)).all()
        # and no other candidate, max|w| * (1 - i/n_grid), does better (errors in float64)
        def error64(quantized: torch.Tensor) -> torch.Tensor:
            return (xg.double() @ (quantized - w).double().t()).pow(2).sum(0)

        bounds = [absmax[:, None] * (1 - step / n_grid) for step in range(int(max_shrink * n_grid))]
        candidates = [fake_quantize(torch.clamp(w, -b, b), group_spec) for b in bounds]
        least = torch.stack([error64(candidate) for candidate in candidates]).amin(0)
        assert (error64(clipped) <= least * (1 + 1e-5)).all()
        start += size
    assert (best_max < weight.abs().reshape(ROWS, -1).amax(1, keepdim=True)).any()  # some clipping happened
    if spec.granularity == "channel":  # one group per row: the whole layer's error, row by row
        bound = best_max
        clipped = fake_quantize(torch.clamp(weight, -bound, bound), spec)
        err = (x @ clipped.t() - x @ weight.t()).pow(2).sum(0)
        assert (err <= (x @ fake_quantize(weight, spec).t() - x @ weight.t()).pow(2).sum(0) * (1 + 1e-5)).all()


@pytest.mark.parametrize("bias", (False, True))
def test_awq_linear_error_from_the_gram_matrix_is_the_output_error(bias: bool) -> None:
    # The error a group inspecting its own linear (down_proj) is scored by: from its inputs' Gram
    # matrix, against running the linear on every input in float64 (two batches, the bias cancels).
    weight = gaussian_weight(14)
    linear = nn.Linear(COLS, ROWS, bias=bias).requires_grad_(False)
    linear.weight.copy_(weight)
    xs = [inputs("ill_conditioned", seed=15 + i, tokens=256).reshape(2, 128, COLS) for i in range(2)]
    quantized = fake_quantize(weight, QuantSpec(3, False, "group", GROUP))
    delta = (quantized - weight).double()
    expected = sum(float((x.double() @ delta.t()).pow(2).sum()) for x in xs) / (2 * 256 * ROWS)
    from_gram = awq._linear_output_error(weight, xs)([quantized])
    by_forward = awq._module_output_error(linear, [linear], [weight.clone()], xs, [{}, {}])
    assert from_gram == pytest.approx(expected, rel=1e-5)
    assert by_forward([quantized]) == pytest.approx(expected, rel=1e-3)  # a difference of float32 outputs


def test_awq_searches_the_same_with_or_without_the_gram_shortcut(
        catalog: Catalog, model: LlamaForCausalLM, calibration: CalibrationSet,
        monkeypatch: pytest.MonkeyPatch) -> None:
    shortcut = run_pipeline(catalog, model, calibration, "awq")
    monkeypatch.setattr(awq, "_plain_linear", lambda module: False)  # down_proj's group runs it instead
    forward = run_pipeline(catalog, model, calibration, "awq")
    for name, linear in LLAMA.quantizable_linears(forward.model).items():
        assert torch.equal(shortcut.model.get_submodule(name).weight, linear.weight), name
    assert shortcut.notes == forward.notes  # the alphas chosen


def test_awq_reads_the_engine_float_pass_with_the_same_result(
        catalog: Catalog, model: LlamaForCausalLM, calibration: CalibrationSet,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As the first stage of a float-propagating pipeline, AWQ takes its inputs and its inspected
    # modules' outputs from the engine's float pass: the same weights as with passes of its own,
    # and no pass of its own.
    passes = []
    inputs_of = BlockRunner.inputs_of
    monkeypatch.setattr(BlockRunner, "inputs_of",
                        lambda self, modules: passes.append(1) or inputs_of(self, modules))
    observed = run_pipeline(catalog, model, calibration, "awq")
    assert passes == []
    monkeypatch.setattr(awq.Awq, "float_observers", lambda self, step: {})
    monkeypatch.setattr(awq.Awq, "float_output_observers", lambda self, step: {})
    own = run_pipeline(catalog, model, calibration, "awq")
    assert len(passes) == 2  # one per block
    for name, linear in LLAMA.quantizable_linears(own.model).items():
        assert torch.equal(observed.model.get_submodule(name).weight, linear.weight), name
    assert observed.notes == own.notes


# ------------------------------------------------------------- engine on a tiny Llama


def tiny_llama(kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=kv_heads, max_position_embeddings=256))
    return model.eval()


def random_tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, 400, shape, generator=gen(seed))


LLAMA = adapter_for(tiny_llama())  # derived from the module tree; the same for every Llama


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def test_capture_block_inputs_are_the_embeddings(model: LlamaForCausalLM) -> None:
    tokens = random_tokens((8, 32), 20)
    batches = capture_block_inputs(model, LLAMA, tokens, 3, CPU)
    assert [b.hidden.shape for b in batches] == [(3, 32, 64), (3, 32, 64), (2, 32, 64)]
    with torch.no_grad():
        for batch, ids in zip(batches, tokens.split(3)):
            assert torch.equal(batch.hidden, model.model.embed_tokens(ids))
            cos, sin = batch.kwargs["position_embeddings"]  # what the blocks need besides the hidden states
            assert cos.shape[-2] == 32 and sin.shape[-2] == 32
    assert not model.model.layers[0]._forward_pre_hooks  # the capture hook is removed


class Probe(Stage):
    """A stage that hands each block step to a test function."""

    name = "probe"

    def __init__(self, on_block) -> None:
        super().__init__(None, Specs(), final=True)
        self.fn = on_block

    def on_block(self, step: BlockStep) -> None:
        self.fn(step)


def walk(model: LlamaForCausalLM, tokens: torch.Tensor, batch_size: int, propagate: str, on_block) -> QuantResult:
    result = QuantResult(model)
    run_stages([Probe(on_block)], ModelStep(model, LLAMA, result), CalibrationSet(tokens, {}),
               CalibConfig(batch_size=batch_size, propagate=propagate), CPU)
    return result


@pytest.mark.parametrize("propagate", ("quantized", "float"))
def test_walk_blocks_without_quantization_reproduces_the_model(model: LlamaForCausalLM, propagate: str) -> None:
    tokens = random_tokens((8, 32), 21)
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states
    # transformers 5.x: hidden_states has num_layers + 1 entries; entry i < num_layers is the input of
    # block i (the embeddings, then each block's output), but the last entry is overwritten with
    # last_hidden_state, i.e. final_norm(output of the last block). So block i's input is compared
    # with states[i], and the last block's output with states[-1] after applying the final norm.
    layers = len(model.model.layers)
    assert len(states) == layers + 1
    seen: dict[int, torch.Tensor] = {}
    last: list[torch.Tensor] = []

    def noop(step: BlockStep) -> None:
        assert step.block is model.model.layers[step.index] and step.name == f"model.layers.{step.index}"
        seen[step.index] = torch.cat([b.hidden for b in step.runner.batches])
        if step.index == layers - 1:
            last.append(torch.cat(step.runner.outputs()))

    result = walk(model, tokens, 3, propagate, noop)
    assert sorted(seen) == list(range(layers))
    for index in range(layers):
        assert torch.allclose(seen[index], states[index], rtol=1e-5, atol=1e-7), index
    with torch.no_grad():
        assert torch.allclose(model.get_submodule(LLAMA.final_norm)(last[0]), states[-1], rtol=1e-4, atol=1e-6)
    assert set(result.stage_seconds) == {"probe", "engine"}


@pytest.mark.parametrize("propagate", ("quantized", "float"))
def test_walk_blocks_propagates_quantized_or_float_outputs(propagate: str) -> None:
    model = tiny_llama()
    tokens = random_tokens((4, 16), 22)
    with torch.no_grad():
        float_states = model(tokens, output_hidden_states=True).hidden_states
    block1_inputs: list[torch.Tensor] = []

    def damage_first_block(step: BlockStep) -> None:
        if step.index == 0:
            with torch.no_grad():
                step.block.mlp.down_proj.weight.mul_(10)
        else:
            block1_inputs.append(torch.cat([b.hidden for b in step.runner.batches]))

    walk(model, tokens, 2, propagate, damage_first_block)
    with torch.no_grad():
        changed_states = model(tokens, output_hidden_states=True).hidden_states
    expected = float_states[1] if propagate == "float" else changed_states[1]
    assert not torch.allclose(float_states[1], changed_states[1])
    assert torch.allclose(block1_inputs[0], expected, rtol=1e-5, atol=1e-7)


def test_a_data_free_walk_visits_every_block_without_data(model: LlamaForCausalLM) -> None:
    seen = []
    result = QuantResult(model)
    run_stages([Probe(lambda step: seen.append((step.index, step.runner)))], ModelStep(model, LLAMA, result),
               None, CalibConfig(), CPU)
    assert seen == [(0, None), (1, None)] and "engine" not in result.stage_seconds


@pytest.mark.parametrize("kv_heads", (2, 4), ids=("gqa", "mha"))
def test_fold_scales_preserves_the_block_function(kv_heads: int) -> None:
    model = tiny_llama(kv_heads)
    batches = capture_block_inputs(model, LLAMA, random_tokens((4, 16), 23), 4, CPU)
    block = model.model.layers[0]
    with torch.no_grad():
        before = BlockRunner(block, batches).outputs()[0]
    applied = []
    for number, group in enumerate(LLAMA.scaling_groups):
        if not scales_fold(block, group):
            # v_proj's 32 outputs (2 KV heads) are not o_proj's 64 inputs under grouped-query attention
            assert kv_heads == 2 and group.prev == "self_attn.v_proj"
            continue
        applied.append(group.prev)
        folded = copy.deepcopy(block)
        channels = folded.get_submodule(group.linears[0]).in_features
        scales = 0.5 + 1.5 * torch.rand(channels, generator=gen(30 + number))
        prev_weight = folded.get_submodule(group.prev).weight.clone()
        fold_scales(folded, group, scales)
        assert not torch.allclose(folded.get_submodule(group.prev).weight, prev_weight)
        with torch.no_grad():
            after = BlockRunner(folded, batches).outputs()[0]
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-6), group.prev
    assert len(applied) == (4 if kv_heads == 4 else 3)


def block_outputs(model: LlamaForCausalLM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder block's output (the last one before the final norm), via forward hooks."""
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: tuple, out: object) -> None:
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handles = [block.register_forward_hook(keep) for block in LLAMA.decoder_blocks(model)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def run_pipeline(catalog: Catalog, model: LlamaForCausalLM, calibration: CalibrationSet, method: str,
                 *overrides: str) -> QuantResult:
    """The tiny model quantized by a pipeline with track A's resolved configuration, at W3 asym group 32."""
    cell = track_a_cell(catalog, method, "weight.bits=3", "weight.group_size=32", "calib.batch_size=4", *overrides)
    return quantize(copy.deepcopy(model), LLAMA, cell.config, cell.pipeline,
                    calibration if cell.pipeline.calibrated else None, CPU)


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    return CalibrationSet(tokens=random_tokens((8, 32), 40), record={})


@pytest.fixture(scope="module")
def quantized_models(catalog: Catalog, model: LlamaForCausalLM, calibration: CalibrationSet) -> dict[str, tuple]:
    """The tiny model quantized by rtn, gptq and awq (W3 asym, group 32); "calibration" holds the
    calibration tokens."""
    out = {}
    for method in ("rtn", "gptq", "awq", "awq+gptq"):
        # the CPU profile searches AWQ's scales on 8 samples; here: all of them
        extra = ("method.params.search_samples=null",) if "awq" in method else ()
        result = run_pipeline(catalog, model, calibration, method, *extra)
        out[method] = (result.model, result)
    out["calibration"] = (calibration.tokens, None)
    return out


def test_awq_that_changes_nothing_then_gptq_is_gptq_exactly(catalog: Catalog, model: LlamaForCausalLM,
                                                           calibration: CalibrationSet) -> None:
    """AWQ with alpha 0 only (scales of 1) and no clipping leaves every weight as it was: the
    pipeline must then give GPTQ's result bit for bit (same Hessians, same propagation)."""
    alone = run_pipeline(catalog, model, calibration, "gptq")
    chained = run_pipeline(catalog, model, calibration, "awq+gptq", "method.params.n_grid=1",
                           "method.params.clip=false")
    for name, linear in LLAMA.quantizable_linears(alone.model).items():
        assert torch.equal(chained.model.get_submodule(name).weight, linear.weight), name
    assert chained.weight_specs == alone.weight_specs
    assert set(chained.stage_seconds) == {"awq", "gptq", "engine"}
    assert any("scales and clipping only" in note for note in chained.notes)


@pytest.mark.parametrize("hooked", (False, True), ids=("plain", "hook-after-last-linear"))
def test_replaying_final_children_changes_nothing_and_saves_block_passes(
        catalog: Catalog, model: LlamaForCausalLM, calibration: CalibrationSet,
        monkeypatch: pytest.MonkeyPatch, hooked: bool) -> None:
    """GPTQ freezes self_attn once o_proj is quantized and the MLP once down_proj is: later passes
    replay their recorded outputs, and the recording pass computes o_proj / down_proj on their kept
    inputs instead of re-running the child. Same weights and the same propagated activations, bit
    for bit, also where only some batches' inputs were kept (the memory of the block's inputs holds
    half of down_proj's). With a hook changing the last linear's output the child's output is not
    that linear's: the first batch's check sees it and the child runs on every batch."""

    held_after_last_pass = []  # what a runner still holds after the block's last pass
    outputs = BlockRunner.outputs

    def outputs_then_holdings(self: BlockRunner, *args, last: bool = False, **kwargs) -> list[torch.Tensor]:
        result = outputs(self, *args, last=last, **kwargs)
        if last:
            held_after_last_pass.append({**self._replays, **self._kept})
        return result

    def run(freeze: bool) -> tuple[QuantResult, dict[str, int], list[torch.Tensor]]:
        calls, seen = {"attention": 0, "mlp": 0}, []
        monkeypatch.setattr(BlockRunner, "outputs", outputs_then_holdings)

        def count(kind: str) -> Callable:
            return lambda *_: calls.__setitem__(kind, calls[kind] + 1)

        if not freeze:
            monkeypatch.setattr(BlockRunner, "freeze", lambda self, children: None)
        handles = []
        for layer in model.model.layers:
            handles.append(layer.self_attn.q_proj.register_forward_hook(count("attention")))
            handles.append(layer.mlp.gate_proj.register_forward_hook(count("mlp")))
            if hooked:
                handles += [linear.register_forward_hook(lambda _m, _a, out: out * 0.5)
                            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        handles.append(model.model.layers[1].register_forward_pre_hook(  # block 1's inputs: block 0's outputs
            lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        try:
            result = run_pipeline(catalog, model, calibration, "gptq")
        finally:
            for handle in handles:
                handle.remove()
            monkeypatch.undo()
        return result, calls, seen

    replayed, replayed_calls, replayed_inputs = run(freeze=True)
    plain, plain_calls, plain_inputs = run(freeze=False)
    for name, linear in LLAMA.quantizable_linears(plain.model).items():
        assert torch.equal(replayed.model.get_submodule(name).weight, linear.weight), name
    assert len(replayed_inputs) == len(plain_inputs) and all(
        torch.equal(a, b) for a, b in zip(replayed_inputs, plain_inputs))
    blocks, batches = 2, 2
    # Without replay, attention runs in o_proj's, gate/up's, down's and the output pass, the MLP in
    # down's and the output pass. With it, each child runs until its last linear is quantized, then
    # in its recording pass (the next) on the first batch, where it is checked, and on each batch
    # whose kept input did not fit in the block's input activations; on all if the check failed.
    # o_proj's inputs are as large as the block's (hidden size 64): every batch's fits. down_proj's
    # are twice as large (intermediate size 128): the first batch's alone.
    kept = {"attention": batches, "mlp": batches * 64 // 128}
    recording = {child: batches if hooked else 1 + batches - kept[child] for child in kept}
    assert plain_calls == {"attention": blocks * batches * 4, "mlp": blocks * batches * 2}
    assert replayed_calls == {child: blocks * (batches + recording[child]) for child in kept}
    # The last pass over a block dropped the recorded outputs and kept inputs (as it used them).
    assert held_after_last_pass == [{}] * (2 * blocks)


@pytest.mark.parametrize("method", ("gptq", "awq", "awq+gptq"))
def test_calibrated_methods_beat_rtn_on_a_tiny_llama(model: LlamaForCausalLM, quantized_models: dict,
                                                     method: str) -> None:
    def errors(tokens: torch.Tensor) -> dict[str, list[float]]:
        reference = block_outputs(model, tokens)
        return {name: [mse(out, ref) for out, ref in zip(block_outputs(quantized_models[name][0], tokens), reference)]
                for name in ("rtn", method)}

    # On the calibration tokens themselves (what both methods minimize): every block's output is
    # closer to the float model than RTN's (measured: GPTQ ~0.5x, AWQ ~0.6-0.8x RTN's MSE).
    calib = errors(quantized_models["calibration"][0])
    assert all(ours < rtn for ours, rtn in zip(calib[method], calib["rtn"])), calib
    # On held-out random tokens: the last block's output (before the final norm) and the sum over
    # blocks. Measured over 6 model/data seeds of this GQA model: 0.68-0.86x RTN's MSE, both methods.
    # With only 256 calibration tokens GPTQ does overfit somewhat (on an MHA variant one seed in
    # three was not better held-out; with 2048 calibration tokens all were), hence the check above.
    held = errors(random_tokens((16, 32), 41))
    assert held[method][-1] < held["rtn"][-1], held
    assert sum(held[method]) < sum(held["rtn"]), held
    result = quantized_models[method][1]
    assert result.fallbacks == []
    if "awq" in method:
        assert any("grouped-query attention" in note and "self_attn.v_proj -> self_attn.o_proj" in note
                   for note in result.notes)


@pytest.mark.parametrize("method", ("gptq", "awq", "awq+gptq"))
def test_calibrated_methods_leave_weights_on_the_3_bit_grid(model: LlamaForCausalLM, quantized_models: dict,
                                                            method: str) -> None:
    quantized = quantized_models[method][0]
    spec = QuantSpec(3, False, "group", 32)
    for name, linear in LLAMA.quantizable_linears(quantized).items():
        before = model.get_submodule(name).weight
        assert not torch.equal(linear.weight, before), name
        groups = linear.weight.reshape(linear.out_features, -1, 32)
        distinct = max(len(torch.unique(g)) for row in groups for g in row)
        assert distinct <= 2**spec.bits, name
    assert torch.equal(quantized.lm_head.weight, model.lm_head.weight)
    assert torch.equal(quantized.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_awq_on_a_subset_runs_the_blocks_on_that_subset_alone_with_the_same_result(
        catalog: Catalog, model: LlamaForCausalLM, calibration: CalibrationSet) -> None:
    """search_samples 3 at batch size 4: AWQ reads the first batch only, so the engine runs the
    blocks on its 4 sequences and not the 8; the weights are those of a calibration set that
    holds just those 4 (nothing else was ever read)."""
    subset = run_pipeline(catalog, model, calibration, "awq", "method.params.search_samples=3")
    alone = run_pipeline(catalog, model, CalibrationSet(calibration.tokens[:4], {}), "awq")
    assert any("the first 4 of the 8 sequences" in note for note in subset.notes)
    for (name, ours), theirs in zip(subset.model.state_dict().items(), alone.model.state_dict().values()):
        assert torch.equal(ours, theirs), name
