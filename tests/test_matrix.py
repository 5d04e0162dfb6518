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
from ptq.quant import QuantSpec
from ptq.registry import MethodInfo, discover

# pytester runs pytest in this process: import every method module now, so no inner run
# imports (and, on leaving, un-imports) one, which would register it twice on the next run.
discover()

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT = BENCH / "experiments" / "default.yaml"
DEFAULT_IDS = {f"smollm2-135m-{m}-{t}" for m in ("fp16", "rtn") for t in "ABC"}


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
    assert fp16.tracks == rtn.tracks == frozenset(TRACKS)
    assert fp16.baseline and not rtn.baseline
    assert fp16.uses == frozenset()
    assert rtn.uses == frozenset({"weight", "act", "kv"})
    assert all(info.name == name for name, info in registry.items())
    assert discover() == registry  # idempotent: modules are imported once


def test_every_registered_method_has_a_yaml() -> None:
    stems = {path.stem for path in (BENCH / "methods").glob("*.yaml")}
    assert set(discover()) <= stems


def test_registering_a_name_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ptq.registry, "_REGISTRY", dict(ptq.registry._REGISTRY))
    with pytest.raises(ValueError, match="registered twice"):
        ptq.registry.register_method("rtn", tracks=("A",), uses=())(lambda *a: None)


# -------------------------------------------------------------------------------- cells


def test_default_experiment_gives_the_six_default_cells(default_cells: dict[str, Cell]) -> None:
    assert set(default_cells) == DEFAULT_IDS
    assert len(default_cells) == 6


def test_cell_ids_are_model_method_track(default_cells: dict[str, Cell]) -> None:
    for cell_id, cell in default_cells.items():
        assert cell_id == f"{cell.model}-{cell.method}-{cell.track}"
        assert (cell.config.model.name, cell.config.method.name, cell.config.track.name) == (
            cell.model, cell.method, cell.track)
        assert cell.keywords == {cell.model, cell.method, cell.track, cell_id, "small", "default"}


def test_cells_are_ordered_by_model_track_method(catalog: Catalog) -> None:
    cells = catalog.cells(Selection(experiments=(DEFAULT,)), "cpu")
    assert [cell.id for cell in cells] == [
        f"smollm2-135m-{m}-{t}" for t in "ABC" for m in ("fp16", "rtn")]
    everything = catalog.cells(Selection(), "cpu")
    pairs = sum(len(info.tracks) for info in catalog.registry.values())
    assert len(everything) == len(catalog.models) * pairs
    keys = [(c.model, c.track, c.method) for c in everything]
    assert keys == sorted(keys)


def test_command_line_choices_replace_the_experiments(catalog: Catalog) -> None:
    cells = catalog.cells(Selection(models=("opt-125m",), methods=("rtn", "rtn"), tracks=("C", "A"),
                                    experiments=(DEFAULT,)), "cpu")
    assert [cell.id for cell in cells] == ["opt-125m-rtn-C", "opt-125m-rtn-A"]  # in the order asked, deduplicated


@pytest.mark.parametrize(("field", "name", "known"), [
    ("models", "gpt-5", "smollm2-135m"),
    ("methods", "omniquant", "apot, awq, fp16, gptq, hqq, pot, rtn"),
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


def test_rtn_track_c_is_int8_kv(default_cells: dict[str, Cell]) -> None:
    config = default_cells["smollm2-135m-rtn-C"].config
    assert config.weight is None and config.act is None
    for spec in (config.kv.key, config.kv.value):
        assert (spec.bits, spec.symmetric, spec.granularity) == (8, False, "token")


def test_fp16_cells_of_one_model_differ_only_by_track(default_cells: dict[str, Cell]) -> None:
    configs = [default_cells[f"smollm2-135m-fp16-{t}"].config.to_dict() for t in "ABC"]
    for config in configs:
        config.pop("track")
    assert configs[0] == configs[1] == configs[2]


def test_overrides_reach_every_cell(catalog: Catalog) -> None:
    cells = catalog.cells(Selection(experiments=(DEFAULT,), overrides=(parse_override("eval.max_windows=2"),)), "cpu")
    assert len(cells) == 6 and all(cell.config.eval.max_windows == 2 for cell in cells)


@pytest.fixture
def track_a_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A bench/ copy with an extra method that supports track A only."""
    info = MethodInfo("wonly", frozenset({"A"}), frozenset({"weight"}), lambda *a: None, False, False)
    monkeypatch.setitem(ptq.registry._REGISTRY, "wonly", info)
    bench = Path(shutil.copytree(BENCH, tmp_path / "bench"))
    (bench / "methods" / "wonly.yaml").write_text("method: {name: wonly}\ntracks:\n  A: {}\n")
    return bench


def test_method_without_any_requested_track_is_an_error(track_a_only: Path) -> None:
    catalog = Catalog(track_a_only)
    with pytest.raises(ConfigError, match=r"method wonly supports tracks \['A'\], none of the requested \['B', 'C'\]"):
        catalog.cells(Selection(methods=("wonly", "rtn"), tracks=("B", "C"), experiments=(DEFAULT,)), "cpu")
    # without explicit tracks, the method simply has fewer cells
    ids = [cell.id for cell in catalog.cells(Selection(methods=("wonly", "rtn"), experiments=(DEFAULT,)), "cpu")]
    assert ids == ["smollm2-135m-wonly-A", "smollm2-135m-rtn-A", "smollm2-135m-rtn-B", "smollm2-135m-rtn-C"]
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
        entry = store.expected(cell_id, cell.config.fingerprint("cpu"))
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
    (("-k", "not rtn"), ["smollm2-135m-fp16-A", "smollm2-135m-fp16-B", "smollm2-135m-fp16-C"]),
    (("-k", "rtn-B or fp16-C"), ["smollm2-135m-rtn-B", "smollm2-135m-fp16-C"]),  # substrings of the id
    (("--tracks", "C", "--methods", "fp16", "rtn"), ["smollm2-135m-fp16-C", "smollm2-135m-rtn-C"]),
    ((), [f"smollm2-135m-{m}-{t}" for t in "ABC" for m in ("fp16", "rtn")]),
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
    assert "methods: apot awq fp16 gptq hqq pot rtn" in output  # the known names
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
    assert "1/6 tests collected (5 deselected)" in result.stdout
