"""kv-rtn: keys and values rounded to nearest as the cache stores them, per token (each
token's head vector, or groups of its channels), no full-precision window by default.
The simplest KV-cache quantizer, and the one every other is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.engine import ModelStep, Stage
from ptq.kv import describe, quantized_cache_factory
from ptq.registry import register_method


@dataclass(frozen=True)
class KvRtnParams:
    """The cache's layout is the cell's `kv` spec; no knobs beyond it."""


@register_method("kv-rtn", params=KvRtnParams, tracks=("C",), role="cache", reads=("kv",))
class KvRtn(Stage):
    def after_blocks(self, step: ModelStep) -> None:
        step.result.make_cache = quantized_cache_factory(step.model, self.specs.kv)
        step.result.kv = describe(self.specs.kv)
