"""The method registry: methods register by name with the tracks they support.

Every module in `ptq.methods` is imported by `discover()`, so adding a method is adding
one file there (plus its YAML in bench/methods/).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, TypeVar

import torch
from torch import nn
from transformers.cache_utils import Cache

from ptq.calib import CalibrationSet
from ptq.config import CellConfig, describe_type, type_matches
from ptq.models.adapters import ArchAdapter

Spec = Literal["weight", "act", "kv"]


@dataclass
class QuantizedModel:
    """What a method hands to the evaluators."""

    model: nn.Module
    make_cache: Callable[[], Cache] | None = None  # a fresh cache per forward, when the KV cache is quantized
    notes: list[str] = field(default_factory=list)  # facts worth recording (uneven groups, ...)
    fallbacks: list[str] = field(default_factory=list)  # anything that ran other than as configured


@dataclass(frozen=True)
class QuantContext:
    """What a method gets besides the model and its configuration."""

    adapter: ArchAdapter
    device: torch.device  # where calibration computes (the model itself may stay elsewhere)
    calibration: CalibrationSet | None  # the seeded calibration windows, for calibrated methods


class MethodFn(Protocol):
    def __call__(self, model: nn.Module, config: CellConfig, ctx: QuantContext) -> QuantizedModel: ...


@dataclass(frozen=True)
class MethodInfo:
    name: str
    tracks: frozenset[str]
    uses: frozenset[Spec]  # which of the cell's weight/act/kv specs the method reads
    apply: MethodFn
    baseline: bool  # the float model itself: its metrics are the session's FP baseline
    calibrated: bool  # reads calibration data (its dataset becomes part of the cell id)


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str, *, tracks: tuple[str, ...], uses: tuple[Spec, ...], baseline: bool = False, calibrated: bool = False
) -> Callable[[MethodFn], MethodFn]:
    def decorator(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].apply.__module__}, {fn.__module__})")
        _REGISTRY[name] = MethodInfo(name, frozenset(tracks), frozenset(uses), fn, baseline, calibrated)
        return fn

    return decorator


def discover() -> dict[str, MethodInfo]:
    """Import every module of ptq.methods (registering its methods) and return the registry."""
    import ptq.methods

    for module in pkgutil.iter_modules(ptq.methods.__path__):
        importlib.import_module(f"ptq.methods.{module.name}")
    return dict(_REGISTRY)


def baseline_method(registry: dict[str, MethodInfo]) -> MethodInfo:
    """The one method whose metrics are the FP baseline of every cell."""
    baselines = [info for info in registry.values() if info.baseline]
    if len(baselines) != 1:
        raise ValueError(f"exactly one baseline method must be registered, found {[b.name for b in baselines]}")
    return baselines[0]


P = TypeVar("P")


def parse_params(schema: type[P], config: CellConfig) -> P:
    """The method's YAML `params` as its frozen params dataclass (defaults = the reference's);
    an unknown name or a wrong type is an error, so a record never claims a knob the run did not use."""
    params = config.method.params
    hints = typing.get_type_hints(schema)
    unknown = sorted(set(params) - set(hints))
    if unknown:
        raise ValueError(f"method {config.method.name}: unknown params {unknown} (known: {', '.join(sorted(hints)) or 'none'})")
    for name, value in params.items():
        if not type_matches(value, hints[name]):
            raise ValueError(f"method {config.method.name}: param {name} must be {describe_type(hints[name])}, "
                             f"got {value!r}")
    return schema(**params)
