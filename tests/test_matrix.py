"""The cell matrix: method discovery, the cells a selection yields, and selecting cells
through pytest itself (`-k`, --methods/--tracks, usage errors)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ptq.registry
from ptq.config import TRACKS, parse_override
from ptq.errors import ConfigError
from ptq.gates import BaselineStore
from ptq.matrix import Catalog, Cell, Selection
from ptq.engine import Stage
from ptq.methods.kv_hf import HfCacheParams
from ptq.methods.rtn import RtnParams
from ptq.quant import QuantSpec
from ptq.registry import MethodInfo, discover

# pytester runs pytest in this process: import every method module now, so no inner run
# imports (and, on leaving, un-imports) one, which would register it twice on the next run.
discover()

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT = BENCH / "experiments" / "default.yaml"
KV_CELLS = ["kv-rtn-int8", "kv-rtn-int4", "kv-rtn-int2", "kivi-int4", "kivi-int2", "kv-hf-quanto-int4",
            "kv-hf-quanto-int2", "kv-hf-hqq-int4"]
DEFAULT_ORDER = ([f"smollm2-135m-{m}-{t}" for t in "AB" for m in ("fp16", "rtn")]
                 + [f"smollm2-135m-{m}-C" for m in ["fp16", *KV_CELLS]])
DEFAULT_IDS = set(DEFAULT_ORDER)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(BENCH)


@pytest.fixture(scope="module")
def default_cells(catalog: Catalog) -> dict[str, Cell]:
    cells = catalog.cells(Selection(experiments=(DEFAULT,)), "cpu")
    return {cell.id: cell for cell in cells}


# ----------------------------------------------------------------------------- discovery


def test_discover_finds_the_methods_with_their_tracks() -> None:
    registry = discover()
    assert {"fp16", "rtn"} <= set(registry)
    fp16, rtn = registry["fp16"], registry["rtn"]
    assert fp16.tracks == frozenset(TRACKS) and rtn.tracks == frozenset({"A", "B"})
    assert (fp16.role, rtn.role) == ("baseline", "quantizer")
    assert fp16.reads == frozenset()
    assert rtn.reads == frozenset({"weight"})  # activations are the pipeline's, for every method
    for name in ("kv-rtn", "kivi", "kv-hf"):
        assert (registry[name].tracks, registry[name].reads, registry[name].role) == (
            frozenset({"C"}), frozenset({"kv"}), "cache")
    assert all(info.name == name for name, info in registry.items())
    assert discover() == registry  # idempotent: modules are imported once


def test_every_registered_method_has_a_yaml() -> None:
    stems = {path.stem for path in (BENCH / "methods").glob("*.yaml")}
    assert set(discover()) <= stems


def test_registering_a_name_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ptq.registry, "_REGISTRY", dict(ptq.registry._REGISTRY))
    with pytest.raises(ValueError, match="registered twice"):
        ptq.registry.register_method("rtn", params=RtnParams, tracks=("A",), role="quantizer")(Stage)


# -------------------------------------------------------------------------------- cells


def test_default_experiment_gives_the_default_cells(default_cells: dict[str, Cell]) -> None:
    assert set(default_cells) == DEFAULT_IDS
    assert len(default_cells) == 13


def test_cell_ids_are_model_method_variant_track(default_cells: dict[str, Cell]) -> None:
    for cell_id, cell in default_cells.items():
        variant = f"-{cell.variant}" if cell.variant else ""
        assert cell_id == f"{cell.model}-{cell.method}{variant}-{cell.track}"
        assert (cell.config.model.name, cell.config.method.name, cell.config.track.name) == (
            cell.model, cell.method, cell.track)
        extra = {cell.variant, f"{cell.method}-{cell.variant}"} if cell.variant else set()
        assert cell.keywords == {cell.model, cell.method, cell.track, cell_id, "small", "default"} | extra


def test_cells_are_ordered_by_model_track_method(catalog: Catalog) -> None:
    cells = catalog.cells(Selection(experiments=(DEFAULT,)), "cpu")
    assert [cell.id for cell in cells] == DEFAULT_ORDER
    everything = catalog.cells(Selection(), "cpu")
    pairs = sum(len(info.tracks) * len(catalog.variants(catalog.pipeline(name)))
                for name, info in catalog.registry.items())
    assert len(everything) == len(catalog.models) * pairs
    keys = [(c.model, c.track, c.method) for c in everything]
    assert keys == sorted(keys)


def test_command_line_choices_replace_the_experiments(catalog: Catalog) -> None:
    cells = catalog.cells(Selection(models=("opt-125m",), methods=("rtn", "rtn"), tracks=("B", "A"),
                                    experiments=(DEFAULT,)), "cpu")
    assert [cell.id for cell in cells] == ["opt-125m-rtn-B", "opt-125m-rtn-A"]  # in the order asked, deduplicated


@pytest.mark.parametrize(("field", "name", "known"), [
    ("models", "gpt-5", "smollm2-135m"),
    ("methods", "omniquant", "apot, awq, fp16, gptq, hqq, kivi, kv-hf, kv-rtn, pot, rtn"),
    ("tracks", "D", "A, B, C"),
])
def test_unknown_names_raise_config_error_listing_known_names(catalog: Catalog, field: str, name: str,
                                                              known: str) -> None:
    with pytest.raises(ConfigError) as info:
        catalog.cells(Selection(**{field: (name,)}), "cpu")
    message = str(info.value)
    assert f"unknown {field} ['{name}']" in message
    assert known in message


def test_unknown_name_in_an_experiment_is_an_error(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("experiment:\n  name: exp\n  models: [smollm2-135m, nosuch]\n")
    with pytest.raises(ConfigError, match=r"unknown models \['nosuch'\]"):
        catalog.cells(Selection(experiments=(path,)), "cpu")


def test_fp16_cells_drop_the_specs_they_do_not_use(default_cells: dict[str, Cell]) -> None:
    for track in "ABC":
        config = default_cells[f"smollm2-135m-fp16-{track}"].config
        assert (config.weight, config.act, config.kv) == (None, None, None)
        assert config.gates.max_ppl_ratio is None


def test_rtn_track_a_is_weight_only_w4_group_128(default_cells: dict[str, Cell]) -> None:
    config = default_cells["smollm2-135m-rtn-A"].config
    assert config.weight == QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
    assert config.act is None and config.kv is None
    assert config.gates.max_ppl_ratio == 1.40


def test_rtn_track_b_is_w8a8_per_channel_per_token(default_cells: dict[str, Cell]) -> None:
    config = default_cells["smollm2-135m-rtn-B"].config
    assert (config.weight.bits, config.weight.symmetric, config.weight.granularity) == (8, True, "channel")
    assert (config.act.bits, config.act.symmetric, config.act.granularity) == (8, True, "token")
    assert config.kv is None


def test_kv_variants_set_their_own_layout(default_cells: dict[str, Cell]) -> None:
    int8 = default_cells["smollm2-135m-kv-rtn-int8-C"].config
    assert int8.weight is None and int8.act is None
    for spec in (int8.kv.key, int8.kv.value):
        assert (spec.bits, spec.symmetric, spec.granularity) == (8, False, "token")
    assert (int8.kv.key_axis, int8.kv.value_axis, int8.kv.residual) == ("token", "token", 0)
    kivi = default_cells["smollm2-135m-kivi-int2-C"].config.kv
    assert (kivi.key_axis, kivi.value_axis, kivi.residual) == ("channel", "token", 128)
    assert kivi.key == kivi.value == QuantSpec(bits=2, symmetric=False, granularity="group", group_size=32)
    hqq = default_cells["smollm2-135m-kv-hf-hqq-int4-C"].config
    assert hqq.method.stages[0].params == HfCacheParams(backend="hqq", axis_key=1, axis_value=1)
    # every track C cell, the float one included, runs the same probes
    probes = {cell.config.kv_eval for cell in default_cells.values() if cell.track == "C"}
    assert len(probes) == 1 and None not in probes
    assert all(cell.config.kv_eval is None for cell in default_cells.values() if cell.track != "C")


@pytest.mark.parametrize(("override", "message"), [
    ("kv.value.group_size=48", "kv.value.group_size 48 does not divide the head dimension 64"),
    ("kv.residual=512", "kv.residual 512 is not smaller than the evaluation window (eval.seqlen), 512 tokens"),
    ("kv.key.bits=9", "bits must be"),
])
def test_kv_settings_that_cannot_work_fail_at_collection(catalog: Catalog, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        catalog.cells(Selection(models=("smollm2-135m",), methods=("kivi",), tracks=("C",),
                                overrides=(parse_override(override),)), "cpu")


def test_fp16_cells_of_one_model_differ_only_by_track(default_cells: dict[str, Cell]) -> None:
    configs = [default_cells[f"smollm2-135m-fp16-{t}"].config.to_dict() for t in "ABC"]
    for config in configs:
        config.pop("track")
    assert configs[2].pop("kv_eval") is not None  # track C probes its cache, a float one here
    assert configs[0].pop("kv_eval") is configs[1].pop("kv_eval") is None
    assert configs[0] == configs[1] == configs[2]


def test_overrides_reach_every_cell(catalog: Catalog) -> None:
    cells = catalog.cells(Selection(experiments=(DEFAULT,), overrides=(parse_override("eval.max_windows=2"),)), "cpu")
    assert len(cells) == 13 and all(cell.config.eval.max_windows == 2 for cell in cells)


@pytest.fixture
def track_a_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A bench/ copy with an extra method that supports track A only."""
    info = MethodInfo("wonly", Stage, RtnParams, frozenset({"A"}), frozenset({"weight"}), "quantizer", False, False)
    monkeypatch.setitem(ptq.registry._REGISTRY, "wonly", info)
    bench = Path(shutil.copytree(BENCH, tmp_path / "bench"))
    (bench / "methods" / "wonly.yaml").write_text("method: {name: wonly}\ntracks:\n  A: {}\n")
    return bench


