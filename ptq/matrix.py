"""The benchmark catalog (bench/*.yaml) and the model x pipeline x track cells built from it."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from _pytest.mark.expression import Expression

from ptq.config import (
    TRACKS,
    CellConfig,
    ExperimentHeader,
    GateConfig,
    Layer,
    MethodConfig,
    StageConfig,
    build,
    check_layer,
    check_partial,
    read_yaml_layer,
    reroot_params,
    resolve,
    route_params,
)
from ptq.dependencies import fingerprint
from ptq.engine import Specs
from ptq.errors import ConfigError
from ptq.models.adapters import FAMILIES
from ptq.registry import IMPLICIT_QUANTIZER, MethodInfo, Pipeline, baseline_method, discover, parse_pipeline

DEFAULT_EXPERIMENT = "default"  # ids of its cells carry no experiment suffix


@dataclass(frozen=True)
class Cell:
    model: str
    method: str  # the pipeline as asked for: `rtn`, `awq+gptq`
    track: str
    config: CellConfig
    pipeline: Pipeline  # the stages that run (with a quantizer added where the pipeline needed one)
    baseline_config: CellConfig  # what the FP baseline of this cell runs with
    experiment: str | None = None
    variant: str | None = None  # one of a method YAML's `variants` (e.g. int4), part of the id
    setting: str | None = None  # one entry of the experiment's `sweep` (e.g. w4a8), part of the id
    markers: tuple[str, ...] = ()  # the experiment's pytest markers (e.g. audit)

    @property
    def calibrated(self) -> bool:
        """A stage, or static activation ranges, read calibration data: its dataset is part of the id."""
        return self.config.calib is not None

    @property
    def id(self) -> str:
        parts = [self.model, self.method]
        if self.variant:
            parts.append(self.variant)
        if self.calibrated:
            parts.append(self.config.calib.dataset)
        parts.append(self.track)
        if self.setting:
            parts.append(self.setting)
        if self.experiment and self.experiment != DEFAULT_EXPERIMENT:
            parts.append(self.experiment)
        return "-".join(parts)

    def fingerprint(self, device_type: str) -> str:
        return fingerprint(self.config, device_type)

    @property
    def keywords(self) -> frozenset[str]:
        """Names that `-k` matches exactly (case-insensitively), see `matches`."""
        names = {self.model, self.method, self.track, self.id, self.config.model.size}
        asked = [stage.name for stage in self.config.method.stages if not stage.added]
        # a library backend also answers to its algorithm's stages and its library: -k "gptq and gptqmodel"
        names |= {part for name in asked for part in (name, *re.split(r"[+@]", name))}
        if self.variant:
            names |= {self.variant, f"{self.method}-{self.variant}"}
        if self.calibrated:
            names.add(self.config.calib.dataset)
        if self.experiment:
            names.add(self.experiment)
        if self.setting:
            names.add(self.setting)
        return frozenset(names)

    def matches(self, expression: Expression) -> bool:
        """`-k` on cells matches whole names: `-k "rtn and A"` selects the rtn cells of track A.
        A term matches when it equals (ignoring case) one of `keywords`, or, when longer than one
        character, is a substring of the cell id (pytest's own `-k` matches substrings of every
        name in a test's path, so a bare "A" would match any name holding an "a"). An "@" was
        spelled AT_IN_K for pytest's parser (see `compile_keyword`)."""
        names = {name.lower() for name in self.keywords}
        cell_id = self.id.lower()

        def match(term: str, **_: object) -> bool:
            term = term.replace(AT_IN_K, "@").lower()
            return term in names or (len(term) > 1 and term in cell_id)

        return expression.evaluate(match)


def cell_of(item: object) -> Cell | None:
    """The cell a pytest item runs, if it is a benchmark cell."""
    callspec = getattr(item, "callspec", None)
    cell = callspec.params.get("cell") if callspec else None
    return cell if isinstance(cell, Cell) else None


AT_IN_K = ":"  # pytest's -k identifiers cannot hold "@" (gptq@gptqmodel); ":" can, and no name has one


def compile_keyword(expression: str) -> Expression:
    """A `-k` expression, or a usage error that quotes it; "@" (library backends) is accepted."""
    return _compile("-k", expression, expression.replace("@", AT_IN_K), '-k "gptq and A", -k "not C"')


def compile_markers(expression: str) -> Expression:
    """A `-m` expression, or a usage error that quotes it."""
    return _compile("-m", expression, expression, '-m audit, -m "not slow"')


def _compile(option: str, given: str, parsed: str, examples: str) -> Expression:
    try:
        return Expression.compile(parsed)
    except SyntaxError as exc:
        raise ConfigError(f"{option} {given!r} is not a valid expression: {exc.msg} (at column {exc.offset}); "
                          f"e.g. {examples}") from None


@dataclass(frozen=True)
class Selection:
    """What the user asked for; None means "not given" (all, or the experiment's choice)."""

    models: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None  # pipelines: `rtn`, `smoothquant+gptq`
    tracks: tuple[str, ...] | None = None
    experiments: tuple[Path, ...] = ()
    overrides: tuple[Layer, ...] = ()


CHECKPOINTS = "pretrained_quant_models"  # a model YAML's published quantized checkpoints, by format


def _checkpoint_stages(layer: Layer) -> Layer:
    """`pretrained_quant_models: {gptq: X}` in a model YAML is the location of its `gptq@checkpoint`
    stage (ptq.methods.at_checkpoint): `stages: {gptq@checkpoint: {params: {location: X}}}`."""
    named = layer.data.get(CHECKPOINTS)
    if named is None:
        return layer
    where = layer.provenance.get((CHECKPOINTS,), layer.source)
    if not isinstance(named, dict) or not all(isinstance(v, str) for v in named.values()):
        raise ConfigError(f"{where}: {CHECKPOINTS} must map formats to hub ids or folders, e.g. {{gptq: org/model}}")
    data = {key: value for key, value in layer.data.items() if key != CHECKPOINTS}
    stages = {f"{fmt}@checkpoint": {"params": {"location": location}} for fmt, location in named.items()}
    data["stages"] = {**(data.get("stages") or {}), **stages}
    provenance = {path: at for path, at in layer.provenance.items() if path[0] != CHECKPOINTS}
    for fmt in named:
        at = layer.provenance.get((CHECKPOINTS, fmt), where)
        for path in (("stages",), ("stages", f"{fmt}@checkpoint"), ("stages", f"{fmt}@checkpoint", "params"),
                     ("stages", f"{fmt}@checkpoint", "params", "location")):
            provenance.setdefault(path, at)
    return Layer(data, provenance, layer.source)


def _read_dir(folder: Path) -> dict[str, Layer]:
    return {path.stem: read_yaml_layer(path) for path in sorted(folder.glob("*.yaml"), key=lambda path: path.stem)}


def _check_header(layer: Layer, key: str, stem: str) -> None:
    if key not in layer.data or not isinstance(layer.data[key], dict):
        raise ConfigError(f"{layer.source}: needs a '{key}:' section")
    name = layer.data[key].get("name")
    if name != stem:
        where = layer.provenance.get((key, "name"), layer.source)
        raise ConfigError(f"{where}: {key}.name is {name!r} but the file is {stem}.yaml; they must match")


@dataclass(frozen=True)
class MethodFile:
    """A method's YAML, each part with its `method.params` as that method's stage settings."""

    description: str
    base: Layer
    device_profiles: dict[str, Layer]
    tracks: dict[str, Layer]
    variants: dict[str, Layer]


@dataclass(frozen=True)
class SweepEntry:
    """One setting of an experiment's sweep: what its cells change, and its per-pipeline blocks."""

    settings: Layer
    per_method: dict[str, Layer]


@dataclass(frozen=True)
class Experiment:
    header: ExperimentHeader
    settings: Layer
    per_method: dict[str, Layer]  # by pipeline name, its params already routed to its stages
    sweep: dict[str, SweepEntry]  # every method cell once per entry; the float baseline once


# What a sweep may vary: what methods read. The FP baseline runs once for all entries, so an
# entry cannot change what the baseline reads (the model, the evaluation).
SWEEP_SECTIONS = ("weight", "act", "act_attention_inputs", "kv", "calib", "gates", "stages", "method")


class Catalog:
    """Every YAML under bench/, each validated when read."""

    def __init__(self, bench_dir: Path) -> None:
        if not (bench_dir / "defaults.yaml").is_file():
            raise ConfigError(f"{bench_dir} is not a benchmark folder: it has no defaults.yaml")
        self.bench_dir = bench_dir
        self.registry: dict[str, MethodInfo] = discover()
        self.schemas = {name: info.params for name, info in self.registry.items()}
        self.baseline = baseline_method(self.registry)
        defaults = read_yaml_layer(bench_dir / "defaults.yaml")
        self.device_profiles = {device: defaults.sub("device_profiles").sub(device)
                                for device in (defaults.data.get("device_profiles") or {})}
        self.defaults = defaults.without("device_profiles")
        self.models = {name: _checkpoint_stages(layer) for name, layer in _read_dir(bench_dir / "models").items()}
        self.tracks = _read_dir(bench_dir / "tracks")
        self.experiments = {path.stem: path for path in sorted((bench_dir / "experiments").glob("*.yaml"))}
        for layer in (self.defaults, *self.device_profiles.values()):
            check_layer(layer, self.schemas)
        families = {family.name for family in FAMILIES}
        for stem, layer in self.models.items():
            _check_header(layer, "model", stem)
            check_layer(layer, self.schemas)
            family = layer.data["model"].get("family")  # optional: the loaded class decides
            if family is not None and family not in families:
                where = layer.provenance.get(("model", "family"), layer.source)
                known = ", ".join(sorted(families))
                raise ConfigError(f"{where}: unknown model family {family!r}; known: {known} (or leave it "
                                  "out: the model's class decides)")
        for stem, layer in self.tracks.items():
            _check_header(layer, "track", stem)
            check_layer(layer, self.schemas)
        self.methods = {stem: self._method_file(stem, layer)
                        for stem, layer in _read_dir(bench_dir / "methods").items()}
        missing = sorted(set(self.registry) - set(self.methods))
        if missing:
            raise ConfigError(f"methods registered in ptq/methods without a YAML in {bench_dir / 'methods'}: {missing}")

    def _method_file(self, stem: str, layer: Layer) -> MethodFile:
        _check_header(layer, "method", stem)
        if stem not in self.registry:
            raise ConfigError(f"{layer.source}: no method {stem!r} is registered in ptq/methods "
                              f"(registered: {', '.join(sorted(self.registry))})")

        def part(sub: Layer) -> Layer:
            sub = reroot_params(sub, stem)
            check_layer(sub, self.schemas)
            return sub

        supported = self.registry[stem].tracks
        for track in layer.data.get("tracks") or {}:
            if track not in supported:
                where = layer.provenance.get(("tracks", track), layer.source)
                raise ConfigError(f"{where}: method {stem} supports tracks {sorted(supported)}, not {track!r}")
        blocks = {key: {name: part(layer.sub(key).sub(name)) for name in layer.data.get(key) or {}}
                  for key in ("device_profiles", "tracks", "variants")}
        return MethodFile(layer.data["method"].get("description", ""),
                          part(layer.without("tracks", "device_profiles", "variants")),
                          blocks["device_profiles"], blocks["tracks"], blocks["variants"])

    def marked_experiments(self, markexpr: str) -> list[str]:
        """The experiments a `-m` expression asks for by name: those with markers that it selects
        and that a cell without markers would not satisfy (`-m audit`, not `-m "not slow"`)."""
        if not markexpr.strip():
            return []
        expression = compile_markers(markexpr)
        if expression.evaluate(lambda name, **_: False):
            return []
        marked = []
        for name, path in self.experiments.items():
            markers = set(self.experiment(path).header.markers)
            if markers and expression.evaluate(lambda marker, **_: marker in markers):
                marked.append(name)
        return marked

    def pipeline(self, name: str) -> Pipeline:
        pipeline = parse_pipeline(name, self.registry)
        for stage in pipeline.stages:
            if stage.name not in self.methods:  # registered without a YAML: refused at load already
                raise ConfigError(f"method {stage.name} has no YAML in {self.bench_dir / 'methods'}")
        return pipeline

    def experiment(self, path: Path) -> Experiment:
        """An experiment's header, its settings, and its per-pipeline settings (e.g. quality budgets
        that differ by method at 3 bits), which sit just above its settings."""
        layer = read_yaml_layer(path)
        if "experiment" not in layer.data:
            raise ConfigError(f"{path}: an experiment file needs an 'experiment:' section (name, models, ...)")
        header_layer = layer.sub("experiment")
        check_partial(header_layer.data, ExperimentHeader, header_layer)
        header = build(ExperimentHeader, header_layer.data, header_layer.provenance)
        for name in header.methods or ():
            self.pipeline(name)
        for method, tracks in (header.method_tracks or {}).items():
            where = header_layer.provenance.get(("method_tracks", method), str(path))
            if method not in (header.methods or ()):
                raise ConfigError(f"{where}: method_tracks.{method}: not one of the experiment's methods")
            unsupported = sorted(set(tracks) - self.pipeline(method).tracks)
            if unsupported or not tracks:
                raise ConfigError(f"{where}: method_tracks.{method}: {method} runs on tracks "
                                  f"{sorted(self.pipeline(method).tracks)}, not {unsupported or tracks}")
        for method, names in (header.variants or {}).items():
            known = self.methods[method].variants if method in self.methods else {}
            unknown = [name for name in names if name not in known]
            if unknown or not names:
                where = header_layer.provenance.get(("variants", method), str(path))
                raise ConfigError(f"{where}: variants.{method}: unknown variants {unknown or names} "
                                  f"(known: {', '.join(known) or f'none, or no method {method!r}'})")
        settings = layer.without("experiment", "per_method", "sweep")
        check_layer(settings, self.schemas)
        sweep = {}
        for name in layer.data.get("sweep") or {}:
            entry = layer.sub("sweep").sub(name)
            where = layer.provenance.get(("sweep", name), str(path))
            other = sorted(set(entry.data) - set(SWEEP_SECTIONS) - {"per_method"})
            if other:
                raise ConfigError(f"{where}: sweep.{name} sets {other}: a sweep varies what methods read "
                                  f"({', '.join(SWEEP_SECTIONS)}); the float baseline, which runs once for every "
                                  "entry, must not change")
            entry_settings = entry.without("per_method")
            check_layer(entry_settings, self.schemas)
            sweep[name] = SweepEntry(entry_settings, self._per_method(entry, f"{path} sweep.{name}"))
        return Experiment(header, settings, self._per_method(layer, str(path)), sweep)

    def _per_method(self, layer: Layer, where: str) -> dict[str, Layer]:
        """A layer's `per_method` blocks by pipeline, each with its params routed to its stages."""
        per_method = {}
        for name in layer.data.get("per_method") or {}:
            at = layer.provenance.get(("per_method", name), where)
            try:
                pipeline = self.pipeline(name)
            except ConfigError as exc:
                raise ConfigError(f"{at}: per_method: {exc}") from None
            block = layer.sub("per_method").sub(name)
            routed, keys = route_params(block, self._schemas(pipeline))
            unknown = sorted(set((block.data.get("method") or {}).get("params") or {}) - keys)
            if unknown:
                raise ConfigError(f"{at}: per_method.{name}: no stage of {name} has param(s) {unknown} "
                                  f"({self._params_listing(pipeline)})")
            check_layer(routed, self.schemas)
            per_method[name] = routed
        return per_method

    def _schemas(self, pipeline: Pipeline) -> dict[str, type]:
        return {stage.name: stage.params for stage in pipeline.stages}

    def _params_listing(self, pipeline: Pipeline) -> str:
        return "; ".join(f"{stage.name}: {', '.join(f.name for f in dataclasses.fields(stage.params)) or 'none'}"
                         for stage in pipeline.stages)

    def variants(self, pipeline: Pipeline,
                 chosen: dict[str, list[str]] | None = None) -> dict[str | None, Layer | None]:
        """The cells a pipeline gives per model and track: one per variant of the (one) stage that
        has variants (those `chosen` for it, when given), else one."""
        with_variants = [stage.name for stage in pipeline.stages if self.methods[stage.name].variants]
        if len(with_variants) > 1:
            raise ConfigError(f"pipeline {pipeline.name}: {' and '.join(with_variants)} both have variants; "
                              "a pipeline takes the variants of one stage at most")
        if not with_variants:
            return {None: None}
        variants = self.methods[with_variants[0]].variants
        names = (chosen or {}).get(with_variants[0], list(variants))
        return {name: variants[name] for name in names}

    def cell_config(self, model: str, pipeline: Pipeline, track: str, top: tuple[Layer, ...], device_type: str,
                    variant: Layer | None = None, routed: set[str] | None = None) -> tuple[CellConfig, Pipeline]:
        """Resolve one cell; `top` are the layers above the track (experiment, then CLI overrides),
        whose `method.params` go to the stages that have them (the keys used are added to `routed`).
        A variant sits just above the track: it is what makes the cell differ from its siblings.
        Returns the configuration and the pipeline that runs (a transform-only pipeline gets a
        round-to-nearest quantizer when the cell's track quantizes weights)."""
        layers = [self.defaults]
        if device_type in self.device_profiles:
            layers.append(self.device_profiles[device_type])
        layers.append(self.models[model])
        for stage in pipeline.stages:
            method = self.methods[stage.name]
            layers += [method.base, *[blocks[key] for blocks, key in ((method.device_profiles, device_type),
                                                                       (method.tracks, track)) if key in blocks]]
        layers.append(self.tracks[track])
        if variant is not None:
            layers.append(variant)
        name, asked = pipeline.name, len(pipeline.stages)
        description = " Then: ".join(self.methods[stage.name].description for stage in pipeline.stages)
        config = None
        for _ in range(2):  # a second pass when a quantizer is added
            schemas = self._schemas(pipeline)
            above = []
            for layer in top:
                routed_layer, keys = route_params(layer, schemas)
                above.append(routed_layer)
                if routed is not None:
                    routed |= keys
            config = resolve(layers + above, self.schemas, tuple(schemas), name, description)
            if not (pipeline.needs_quantizer() and config.weight is not None):
                break
            pipeline = pipeline.with_stage(self.registry[IMPLICIT_QUANTIZER])
        stages = tuple(dataclasses.replace(stage, added=index >= asked)
                       for index, stage in enumerate(config.method.stages))
        config = dataclasses.replace(config, method=dataclasses.replace(config.method, stages=stages))
        return self._reads_only(config, pipeline, track), pipeline

    def _reads_only(self, config: CellConfig, pipeline: Pipeline, track: str) -> CellConfig:
        """Sections the pipeline does not read are dropped, so its record never claims them; then
        each stage checks the specs it reads (before any model loads)."""
        reads = pipeline.reads
        # activations are quantized for every method but the baseline
        config = dataclasses.replace(config, act=None if pipeline.baseline else config.act)
        config = dataclasses.replace(
            config,
            weight=config.weight if "weight" in reads else None,
            kv=config.kv if "kv" in reads else None,
            act_attention_inputs=config.act is not None and config.act_attention_inputs,
            # static activation ranges are observed on the calibration set, whatever the method
            calib=config.calib if pipeline.calibrated or config.static_act else None,
            # KV probes belong to the tracks that ask for them: an experiment may tune them for
            # every cell it covers, but only those cells' tracks run them.
            kv_eval=config.kv_eval if "kv_eval" in self.tracks[track].data else None)
        specs = Specs(config.weight, config.kv, config.act)
        for stage, stage_config in zip(pipeline.stages, config.method.stages):
            for spec in stage.reads:
                if getattr(specs, spec) is None:
                    raise ConfigError(f"{config.model.name} x {config.method.name} x track {track}: {stage.name} "
                                      f"reads the {spec} spec, which the cell leaves unset")
            try:
                stage.stage.check(stage_config.params, specs)
            except ValueError as exc:
                raise ConfigError(f"{config.model.name} x {config.method.name} x track {track}: {stage.name}: "
                                  f"{exc}") from None
        return config

    def baseline_config(self, config: CellConfig) -> CellConfig:
        """The configuration the FP baseline of a cell runs with: the cell's model and evaluation,
        no method settings, no specs, no calibration, no gates."""
        stage = StageConfig(self.baseline.name, self.baseline.params())
        return dataclasses.replace(config, method=MethodConfig(self.baseline.name, stages=(stage,)), weight=None,
                                   act=None, kv=None, calib=None, gates=GateConfig())

    def cells(self, selection: Selection, device_type: str) -> list[Cell]:
        """The cells of a selection, experiment by experiment, in a stable order (model, track, method)."""
        routed: set[str] = set()
        experiments = [self.experiment(path) for path in selection.experiments] or [None]
        cells = []
        for experiment in experiments:
            cells += self._experiment_cells(selection, experiment, device_type, routed)
        above = [*selection.overrides, *(e.settings for e in experiments if e),
                 *(entry.settings for e in experiments if e for entry in e.sweep.values())]
        asked = {key for layer in above for key in (layer.data.get("method") or {}).get("params") or {}}
        unused = sorted(asked - routed)
        if unused:
            pipelines = {cell.pipeline.name: cell.pipeline for cell in cells}
            listing = "; ".join(self._params_listing(p) for p in pipelines.values())
            raise ConfigError(f"method.params {unused}: no selected method has such a parameter ({listing})")
        ids = [cell.id for cell in cells]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ConfigError(f"cell ids are not unique: {duplicated}")
        return cells

    def _experiment_cells(self, selection: Selection, experiment: Experiment | None, device_type: str,
                          routed: set[str]) -> list[Cell]:
        header = experiment.header if experiment else None

        def pick(given: tuple[str, ...] | None, from_experiment: tuple[str, ...] | None,
                 known: typing.Iterable[str], what: str) -> tuple[tuple[str, ...], bool]:
            chosen = given if given is not None else from_experiment
            if chosen is None:
                return tuple(known), False
            unknown = [name for name in chosen if name not in known]
            if unknown:
                raise ConfigError(f"unknown {what} {unknown}; known {what}: {', '.join(known)}")
            return tuple(dict.fromkeys(chosen)), True

        models, _ = pick(selection.models, header and header.models, self.models, "models")
        tracks, tracks_explicit = pick(selection.tracks, header and header.tracks, TRACKS, "tracks")
        chosen = selection.methods if selection.methods is not None else header and header.methods
        pipelines = [self.pipeline(name) for name in dict.fromkeys(chosen or self.methods)]
        for track in tracks:
            if track not in self.tracks:
                raise ConfigError(f"track {track} has no YAML in {self.bench_dir / 'tracks'}")
        # Asking for a method on tracks it does not have is an error; an experiment's method list
        # narrowed by --tracks simply loses the methods of other tracks.
        if selection.methods is not None and tracks_explicit:
            for pipeline in pipelines:
                if not pipeline.tracks & set(tracks):
                    raise ConfigError(f"method {pipeline.name} supports tracks {sorted(pipeline.tracks)}, "
                                      f"none of the requested {list(tracks)}")
        # The experiment's choice of tracks and variants per method goes with its choice of methods.
        restrict = ExperimentHeader("", method_tracks={}, variants={}) if header is None or selection.methods \
            else dataclasses.replace(header, method_tracks=header.method_tracks or {}, variants=header.variants or {})
        # An experiment may sweep calibration sets: each becomes a layer under the CLI overrides.
        calib_layers: list[tuple[Layer, ...]] = [()]
        if header is not None and header.calib_datasets:
            calib_layers = [(Layer({"calib": {"dataset": name}}, {}, f"experiment {header.name} calib_datasets"),)
                            for name in header.calib_datasets]
        cells = []
        for model in models:
            for track in tracks:
                for pipeline in pipelines:
                    only = restrict.method_tracks.get(pipeline.name)
                    if track not in pipeline.tracks or (only is not None and track not in only):
                        continue
                    for setting, setting_layers in self._settings(experiment, pipeline).items():
                        for variant, variant_layer in self.variants(pipeline, restrict.variants).items():
                            for calib in calib_layers if pipeline.calibrated else [()]:
                                top = setting_layers + calib + selection.overrides
                                where = f"{model} x {pipeline.name}{'-' + variant if variant else ''} x track {track}"
                                config, runs = self.cell_config(model, pipeline, track, top, device_type,
                                                                variant_layer, routed)
                                _check_kv_fits(config, where)
                                cells.append(Cell(model, pipeline.name, track, config, runs,
                                                  self.baseline_config(config), header.name if header else None,
                                                  variant, setting, header.markers if header else ()))
        return cells

    @staticmethod
    def _settings(experiment: Experiment | None, pipeline: Pipeline) -> dict[str | None, tuple[Layer, ...]]:
        """The layers an experiment puts above a pipeline's cells, per sweep entry (None: no sweep;
        the float baseline takes none of the entries)."""
        if experiment is None:
            return {None: ()}

        def block(per_method: dict[str, Layer]) -> tuple[Layer, ...]:
            return (per_method[pipeline.name],) if pipeline.name in per_method else ()

        base = (experiment.settings,) + block(experiment.per_method)
        settings: dict[str | None, tuple[Layer, ...]] = {None: base}
        if experiment.sweep and not pipeline.baseline:
            settings = {name: base + (entry.settings,) + block(entry.per_method)
                        for name, entry in experiment.sweep.items()}
        if not (experiment.header.seeds and pipeline.calibrated):
            return settings
        return {"-".join(filter(None, (name, f"seed{seed}"))): layers + (
                    Layer({"calib": {"seed": seed}}, {}, f"experiment {experiment.header.name} seeds"),)
                for name, layers in settings.items() for seed in experiment.header.seeds}


def _check_kv_fits(config: CellConfig, cell: str) -> None:
    """KV settings that cannot work with the model or the evaluation context, found before any load."""
    if config.kv is None:
        return
    if config.model.head_dim is not None:
        try:
            config.kv.check_head_dim(config.model.head_dim)
        except ValueError as exc:
            raise ConfigError(f"{cell}: {exc} (model {config.model.name})") from None
    contexts = {"the evaluation window (eval.seqlen)": config.eval.seqlen}
    if config.kv_eval is not None:
        contexts["the shortest passkey prompt"] = min(config.kv_eval.passkey_lengths, default=config.eval.seqlen)
    for what, length in contexts.items():
        if config.kv.residual >= length:
            raise ConfigError(f"{cell}: kv.residual {config.kv.residual} is not smaller than {what}, "
                              f"{length} tokens: nothing would ever be quantized")


def shard(cells: list[Cell], spec: str) -> list[Cell]:
    """The I-th of N slices ("I/N", 1-based) of the cells: cell k goes to slice k mod N, so the
    slices are disjoint, cover the matrix, and do not depend on where they run."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected I/N with whole numbers, e.g. 1/4") from None
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {spec!r}: I must be between 1 and N")
    return [cell for k, cell in enumerate(cells) if k % count == index - 1]
