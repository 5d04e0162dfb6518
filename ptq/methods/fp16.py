"""The float baseline: the model as loaded, in the dtype its YAML names (float32 on CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.engine import ModelStep, Stage
from ptq.registry import register_method


@dataclass(frozen=True)
class FloatParams:
    """The baseline has no knobs."""


@register_method("fp16", params=FloatParams, tracks=("A", "B", "C"), role="baseline")
class FloatBaseline(Stage):
    def before_blocks(self, step: ModelStep) -> None:
        dtype = str(next(step.model.parameters()).dtype).removeprefix("torch.")
        step.result.notes.append(f"unquantized baseline in {dtype}")