def test_method_without_any_requested_track_is_an_error(track_a_only: Path) -> None:
    catalog = Catalog(track_a_only)
    with pytest.raises(ConfigError, match=r"method wonly supports tracks \['A'\], none of the requested \['B'\]"):
        catalog.cells(Selection(methods=("wonly", "rtn"), tracks=("B",), experiments=(DEFAULT,)), "cpu")
    # without explicit tracks, the method simply has fewer cells
    ids = [cell.id for cell in catalog.cells(Selection(methods=("wonly", "rtn"), experiments=(DEFAULT,)), "cpu")]
    assert ids == ["smollm2-135m-wonly-A", "smollm2-135m-rtn-A", "smollm2-135m-rtn-B"]
    cell = catalog.cells(Selection(methods=("wonly",), tracks=("A",), experiments=(DEFAULT,)), "cpu")[0]
    assert cell.config.weight is not None and cell.config.act is None and cell.config.kv is None


def test_track_without_yaml_is_an_error(tmp_path: Path) -> None:
    bench = Path(shutil.copytree(BENCH, tmp_path / "bench"))
    (bench / "tracks" / "C.yaml").unlink()
    catalog = Catalog(bench)
    assert len(catalog.cells(Selection(tracks=("A", "B"), experiments=(bench / "experiments" / "default.yaml",)),
                             "cpu")) == 4
    with pytest.raises(ConfigError, match="track C has no YAML"):
        catalog.cells(Selection(experiments=(bench / "experiments" / "default.yaml",)), "cpu")


