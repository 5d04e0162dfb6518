"""llm-compressor's GPTQ, AWQ and SmoothQuant+GPTQ (W8A8), in an environment of its own (it pins
transformers <= 5.17). The params are ours, mapped onto its modifiers; where it has a knob the
reference does not (AWQ's duo scaling, GPTQ's actorder default) it is set to the reference's
behaviour, and what it cannot do (AWQ's clipping search) is recorded by the worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptq.backends.stage import Backend
from ptq.engine import ModelStep, Specs
from ptq.registry import register_method

Pipeline = Literal["sequential", "basic", "independent"]
# The inputs of the library's W8A8 scheme (ptq.backends.worker.llmcompressor), as our act spec's fields
W8A8_INPUTS = {"bits": 8, "symmetric": True, "granularity": "token", "format": "int", "dynamic": True}


def _per_group_or_channel(specs: Specs) -> None:
    if specs.weight.granularity not in ("group", "channel"):
        raise ValueError(f"llm-compressor quantizes weights per group or per channel, not {specs.weight.granularity}")


@dataclass(frozen=True)
class LlmcGptqParams:
    blocksize: int = 128  # block_size
    percdamp: float = 0.01  # dampening_frac
    act_order: bool = False  # actorder "static" when true (llm-compressor's default is "static")
    pipeline: Pipeline = "sequential"  # block by block, each fed the previous blocks as quantized (the reference's)


@dataclass(frozen=True)
class LlmcAwqParams:
    n_grid: int = 20
    duo_scaling: bool = False  # llm-compressor's default True; llm-awq's scales are the activations' only
    pipeline: Pipeline = "sequential"


@dataclass(frozen=True)
class LlmcSmoothGptqParams:
    alpha: float = 0.5  # smoothing_strength; the model YAMLs set their family's (as for our smoothquant)
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    activations: bool = True  # the W8A8 scheme: dynamic per-token int8 inputs (also our track B's)
    pipeline: Pipeline = "sequential"


class LlmCompressor(Backend):
    library, env = "llmcompressor", "llmcompressor"

    @classmethod
    def check(cls, params: object, specs: Specs) -> None:
        _per_group_or_channel(specs)


@register_method("gptq@llmcompressor", params=LlmcGptqParams, tracks=("A", "B"), role="quantizer",
                 reads=("weight",), calibrated=True)
class GptqAtLlmCompressor(LlmCompressor):
    algorithm = "gptq"


@register_method("awq@llmcompressor", params=LlmcAwqParams, tracks=("A",), role="quantizer", reads=("weight",),
                 calibrated=True)
class AwqAtLlmCompressor(LlmCompressor):
    algorithm = "awq"


@register_method("smoothquant+gptq@llmcompressor", params=LlmcSmoothGptqParams, tracks=("B",), role="quantizer",
                 reads=("weight", "act"), calibrated=True)
class SmoothGptqAtLlmCompressor(LlmCompressor):
    algorithm = "smoothquant+gptq"

    def unexpressed(self, step: ModelStep) -> str | None:
        act = self.specs.act
        if self.params.activations and {key: getattr(act, key) for key in W8A8_INPUTS} != W8A8_INPUTS:
            return (f"its W8A8 scheme quantizes inputs to int8, symmetric, per token, dynamically; the cell's "
                    f"act spec is {act} (with activations: false it rounds the weights only; our quantizer does "
                    "the inputs, as for every cell)")
        return super().unexpressed(step)
