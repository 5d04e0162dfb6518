"""The float baseline: the model as loaded, in the dtype its YAML names (float32 on CPU)."""

from __future__ import annotations

from torch import nn

from ptq.config import CellConfig
from ptq.models.adapters import ArchAdapter
from ptq.registry import QuantizedModel, register_method


@register_method("fp16", tracks=("A", "B", "C"), uses=(), baseline=True)
def fp16(model: nn.Module, adapter: ArchAdapter, config: CellConfig) -> QuantizedModel:
    return QuantizedModel(model, notes=[f"unquantized baseline in {config.model.dtype}"])
