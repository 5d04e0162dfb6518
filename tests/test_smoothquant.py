"""SmoothQuant: the scales are the reference's formula over the float model's activation maxima
(collected here independently, the reference's way: forward hooks on every linear of the whole
float model), smoothing leaves the float model's function unchanged, it migrates outliers so
per-token activation quantization loses less, and inside `smoothquant+gptq` its statistics
still come from the float model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ptq.calib import CalibrationSet
from ptq.config import CalibConfig, parse_override
from ptq.engine import BlockStep, ModelStep, QuantResult, Specs, Stage, run_stages
from ptq.matrix import Catalog, Selection
from ptq.methods.smoothquant import SmoothQuant, SmoothQuantParams
from ptq.models.adapters import adapter_for
from ptq.pipeline import quantize
from ptq.quant import ActSpec, QuantSpec
from ptq.transforms import quantize_inputs

BENCH = Path(__file__).resolve().parents[1] / "bench"
CPU = torch.device("cpu")
OUTLIERS = (3, 17, 40)  # hidden channels made large for every token


def tiny_llama(outliers: bool) -> LlamaForCausalLM:
    """A 2-block Llama (GQA); with `outliers`, a few embedding channels are 30x larger, so the
    norms' outputs (the q/k/v and gate/up inputs) carry outlier channels as real LLMs do."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128)).eval()
        if outliers:
            with torch.no_grad():
                for layer in model.model.layers:
                    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                        norm.weight[list(OUTLIERS)] *= 30
    return model


LLAMA = adapter_for(tiny_llama(False))  # derived from the module tree; the same for every Llama


def tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(seed))


def smooth(model: LlamaForCausalLM, calibration: torch.Tensor, alpha: float, propagate: str = "float") -> QuantResult:
    """SmoothQuant alone (no quantizer after it) on `model`, in place."""
    result = QuantResult(model)
    stage = SmoothQuant(SmoothQuantParams(alpha=alpha), Specs(), final=False)
    run_stages([stage], ModelStep(model, LLAMA, result), CalibrationSet(calibration, {}),
               CalibConfig(batch_size=4, propagate=propagate), CPU)
    return result


