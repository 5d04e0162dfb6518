"""The benchmark catalog (bench/*.yaml) and the model x method x track cells built from it."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from ptq.config import (
    TRACKS,
    CellConfig,
    ExperimentHeader,
    Layer,
    build,
    check_partial,
    read_yaml_layer,
    resolve,
)
from ptq.errors import ConfigError
from ptq.models.adapters import ADAPTERS
from ptq.registry import MethodInfo, discover


DEFAULT_EXPERIMENT = "default"  # ids of its cells carry no experiment suffix


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    track: str
    config: CellConfig
    experiment: str | None = None
    calibrated: bool = False  # the method reads calibration data: its dataset is part of the id
    variant: str | None = None  # one of the method YAML's `variants` (e.g. int4), part of the id

    @property
    def id(self) -> str:
        parts = [self.model, self.method]
        if self.variant:
            parts.append(self.variant)
        if self.calibrated:
            parts.append(self.config.calib.dataset)
        parts.append(self.track)
        if self.experiment and self.experiment != DEFAULT_EXPERIMENT:
            parts.append(self.experiment)
        return "-".join(parts)

    @property
    def keywords(self) -> frozenset[str]:
        """Names that `-k` matches exactly (case-insensitively), see conftest."""
        names = {self.model, self.method, self.track, self.id, self.config.model.size}
        if self.variant:
            names |= {self.variant, f"{self.method}-{self.variant}"}
        if self.calibrated:
            names.add(self.config.calib.dataset)
        if self.experiment:
            names.add(self.experiment)
        return frozenset(names)


@dataclass(frozen=True)
class Selection:
    """What the user asked for; None means "not given" (all, or the experiment's choice)."""

    models: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    tracks: tuple[str, ...] | None = None
    experiments: tuple[Path, ...] = ()
    overrides: tuple[Layer, ...] = ()


def _read_dir(folder: Path) -> dict[str, Layer]:
    return {path.stem: read_yaml_layer(path) for path in sorted(folder.glob("*.yaml"))}


def _check_header(layer: Layer, key: str, stem: str) -> None:
    if key not in layer.data or not isinstance(layer.data[key], dict):
        raise ConfigError(f"{layer.source}: needs a '{key}:' section")
    name = layer.data[key].get("name")
    if name != stem:
        where = layer.provenance.get((key, "name"), layer.source)
        raise ConfigError(f"{where}: {key}.name is {name!r} but the file is {stem}.yaml; they must match")


class Catalog:
    """Every YAML under bench/, each validated when read."""

    def __init__(self, bench_dir: Path) -> None:
        if not (bench_dir / "defaults.yaml").is_file():
            raise ConfigError(f"{bench_dir} is not a benchmark folder: it has no defaults.yaml")
        self.bench_dir = bench_dir
        self.registry: dict[str, MethodInfo] = discover()
        self.defaults = read_yaml_layer(bench_dir / "defaults.yaml")
        self.device_profiles = {
            device: self.defaults.sub("device_profiles").sub(device)
            for device in (self.defaults.data.get("device_profiles") or {})
        }
        self.defaults = self.defaults.without("device_profiles")
        check_partial(self.defaults.data, CellConfig, self.defaults)
        for profile in self.device_profiles.values():
            check_partial(profile.data, CellConfig, profile)
        self.models = _read_dir(bench_dir / "models")
        self.methods = _read_dir(bench_dir / "methods")
        self.tracks = _read_dir(bench_dir / "tracks")
        self.experiments = {path.stem: path for path in sorted((bench_dir / "experiments").glob("*.yaml"))}
        families = {adapter.family for adapter in ADAPTERS}
        for stem, layer in self.models.items():
            _check_header(layer, "model", stem)
            check_partial(layer.data, CellConfig, layer)
            family = layer.data["model"].get("family")
            if family not in families:
                where = layer.provenance.get(("model", "family"), layer.source)
                raise ConfigError(f"{where}: unknown model family {family!r}; known: {', '.join(sorted(families))}")
        for stem, layer in self.tracks.items():
            _check_header(layer, "track", stem)
            check_partial(layer.data, CellConfig, layer)
        for stem, layer in self.methods.items():
            self._check_method(stem, layer)
        missing = sorted(set(self.registry) - set(self.methods))
        if missing:
            raise ConfigError(f"methods registered in ptq/methods without a YAML in {bench_dir / 'methods'}: {missing}")

    def _check_method(self, stem: str, layer: Layer) -> None:
        _check_header(layer, "method", stem)
        if stem not in self.registry:
            raise ConfigError(
                f"{layer.source}: no method {stem!r} is registered in ptq/methods "
                f"(registered: {', '.join(sorted(self.registry))})"
            )
        check_partial(layer.without("tracks", "device_profiles", "variants").data, CellConfig, layer)
        for variant in layer.data.get("variants") or {}:
            sub = layer.sub("variants").sub(variant)
            check_partial(sub.data, CellConfig, sub)
        for device in layer.data.get("device_profiles") or {}:
            profile = layer.sub("device_profiles").sub(device)
            check_partial(profile.data, CellConfig, profile)
        per_track = layer.data.get("tracks") or {}
        supported = self.registry[stem].tracks
        for track in per_track:
            where = layer.provenance.get(("tracks", track), layer.source)
            if track not in supported:
                raise ConfigError(f"{where}: method {stem} supports tracks {sorted(supported)}, not {track!r}")
            sub = layer.sub("tracks").sub(track)
            check_partial(sub.data, CellConfig, sub)

    def experiment(self, path: Path) -> tuple[ExperimentHeader, Layer, dict[str, Layer]]:
        """An experiment's header, its settings, and its per-method settings (e.g. quality budgets
        that differ by method at 3 bits), which sit just above its settings."""
        layer = read_yaml_layer(path)
        if "experiment" not in layer.data:
            raise ConfigError(f"{path}: an experiment file needs an 'experiment:' section (name, models, ...)")
        header_layer = layer.sub("experiment")
        check_partial(header_layer.data, ExperimentHeader, header_layer)
        header = build(ExperimentHeader, header_layer.data, header_layer.provenance)
        settings = layer.without("experiment", "per_method")
        check_partial(settings.data, CellConfig, settings)
        per_method = {}
        for method in layer.data.get("per_method") or {}:
            if method not in self.methods:
                where = layer.provenance.get(("per_method", method), str(path))
                raise ConfigError(f"{where}: per_method names unknown method {method!r}")
            per_method[method] = layer.sub("per_method").sub(method)
            check_partial(per_method[method].data, CellConfig, per_method[method])
        return header, settings, per_method

    def variants(self, method: str) -> list[str | None]:
        """The method's variants (cells that differ only in its own settings), or [None]."""
        return list(self.methods[method].data.get("variants") or {}) or [None]

    def cell_config(self, model: str, method: str, track: str, top: tuple[Layer, ...], device_type: str,
                    variant: str | None = None) -> CellConfig:
        """Resolve one cell; `top` are the layers above the track (experiment, then CLI overrides).
        A variant sits just above the track: it is what makes the cell differ from its siblings."""
        method_layer = self.methods[method]
        layers = [self.defaults]
        if device_type in self.device_profiles:
            layers.append(self.device_profiles[device_type])
        layers += [
            self.models[model],
            method_layer.without("tracks", "device_profiles", "variants"),
            method_layer.sub("device_profiles").sub(device_type),
            method_layer.sub("tracks").sub(track),
            self.tracks[track],
        ]
        if variant is not None:
            layers.append(method_layer.sub("variants").sub(variant))
        layers += list(top)
        config = resolve(layers)
        # Specs the method does not read are dropped, so its record never claims them.
        uses = self.registry[method].uses
        unused = {spec: None for spec in ("weight", "act", "kv") if spec not in uses}
        # KV probes belong to the tracks that ask for them: an experiment may tune them for
        # every cell it covers, but only those cells' tracks run them.
        if "kv_eval" not in self.tracks[track].data:
            unused["kv_eval"] = None
        config = dataclasses.replace(config, **unused)
        _check_kv_fits(config, f"{model} x {method}{'-' + variant if variant else ''} x track {track}")
        return config

    def cells(self, selection: Selection, device_type: str) -> list[Cell]:
        """The cells of a selection, experiment by experiment, in a stable order (model, track, method)."""
        if not selection.experiments:
            return self._experiment_cells(selection, None, None, {}, device_type)
        cells = []
        for path in selection.experiments:
            cells += self._experiment_cells(selection, *self.experiment(path), device_type)
        ids = [cell.id for cell in cells]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ConfigError(f"cell ids are not unique: {duplicated}")
        return cells

    def _experiment_cells(self, selection: Selection, header: ExperimentHeader | None, settings: Layer | None,
                          per_method: dict[str, Layer], device_type: str) -> list[Cell]:
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
        methods, _ = pick(selection.methods, header and header.methods, self.methods, "methods")
        tracks, tracks_explicit = pick(selection.tracks, header and header.tracks, TRACKS, "tracks")
        for track in tracks:
            if track not in self.tracks:
                raise ConfigError(f"track {track} has no YAML in {self.bench_dir / 'tracks'}")
        # Asking for a method on tracks it does not have is an error; an experiment's method list
        # narrowed by --tracks simply loses the methods of other tracks.
        if selection.methods is not None and tracks_explicit:
            for method in methods:
                if not self.registry[method].tracks & set(tracks):
                    raise ConfigError(
                        f"method {method} supports tracks {sorted(self.registry[method].tracks)}, "
                        f"none of the requested {list(tracks)}"
                    )
        # An experiment may sweep calibration sets: each becomes a layer under the CLI overrides.
        calib_layers: list[tuple[Layer, ...]] = [()]
        if header is not None and header.calib_datasets:
            calib_layers = [(Layer({"calib": {"dataset": name}}, {}, f"experiment {header.name} calib_datasets"),)
                            for name in header.calib_datasets]
        experiment_name = header.name if header else None
        cells = []
        for model in models:
            for track in tracks:
                for method in methods:
                    info = self.registry[method]
                    if track not in info.tracks:
                        continue
                    experiment_layers = ((settings,) if settings else ()) + (
                        (per_method[method],) if method in per_method else ())
                    for variant in self.variants(method):
                        for calib in calib_layers if info.calibrated else [()]:
                            layers = experiment_layers + calib + selection.overrides
                            config = self.cell_config(model, method, track, layers, device_type, variant)
                            cells.append(Cell(model, method, track, config, experiment_name, info.calibrated,
                                              variant))
        return cells


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
