"""hqq@hqq: the HQQ authors' library (hqq, a core dependency) on the cell's weight spec, to audit
our HQQ (ptq.methods.hqq) against. Calibration-free; the optimizer runs with the library's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.envs import CORE
from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class HqqLibraryParams:
    """Nothing beyond the weight spec: hqq_base_quant_config fixes the rest (recorded by the worker)."""


@register_method("hqq@hqq", params=HqqLibraryParams, tracks=("A",), role="quantizer", reads=("weight",))
class HqqAtHqq(Backend):
    algorithm, library, env = "hqq", "hqq", CORE

    @classmethod
    def check(cls, params: HqqLibraryParams, specs: Specs) -> None:
        if specs.weight.symmetric:
            raise ValueError("hqq optimizes a zero point: it needs an asymmetric weight spec (symmetric: false)")
