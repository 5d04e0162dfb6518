"""The float baseline: the model as loaded, in the dtype its YAML names (float32 on CPU)."""

from __future__ import annotations

from torch import nn

from ptq.config import CellConfig
from ptq.registry import QuantContext, QuantizedModel, register_method


@register_method("fp16", tracks=("A", "B", "C"), uses=(), baseline=True)
def fp16(model: nn.Module, config: CellConfig, ctx: QuantContext) -> QuantizedModel:
    return QuantizedModel(model, notes=[f"unquantized baseline in {config.model.dtype}"])
