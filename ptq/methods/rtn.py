"""Round-to-nearest: every spec of the cell applied with the shared quantizer, no calibration.

Track A quantizes weights; track B also quantizes every block linear's input per token,
dynamically. (Round-to-nearest of the KV cache is `kv-rtn`, track C.)
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ptq.config import CellConfig
from ptq.quant import fake_quantize
from ptq.registry import QuantContext, QuantizedModel, register_method
from ptq.transforms import group_notes, quantize_inputs, replace_weights


@register_method("rtn", tracks=("A", "B"), uses=("weight", "act"))
def rtn(model: nn.Module, config: CellConfig, ctx: QuantContext) -> QuantizedModel:
    result = QuantizedModel(model)
    linears = ctx.adapter.quantizable_linears(model)
    if config.weight is not None:
        replace_weights(linears, partial(fake_quantize, spec=config.weight))
        result.notes += group_notes(linears, config.weight)
    if config.act is not None:
        quantize_inputs(model, list(linears), config.act)
    return result