def test_committed_baselines_match_the_default_cells(default_cells: dict[str, Cell]) -> None:
    """bench/baselines.json holds an entry for every default cell under its current CPU fingerprint
    (a config change without regenerating baselines would fail every baseline gate)."""
    store = BaselineStore(BENCH / "baselines.json")
    for cell_id, cell in default_cells.items():
        entry = store.expected(cell_id, cell.fingerprint("cpu"))
        assert entry is not None, cell_id
        assert entry["ppl"]["wikitext2"] > 1


# -------------------------------------------------------------------- selection via pytest


def collect(pytester: pytest.Pytester, tmp_path: Path, *args: str) -> pytest.RunResult:
    """`pytest bench --collect-only -q ...` from the project root, in this process."""
    return pytester.runpytest_inprocess(
        str(BENCH), f"--rootdir={ROOT}", "-c", str(ROOT / "pytest.ini"), "-p", "no:cacheprovider",
        "--reports-dir", str(tmp_path / "reports"), "--collect-only", "-q", *args)


def collected_ids(result: pytest.RunResult) -> list[str]:
    return re.findall(r"^bench/test_cells\.py::test_cell\[(.+)\]$", result.stdout.str(), flags=re.M)


@pytest.mark.parametrize(("args", "expected"), [
    (("-k", "rtn and A"), ["smollm2-135m-rtn-A"]),
    (("-k", "A"), ["smollm2-135m-fp16-A", "smollm2-135m-rtn-A"]),
    (("-k", "a"), ["smollm2-135m-fp16-A", "smollm2-135m-rtn-A"]),  # whole names, any case
    (("-k", "not C"), [f"smollm2-135m-{m}-{t}" for t in "AB" for m in ("fp16", "rtn")]),
    (("-k", "rtn-B or fp16-C"), ["smollm2-135m-rtn-B", "smollm2-135m-fp16-C"]),  # substrings of the id
    (("-k", "int2"), ["smollm2-135m-kv-rtn-int2-C", "smollm2-135m-kivi-int2-C", "smollm2-135m-kv-hf-quanto-int2-C"]),
    (("-k", "kivi-int4"), ["smollm2-135m-kivi-int4-C"]),
    (("--tracks", "C", "--methods", "fp16", "kv-rtn"), [f"smollm2-135m-{m}-C" for m in ["fp16", *KV_CELLS[:3]]]),
    ((), DEFAULT_ORDER),
])
def test_pytest_selects_cells(pytester: pytest.Pytester, tmp_path: Path, args: tuple[str, ...],
                              expected: list[str]) -> None:
    result = collect(pytester, tmp_path, *args)
    assert result.ret == 0, result.stdout.str()
    assert collected_ids(result) == expected
    assert not (tmp_path / "reports").exists()  # collecting writes no records


def test_unknown_method_on_the_command_line_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = collect(pytester, tmp_path, "--methods", "foo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR == 4
    output = result.stdout.str() + result.stderr.str()
    assert "unknown methods ['foo']" in output
    assert "methods: apot awq fp16 gptq hqq kivi kv-hf kv-rtn pot rtn" in output  # the known names
    assert "Traceback" not in output
    assert collected_ids(result) == []


def test_bad_override_on_the_command_line_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = collect(pytester, tmp_path, "--override", "weight.bitz=3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    output = result.stdout.str() + result.stderr.str()
    assert "unknown key 'weight.bitz'" in output and "Traceback" not in output


def test_collect_only_from_the_command_line(tmp_path: Path) -> None:
    """The real command, in its own process."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-k", "rtn and A",
         "-p", "no:cacheprovider", "--reports-dir", str(tmp_path / "reports")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = re.findall(r"^bench/test_cells\.py::test_cell\[(.+)\]$", result.stdout, flags=re.M)
    assert ids == ["smollm2-135m-rtn-A"]
    assert "1/13 tests collected (12 deselected)" in result.stdout
