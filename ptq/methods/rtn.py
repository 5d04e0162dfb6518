"""Round-to-nearest: the weight spec applied with the shared quantizer, no calibration.

It is also the quantizer a pipeline of transforms gets when nothing else rounds its weights
(`smoothquant` alone is SmoothQuant's W8A8: smoothed, then rounded to nearest). Activations
(track B) are quantized by the pipeline for every method; the KV cache's RTN is `kv-rtn`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptq.engine import BlockStep, Stage
from ptq.quant import fake_quantize
from ptq.registry import register_method


@dataclass(frozen=True)
class RtnParams:
    """Round-to-nearest has no knobs beyond the weight spec."""


@register_method("rtn", params=RtnParams, tracks=("A", "B"), role="quantizer", reads=("weight",))
class Rtn(Stage):
    def on_block(self, step: BlockStep) -> None:
        spec = self.specs.weight
        for name, linear in step.linears().items():
            step.quantized(name, fake_quantize(linear.weight, spec), spec)
