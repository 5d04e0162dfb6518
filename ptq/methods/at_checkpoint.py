"""Published quantized checkpoints, `gptq@checkpoint` and `awq@checkpoint`: a model YAML names them
(`pretrained_quant_models: {gptq: <hub id or folder>, awq: ...}`, read as this stage's `location`),
and the cell loads the checkpoint through the library that provides its kernels (GPTQModel,
AutoAWQ, each in its environment), scores it with our evaluation on the same windows, and
records its on-disk size next to the float model's. Quantized by someone else: no calibration
of ours and no weight spec (the checkpoint's is recorded by the library)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptq.backends.stage import Backend
from ptq.engine import ModelStep
from ptq.errors import BackendUnavailable
from ptq.registry import register_method


@dataclass(frozen=True)
class CheckpointParams:
    location: str | None = None  # hub id or local folder, from the model YAML's pretrained_quant_models


class Checkpoint(Backend):
    library = "checkpoint"
    format: str

    def after_blocks(self, step: ModelStep) -> None:
        if not self.params.location:  # every model has the cell; most name no checkpoint
            raise BackendUnavailable(f"the model names no published {self.format} checkpoint (its YAML's "
                                     f"pretrained_quant_models: {{{self.format}: <hub id or folder>}})")
        super().after_blocks(step)

    def request(self, step: ModelStep, folder: Path) -> dict[str, Any]:
        return {**super().request(step, folder), "params": {"location": self.params.location, "format": self.format}}


@register_method("gptq@checkpoint", params=CheckpointParams, tracks=("A",), role="quantizer")
class GptqCheckpoint(Checkpoint):
    algorithm, format, env = "gptq", "gptq", "gptqmodel"


@register_method("awq@checkpoint", params=CheckpointParams, tracks=("A",), role="quantizer")
class AwqCheckpoint(Checkpoint):
    algorithm, format, env = "awq", "awq", "autoawq"
