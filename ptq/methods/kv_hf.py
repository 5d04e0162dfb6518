"""kv-hf: transformers' own quantized cache (`QuantizedCache`, quanto or hqq backend), as a
reference for the native KV methods on the same cells.

Its layout is the library's: both streams use one bit width and one group size, grouped
along the axis the backend takes, with a full-precision residual of `residual_length` tokens
that is flushed, all at once, into a re-quantization of the whole cache when it fills. The
cell's `kv` specs provide bits, group size and residual; the axes are this method's params
(transformers' documentation recommends 0/0 for quanto and 1/1 for hqq).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from torch import nn
from transformers.cache_utils import QuantizedCache

from ptq.config import CellConfig
from ptq.registry import QuantContext, QuantizedModel, parse_params, register_method


@dataclass(frozen=True)
class HfCacheParams:
    backend: Literal["quanto", "hqq"] = "quanto"
    axis_key: int = 0
    axis_value: int = 0


@register_method("kv-hf", tracks=("C",), uses=("kv",))
def kv_hf(model: nn.Module, config: CellConfig, ctx: QuantContext) -> QuantizedModel:
    params = parse_params(HfCacheParams, config)
    key, value = config.kv.key, config.kv.value
    if (key.bits, key.group_size) != (value.bits, value.group_size) or key.granularity != "group":
        raise ValueError("transformers' QuantizedCache takes one bit width and one group size for keys and values: "
                         "set kv.key and kv.value to the same bits and group_size, granularity group")
    make_cache = partial(QuantizedCache, params.backend, model.config, nbits=key.bits, axis_key=params.axis_key,
                         axis_value=params.axis_value, q_group_size=key.group_size,
                         residual_length=config.kv.residual)
    return QuantizedModel(model, make_cache=make_cache,
                          notes=[f"transformers QuantizedCache, {params.backend} backend: kv axes and symmetry "
                                 "are the library's, not the cell's key_axis/value_axis"])
