"""The method registry, and pipelines of methods.

A method is a `ptq.engine.Stage` subclass registered by name with its frozen params class,
the tracks it supports, the specs it reads and its role. `discover()` imports every module
of `ptq.methods`, so adding a method is adding one file there (plus its YAML in bench/methods/).

A pipeline is methods joined by "+", run in order on one block walk: `smoothquant+gptq`,
`awq+gptq`, or one method alone. Roles decide what may follow what:

    transform   changes weights without rounding them (SmoothQuant's scales, a rotation)
    quantizer   rounds the weights; the last quantizer of a pipeline is the one that rounds,
                an earlier one must be able to hand the rounding on (`defers_rounding`, AWQ)
    cache       quantizes the KV cache; touches no weight
    baseline    the float model itself, alone

A library backend is a method named `algorithm@library` (`gptq@gptqmodel`,
`smoothquant+gptq@llmcompressor`): one whole-model quantizer stage (ptq.backends). Its algorithm
part may itself be a chain: a name is first looked up whole, and only then split on "+", so
`smoothquant+gptq@llmcompressor` is the library's own pipeline while `smoothquant+gptq@gptqmodel`
is our SmoothQuant followed by GPTQModel's GPTQ.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

from ptq.engine import Stage
from ptq.errors import ConfigError

Spec = Literal["weight", "kv", "act"]
Role = Literal["baseline", "transform", "quantizer", "cache"]
SEPARATOR = "+"
LIBRARY = "@"  # algorithm@library: a library backend
IMPLICIT_QUANTIZER = "rtn"  # rounds the weights of a pipeline of transforms only, as the papers' W8A8 runs do


@dataclass(frozen=True)
class MethodInfo:
    name: str
    stage: type[Stage]
    params: type  # a frozen dataclass: its defaults are the reference's, __post_init__ checks ranges
    tracks: frozenset[str]
    reads: frozenset[Spec]  # the cell specs the stage receives
    role: Role
    calibrated: bool  # reads calibration data (its dataset becomes part of the cell id)
    defers_rounding: bool  # a quantizer that, before a later quantizer, only transforms the weights

    @property
    def module(self) -> str:
        return self.stage.__module__


_REGISTRY: dict[str, MethodInfo] = {}
S = TypeVar("S", bound=type[Stage])


def register_method(name: str, *, params: type, tracks: tuple[str, ...], role: Role, reads: tuple[Spec, ...] = (),
                    calibrated: bool = False, defers_rounding: bool = False) -> Callable[[S], S]:
    def decorator(stage: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].module}, {stage.__module__})")
        if SEPARATOR in name and LIBRARY not in name:
            raise ValueError(f"method name {name!r} contains {SEPARATOR!r}, which joins the stages of a pipeline "
                             f"(only a library backend's algorithm, before {LIBRARY!r}, may be a chain)")
        stage.name = name
        _REGISTRY[name] = MethodInfo(name, stage, params, frozenset(tracks), frozenset(reads), role, calibrated,
                                     defers_rounding)
        return stage

    return decorator


def discover() -> dict[str, MethodInfo]:
    """Import every module of ptq.methods (registering its methods) and return the registry."""
    import ptq.methods

    for module in pkgutil.iter_modules(ptq.methods.__path__):
        importlib.import_module(f"ptq.methods.{module.name}")
    return dict(_REGISTRY)


def baseline_method(registry: dict[str, MethodInfo]) -> MethodInfo:
    """The one method whose metrics are the FP baseline of every cell."""
    baselines = [info for info in registry.values() if info.role == "baseline"]
    if len(baselines) != 1:
        raise ValueError(f"exactly one baseline method must be registered, found {[b.name for b in baselines]}")
    return baselines[0]


@dataclass(frozen=True)
class Pipeline:
    """Methods run in order on one block walk."""

    stages: tuple[MethodInfo, ...]

    @property
    def name(self) -> str:
        return SEPARATOR.join(stage.name for stage in self.stages)

    @property
    def tracks(self) -> frozenset[str]:
        return frozenset.intersection(*(stage.tracks for stage in self.stages))

    @property
    def calibrated(self) -> bool:
        return any(stage.calibrated for stage in self.stages)

    @property
    def baseline(self) -> bool:
        return self.stages[0].role == "baseline"

    @property
    def cache_only(self) -> bool:
        """Only cache stages: they build a KV cache and change no tensor of the model."""
        return all(stage.role == "cache" for stage in self.stages)

    @property
    def reads(self) -> frozenset[Spec]:
        return frozenset().union(*(stage.reads for stage in self.stages))

    @property
    def rounding_stage(self) -> str | None:
        """The stage that rounds the weights: the last quantizer."""
        quantizers = [stage.name for stage in self.stages if stage.role == "quantizer"]
        return quantizers[-1] if quantizers else None

    def needs_quantizer(self) -> bool:
        """Transforms with nothing to round the weights after them (weights are then rounded to nearest)."""
        return self.rounding_stage is None and any(stage.role == "transform" for stage in self.stages)

    def with_stage(self, info: MethodInfo) -> Pipeline:
        return Pipeline(self.stages + (info,))


def parse_pipeline(name: str, registry: dict[str, MethodInfo]) -> Pipeline:
    """`a+b+...` as a checked pipeline; a usage error says what is wrong and lists the choices. A
    registered name is one stage even if it holds a "+" (a library backend's own pipeline)."""
    names = [name] if name in registry else name.split(SEPARATOR)
    known = ", ".join(sorted(registry))
    unknown = [part for part in names if part not in registry]
    if unknown:
        where = f" in pipeline {name!r}" if len(names) > 1 else ""
        raise ConfigError(f"unknown methods {unknown}{where}; known methods: {known}")
    repeated = sorted({part for part in names if names.count(part) > 1})
    if repeated:
        raise ConfigError(f"pipeline {name!r} names {repeated} twice: each stage runs once")
    pipeline = Pipeline(tuple(registry[part] for part in names))
    roles = [stage.role for stage in pipeline.stages]
    if "baseline" in roles and len(names) > 1:
        raise ConfigError(f"pipeline {name!r}: the float baseline {pipeline.stages[roles.index('baseline')].name} "
                          "runs alone")
    if not pipeline.tracks:
        supported = "; ".join(f"{stage.name}: {' '.join(sorted(stage.tracks))}" for stage in pipeline.stages)
        raise ConfigError(f"pipeline {name!r}: no track is supported by every stage ({supported})")
    rounding = pipeline.rounding_stage
    for position, stage in enumerate(pipeline.stages):
        later = pipeline.stages[position + 1:]
        if stage.role == "quantizer" and stage.name != rounding and not stage.defers_rounding:
            raise ConfigError(f"pipeline {name!r}: {stage.name} rounds the weights, so no weight quantizer may "
                              f"follow it (it can come last, after {', '.join(s.name for s in later)})")
        if stage.name == rounding and any(s.role == "transform" for s in later):
            raise ConfigError(f"pipeline {name!r}: a transform cannot follow {stage.name}, which rounds the weights "
                              "(transforms go first: e.g. smoothquant+gptq)")
    if roles.count("cache") > 1:
        raise ConfigError(f"pipeline {name!r}: at most one KV-cache method")
    return pipeline
