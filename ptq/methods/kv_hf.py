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

from transformers.cache_utils import QuantizedCache

from ptq.engine import ModelStep, Specs, Stage
from ptq.errors import NotApplicable
from ptq.kv import attention_layers
from ptq.registry import register_method


@dataclass(frozen=True)
class HfCacheParams:
    backend: Literal["quanto", "hqq"] = "quanto"
    axis_key: Literal[0, 1] = 0
    axis_value: Literal[0, 1] = 0


@register_method("kv-hf", params=HfCacheParams, tracks=("C",), role="cache", reads=("kv",))
class HfCache(Stage):
    @classmethod
    def check(cls, params: HfCacheParams, specs: Specs) -> None:
        key, value = specs.kv.key, specs.kv.value
        if (key.bits, key.group_size) != (value.bits, value.group_size) or key.granularity != "group":
            raise ValueError("transformers' QuantizedCache takes one bit width and one group size for keys and "
                             "values: set kv.key and kv.value to the same bits and group_size, granularity group")

    def after_blocks(self, step: ModelStep) -> None:
        kv, params = self.specs.kv, self.params
        sliding = sum(layer.sliding_window is not None for layer in attention_layers(step.model.config))
        if sliding:
            model = type(step.model).__name__
            raise NotApplicable(f"transformers' QuantizedCache holds full-attention layers only (it refuses "
                                f"other layer types); {model} has {sliding} sliding-window layers")
        step.result.make_cache = partial(QuantizedCache, params.backend, step.model.config, nbits=kv.key.bits,
                                         axis_key=params.axis_key, axis_value=params.axis_value,
                                         q_group_size=kv.key.group_size, residual_length=kv.residual)
        step.result.kv = {"implementation": f"transformers QuantizedCache ({params.backend} backend)",
                          "nbits": kv.key.bits, "q_group_size": kv.key.group_size, "residual_length": kv.residual,
                          "axis_key": params.axis_key, "axis_value": params.axis_value}
        step.result.notes.append(f"transformers QuantizedCache, {params.backend} backend: kv axes and symmetry "
                                 "are the library's, not the cell's key_axis/value_axis")
