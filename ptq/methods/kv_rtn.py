"""kv-rtn: keys and values rounded to nearest as the cache stores them, per token (each
token's head vector, or groups of its channels), no full-precision window by default.
The simplest KV-cache quantizer, and the one every other is measured against."""

from __future__ import annotations

from torch import nn

from ptq.config import CellConfig
from ptq.kv import quantized_cache_factory
from ptq.registry import QuantContext, QuantizedModel, register_method


@register_method("kv-rtn", tracks=("C",), uses=("kv",))
def kv_rtn(model: nn.Module, config: CellConfig, ctx: QuantContext) -> QuantizedModel:
    return QuantizedModel(model, make_cache=quantized_cache_factory(model, config))