def reference_act_max(model: LlamaForCausalLM, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's get_act_scales: hooks on every linear of the float model, max |x| per input
    channel over all tokens, one full forward per sample."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for sample in calibration:
            model(sample.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return maxima


@pytest.mark.parametrize("alpha", (0.5, 0.85))
def test_scales_are_the_reference_formula_over_the_float_models_maxima(alpha: float) -> None:
    float_model = tiny_llama(outliers=True)
    calibration = tokens((8, 24), 1)
    maxima = reference_act_max(float_model, calibration)
    smoothed = copy.deepcopy(float_model)
    smooth(smoothed, calibration, alpha)
    for index, (before, after) in enumerate(zip(float_model.model.layers, smoothed.model.layers)):
        for norm, linears in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                              ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            parent = "self_attn" if norm == "input_layernorm" else "mlp"
            weights = [before.get_submodule(f"{parent}.{name}").weight for name in linears]
            w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
            x_max = maxima[f"model.layers.{index}.{parent}.{linears[0]}"]
            scales = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            torch.testing.assert_close(after.get_submodule(norm).weight, before.get_submodule(norm).weight / scales,
                                       rtol=1e-5, atol=0)
            for name, weight in zip(linears, weights):
                torch.testing.assert_close(after.get_submodule(f"{parent}.{name}").weight, weight * scales,
                                           rtol=1e-5, atol=0)
        # the reference leaves o_proj and down_proj alone
        assert torch.equal(after.self_attn.o_proj.weight, before.self_attn.o_proj.weight)
        assert torch.equal(after.mlp.down_proj.weight, before.mlp.down_proj.weight)


@pytest.mark.parametrize("smooth_linears", (False, True))
def test_smoothing_leaves_the_float_model_unchanged(smooth_linears: bool) -> None:
    model = tiny_llama(outliers=True).double()
    reference = copy.deepcopy(model)
    result = QuantResult(model)
    stage = SmoothQuant(SmoothQuantParams(alpha=0.85, smooth_linears=smooth_linears), Specs(), final=False)
    run_stages([stage], ModelStep(model, LLAMA, result), CalibrationSet(tokens((4, 16), 2), {}),
               CalibConfig(batch_size=2, propagate="float"), CPU)
    held_out = tokens((2, 32), 3)
    with torch.no_grad():
        torch.testing.assert_close(model(held_out).logits, reference(held_out).logits, rtol=1e-10, atol=1e-10)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight,
                           reference.model.layers[0].input_layernorm.weight)
    changed_down = not torch.equal(model.model.layers[0].mlp.down_proj.weight,
                                   reference.model.layers[0].mlp.down_proj.weight)
    assert changed_down == smooth_linears  # up_proj -> down_proj folds; v_proj -> o_proj cannot (GQA)
    (note,) = [note for note in result.notes if note.startswith("SmoothQuant alpha 0.85")]
    assert "self_attn.v_proj -> self_attn.o_proj" not in note
    assert ("mlp.up_proj -> mlp.down_proj" in note) == smooth_linears


def test_smoothing_makes_per_token_int8_activations_lose_less() -> None:
    """W-float, A8 per token: the activation error alone, with and without smoothing."""
    spec = ActSpec(8, symmetric=True, granularity="token")
    calibration, held_out = tokens((8, 24), 4), tokens((4, 32), 5)
    reference = tiny_llama(outliers=True)
    with torch.no_grad():
        expected = reference(held_out).logits
    errors = {}
    for smoothed in (False, True):
        model = tiny_llama(outliers=True)
        if smoothed:
            smooth(model, calibration, 0.85)
        quantize_inputs(model, list(LLAMA.quantizable_linears(model)), spec)
        with torch.no_grad():
            errors[smoothed] = float((model(held_out).logits - expected).pow(2).mean())
    assert errors[True] < 0.5 * errors[False], errors  # measured: about 0.1x


def test_inside_smoothquant_gptq_the_statistics_come_from_the_float_model() -> None:
    """GPTQ propagates quantized activations; SmoothQuant's norms must still be those it gets on
    the float model (the same as SmoothQuant alone with float propagation)."""
    catalog = Catalog(BENCH)
    calibration = CalibrationSet(tokens((8, 24), 6), {})
    overrides = tuple(parse_override(text) for text in ("weight.bits=4", "weight.group_size=32",
                                                         "calib.batch_size=4"))
    norms = {}
    for method in ("smoothquant", "smoothquant+gptq"):
        (cell,) = catalog.cells(Selection(models=("smollm2-135m",), methods=(method,), tracks=("A",),
                                          overrides=overrides), "cpu")
        assert cell.config.calib.propagate == {"smoothquant": "float", "smoothquant+gptq": "quantized"}[method]
        model = tiny_llama(outliers=True)
        quantize(model, LLAMA, cell.config, cell.pipeline, calibration, CPU)
        norms[method] = [layer.post_attention_layernorm.weight.clone() for layer in model.model.layers]
    for alone, chained in zip(norms["smoothquant"], norms["smoothquant+gptq"]):
        torch.testing.assert_close(chained, alone, rtol=1e-6, atol=0)


class Before(Stage):
    """A stage that walks the blocks before SmoothQuant and leaves them as they are."""

    name = "before"

    def on_block(self, step: BlockStep) -> None:
        pass


@pytest.mark.parametrize("propagate", ("float", "quantized"))
def test_first_smoothquant_reads_its_maxima_in_the_engines_float_pass(propagate: str) -> None:
    """As the first stage, SmoothQuant takes its activation maxima in the pass the engine makes over
    the float block anyway: the same smoothed model, bit for bit, as with a pass of its own (which
    it makes behind a stage that walks the blocks first), and attention runs once per batch and
    block instead of twice."""
    calibration = tokens((8, 24), 9)
    states, calls = {}, {}
    for first in (True, False):
        model = tiny_llama(outliers=True)
        counter = [0]
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        stages = [SmoothQuant(SmoothQuantParams(alpha=0.85), Specs(), final=False)]
        if not first:
            stages.insert(0, Before(None, Specs(), final=False))
        run_stages(stages, ModelStep(model, LLAMA, QuantResult(model)), CalibrationSet(calibration, {}),
                   CalibConfig(batch_size=4, propagate=propagate), CPU)
        states[first], calls[first] = model.state_dict(), counter[0]
    for name, tensor in states[True].items():
        assert torch.equal(tensor, states[False][name]), name
    blocks, batches = 2, 2
    assert calls == {True: blocks * batches * (1 if propagate == "float" else 2),
                     False: blocks * batches * (2 if propagate == "float" else 3)}


def test_alpha_is_checked_and_comes_from_the_model_yaml() -> None:
    catalog = Catalog(BENCH)
    (cell,) = catalog.cells(Selection(models=("smollm2-135m",), methods=("smoothquant",), tracks=("B",)), "cpu")
    assert cell.config.method.stages[0].params == SmoothQuantParams(alpha=0.85)  # bench/models/smollm2-135m.yaml
    assert [(s.name, s.added) for s in cell.config.method.stages] == [("smoothquant", False), ("rtn", True)]
    (opt,) = catalog.cells(Selection(models=("opt-125m",), methods=("smoothquant",), tracks=("B",)), "cpu")
    assert opt.config.method.stages[0].params.alpha == 0.5
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        SmoothQuantParams(alpha=1.5)
