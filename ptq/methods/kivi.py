"""KIVI (Liu et al., 2024): keys quantized per channel, values per token, asymmetric, with the
most recent tokens kept in full precision.

Keys have outlier channels (a few channels are large for every token), so a per-token scale
is dominated by them; grouping each channel over G consecutive tokens isolates them. Values
have no such channels and feed a weighted sum over tokens, so per-token error stays local.
Key groups need G tokens before they can be quantized, hence the full-precision residual
window, which also keeps the tokens attention weighs most exact. The paper's defaults:
G = 32 and R = 128 (bench/methods/kivi.yaml). Storage and the residual rule are the shared
cache's (ptq.kv); this method only insists on KIVI's axes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptq.engine import ModelStep, Specs, Stage
from ptq.kv import describe, quantized_cache_factory
from ptq.registry import register_method


@dataclass(frozen=True)
class KiviParams:
    """KIVI's group size and window are the cell's `kv` spec (bench/methods/kivi.yaml)."""


@register_method("kivi", params=KiviParams, tracks=("C",), role="cache", reads=("kv",))
class Kivi(Stage):
    @classmethod
    def check(cls, params: KiviParams, specs: Specs) -> None:
        kv = specs.kv
        if (kv.key_axis, kv.value_axis) != ("channel", "token") or kv.key.symmetric or kv.value.symmetric:
            raise ValueError("kivi quantizes keys per channel and values per token, asymmetrically (got "
                             f"key_axis={kv.key_axis}, value_axis={kv.value_axis}); use kv-rtn for other layouts")

    def after_blocks(self, step: ModelStep) -> None:
        step.result.make_cache = quantized_cache_factory(step.model, self.specs.kv)
        step.result.kv = describe(self.specs.kv)
