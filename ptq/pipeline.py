"""A cell's pipeline on a model: its stages built from the configuration (each with only its
params and the specs it reads), run in order on one block walk (ptq.engine); then what the
pipeline itself owns: quantized activations when the cell's track sets them, and the checks
that the result is what it declares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptq.calib import CalibrationSet
from ptq.config import CellConfig
from ptq.engine import ModelStep, QuantResult, Specs, Stage, run_stages
from ptq.models.adapters import ArchAdapter
from ptq.models.placement import one_cpu_thread, on_device
from ptq.registry import Pipeline
from ptq.transforms import group_notes, quantize_inputs, recording_ranges


def build_stages(config: CellConfig, pipeline: Pipeline) -> list[Stage]:
    """One stage object per method of the pipeline, with its params and the specs it reads."""
    rounding = pipeline.rounding_stage
    stages = []
    for info, stage in zip(pipeline.stages, config.method.stages, strict=True):
        specs = Specs(**{spec: getattr(config, spec) for spec in info.reads})
        stages.append(info.stage(stage.params, specs, final=info.name == rounding))
    return stages


def _structure(model: nn.Module) -> list[tuple[str, str, int, int]]:
    return [(name, type(module).__qualname__, len(module._forward_pre_hooks), len(module._forward_hooks))
            for name, module in model.named_modules()]


def quantize(model: nn.Module, adapter: ArchAdapter, config: CellConfig, pipeline: Pipeline,
             calibration: CalibrationSet | None, device: torch.device, tokenizer: Any = None) -> QuantResult:
    """Run the pipeline on `model` in place. Activations are not quantized yet (see
    `quantize_activations`): the weights the stages leave can be stored as they are. The
    tokenizer goes to whole-model stages (library backends save it beside the model)."""
    if pipeline.calibrated != (calibration is not None):
        raise ValueError(f"pipeline {pipeline.name} is {'' if pipeline.calibrated else 'not '}calibrated: "
                         f"calibration data {'missing' if calibration is None else 'given'}")
    result = QuantResult(model)
    before = _structure(model)
    run_stages(build_stages(config, pipeline), ModelStep(model, adapter, result, calibration, tokenizer, device),
               calibration, config.calib, device)
    linears = adapter.quantizable_linears(model)
    if config.weight is not None:
        unrounded = sorted(set(linears) - set(result.weight_specs))
        if unrounded:
            raise RuntimeError(f"pipeline {pipeline.name} left {len(unrounded)} linears unrounded under a weight "
                               f"spec, e.g. {unrounded[:3]}")
    if result.pure_weights and _structure(model) != before:
        raise RuntimeError(f"pipeline {pipeline.name} changed modules or hooks without declaring it "
                           "(QuantResult.runtime): its result is not a pure weight replacement")
    result.notes += group_notes(result.weight_specs, linears)
    return result


def quantize_activations(result: QuantResult, adapter: ArchAdapter, config: CellConfig,
                         calibration: CalibrationSet | None = None,
                         device: torch.device = torch.device("cpu")) -> None:
    """Quantize the input of every block linear with the cell's act spec (track B), for every
    method: it is the deployment format, not an algorithm; with `act_attention_inputs`, the
    outputs of the q, k and v projections too. Static ranges (`dynamic: false`) are
    each input's min and max over the calibration set, run through the model as the stages left
    it (weights quantized, activations in float), on `device` and on one CPU thread (a range
    follows the summation order too)."""
    if config.act is None:
        return
    names = list(adapter.quantizable_linears(result.model))
    outputs = adapter.attention_projections(result.model) if config.act_attention_inputs else []
    ranges = None
    if config.static_act:
        if calibration is None:
            raise ValueError("static activation quantization needs the calibration set to observe ranges on")
        with recording_ranges(result.model, names, outputs) as ranges, on_device(result.model, device), \
                one_cpu_thread(device), torch.no_grad():
            for batch in calibration.tokens.split(config.calib.batch_size):
                result.model(batch.to(device), use_cache=False)
        result.notes.append(f"static activation ranges: min and max of each linear's input over the "
                            f"{calibration.tokens.shape[0]} calibration sequences, weights as quantized, "
                            "activations in float")
    quantize_inputs(result.model, names, config.act, outputs=outputs, ranges=ranges)
    result.act_specs = {name: config.act for name in names}
    result.act_output_specs = {name: config.act for name in outputs}
