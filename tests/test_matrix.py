"""The cell matrix: method discovery, the cells a selection yields, and selecting cells
through pytest itself (`-k`, --methods/--tracks, usage errors)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ptq.registry
from ptq.config import TRACKS, Layer, parse_override, route_params
from ptq.errors import ConfigError
from ptq.gates import BaselineStore
from ptq.matrix import Catalog, Cell, Selection
from ptq.engine import BlockStep, Stage
from ptq.methods.awq import AwqParams
from ptq.methods.gptq import GptqParams
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
TRACK_C = BENCH / "experiments" / "track-c.yaml"
KV_CELLS = ["kv-rtn-int8", "kv-rtn-int4", "kv-rtn-int2", "kivi-int4", "kivi-int2", "kv-hf-quanto-int4",
            "kv-hf-quanto-int2", "kv-hf-hqq-int4"]
# the headline methods of each track (issue: a first run that shows every track's)
DEFAULT_ORDER = [f"smollm2-135m-{cell}" for cell in (
    "fp16-A", "rtn-A", "gptq-c4-A", "awq-c4-A", "fp16-B", "rtn-B", "smoothquant-c4-B", "fp16-C", "kv-rtn-int4-C",
    "kivi-int2-C")]
DEFAULT_IDS = set(DEFAULT_ORDER)
# the order pytest runs them in (conftest's longest_first): cells whose methods calibrate, then those
# with KV probes, then the others, FP baselines last in each
RUN_ORDER = [f"smollm2-135m-{cell}" for cell in (
    "gptq-c4-A", "awq-c4-A", "smoothquant-c4-B", "kv-rtn-int4-C", "kivi-int2-C", "fp16-C", "rtn-A", "rtn-B",
    "fp16-A", "fp16-B")]


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
    assert len(default_cells) == 10


def test_cell_ids_are_model_method_variant_track(default_cells: dict[str, Cell]) -> None:
    for cell_id, cell in default_cells.items():
        variant = f"-{cell.variant}" if cell.variant else ""
        calib = f"-{cell.config.calib.dataset}" if cell.calibrated else ""
        assert cell_id == f"{cell.model}-{cell.method}{variant}{calib}-{cell.track}"
        assert (cell.config.model.name, cell.config.method.name, cell.config.track.name) == (
            cell.model, cell.method, cell.track)
        extra = {cell.variant, f"{cell.method}-{cell.variant}"} if cell.variant else set()
        extra |= {cell.config.calib.dataset} if cell.calibrated else set()
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
    ("methods", "omniquant", "apot, autoround@auto-round, awq, awq@autoawq, awq@checkpoint, awq@llmcompressor, "
                             "fp16, gptq, gptq@auto-gptq, gptq@checkpoint, gptq@gptqmodel, gptq@llmcompressor, hqq, "
                             "hqq@hqq, kivi, kv-hf, kv-rtn, pot, quarot, rtn, rtn@quanto, rtn@torchao, smoothquant, "
                             "smoothquant+gptq@llmcompressor"),
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


def test_an_experiment_picks_variants_and_tracks_per_method(default_cells: dict[str, Cell], catalog: Catalog,
                                                           tmp_path: Path) -> None:
    assert {cell.id for cell in default_cells.values() if cell.variant} == {
        "smollm2-135m-kv-rtn-int4-C", "smollm2-135m-kivi-int2-C"}
    assert {cell.track for cell in default_cells.values() if cell.method == "gptq"} == {"A"}
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: {name: bad, methods: [kivi], variants: {kivi: [int3]}}\n")
    with pytest.raises(ConfigError, match=r"variants.kivi: unknown variants \['int3'\] \(known: int4, int2\)"):
        catalog.cells(Selection(experiments=(path,)), "cpu")
    path.write_text("experiment: {name: bad, methods: [awq], method_tracks: {awq: [B]}}\n")
    with pytest.raises(ConfigError, match=r"method_tracks.awq: awq runs on tracks \['A'\], not \['B'\]"):
        catalog.cells(Selection(experiments=(path,)), "cpu")


@pytest.fixture(scope="module")
def track_c_cells(catalog: Catalog) -> dict[str, Cell]:
    return {cell.id.removesuffix("-track-c"): cell for cell in catalog.cells(Selection(experiments=(TRACK_C,)), "cpu")}


def test_kv_variants_set_their_own_layout(track_c_cells: dict[str, Cell]) -> None:
    default_cells = track_c_cells
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
    assert len(cells) == 10 and all(cell.config.eval.max_windows == 2 for cell in cells)


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
                             "cpu")) == 7
    with pytest.raises(ConfigError, match="track C has no YAML"):
        catalog.cells(Selection(experiments=(bench / "experiments" / "default.yaml",)), "cpu")


def test_committed_baselines_match_the_default_cells(default_cells: dict[str, Cell],
                                                     track_c_cells: dict[str, Cell]) -> None:
    """bench/baselines.json holds an entry for every default cell under its current CPU fingerprint
    (a config change without regenerating baselines would fail every baseline gate)."""
    store = BaselineStore(BENCH / "baselines.json")
    for cell in [*default_cells.values(), *track_c_cells.values()]:
        cell_id = cell.id
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
    (("-k", "A and not c4"), ["smollm2-135m-rtn-A", "smollm2-135m-fp16-A"]),
    (("-k", "A"), [*RUN_ORDER[:2], RUN_ORDER[6], RUN_ORDER[8]]),
    (("-k", "a"), [*RUN_ORDER[:2], RUN_ORDER[6], RUN_ORDER[8]]),  # whole names, any case
    (("-k", "not C"), [*RUN_ORDER[:3], *RUN_ORDER[6:]]),
    (("-k", "rtn-B or fp16-C"), ["smollm2-135m-fp16-C", "smollm2-135m-rtn-B"]),  # substrings of the id
    (("-k", "c4"), ["smollm2-135m-gptq-c4-A", "smollm2-135m-awq-c4-A", "smollm2-135m-smoothquant-c4-B"]),
    (("--experiment", "track-c", "-k", "int2"), [f"smollm2-135m-{m}-int2-C-track-c" for m in ("kv-rtn", "kivi",
                                                                                              "kv-hf-quanto")]),
    (("--experiment", "track-c", "-k", "kivi-int4"), ["smollm2-135m-kivi-int4-C-track-c"]),
    (("--tracks", "C", "--methods", "fp16", "kv-rtn"),
     [f"smollm2-135m-{m}-C" for m in [*KV_CELLS[:3], "fp16"]]),
    (("--methods", "awq+gptq", "-k", "awq and gptq"), ["smollm2-135m-awq+gptq-c4-A"]),
    ((), RUN_ORDER),
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
    assert "methods: apot autoround@auto-round awq awq@autoawq" in output  # the known names
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
    assert "1/10 tests collected (9 deselected)" in result.stdout


# ---------------------------------------------------------------------------- pipelines


def pipeline_cells(catalog: Catalog, methods: tuple[str, ...], *overrides: str, tracks=("A",)) -> list[Cell]:
    return catalog.cells(Selection(models=("smollm2-135m",), methods=methods, tracks=tracks,
                                   overrides=tuple(parse_override(text) for text in overrides)), "cpu")


def test_a_pipeline_is_one_cell_with_its_stages_in_order(catalog: Catalog) -> None:
    (cell,) = pipeline_cells(catalog, ("awq+gptq",))
    assert cell.id == "smollm2-135m-awq+gptq-c4-A" and cell.method == cell.config.method.name == "awq+gptq"
    awq, gptq = cell.config.method.stages
    assert (awq.name, gptq.name) == ("awq", "gptq") and not awq.added and not gptq.added
    assert awq.params == AwqParams(search_samples=8)  # each stage's own YAML, its CPU profile included
    assert gptq.params == GptqParams()
    # cell settings merge the stages' YAMLs in order: the later stage's budget and propagation
    assert cell.config.gates.max_ppl_ratio == 1.48 and cell.config.calib.propagate == "quantized"
    assert cell.pipeline.tracks == {"A"} and cell.pipeline.rounding_stage == "gptq" and cell.calibrated
    assert {"awq", "gptq", "awq+gptq", "c4"} <= cell.keywords
    assert cell.config.method.description.startswith("AWQ") and " Then: GPTQ" in cell.config.method.description


def test_a_one_stage_pipeline_is_the_method(catalog: Catalog) -> None:
    (cell,) = pipeline_cells(catalog, ("gptq",))
    assert [stage.name for stage in cell.pipeline.stages] == ["gptq"] and cell.id == "smollm2-135m-gptq-c4-A"


@pytest.mark.parametrize(("methods", "message"), [
    ("nosuch+gptq", "unknown methods ['nosuch'] in pipeline 'nosuch+gptq'"),
    ("gptq+gptq", "pipeline 'gptq+gptq' names ['gptq'] twice"),
    ("kivi+gptq", "pipeline 'kivi+gptq': no track is supported by every stage (kivi: C; gptq: A B)"),
    ("gptq+awq", "pipeline 'gptq+awq': gptq rounds the weights, so no weight quantizer may follow it"),
    ("fp16+rtn", "pipeline 'fp16+rtn': the float baseline fp16 runs alone"),
    ("kivi+kv-rtn", "pipeline 'kivi+kv-rtn': at most one KV-cache method"),
])
def test_bad_pipelines_are_config_errors(catalog: Catalog, methods: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline_cells(catalog, (methods,), tracks=None)


def test_a_pipeline_on_a_track_one_stage_lacks_is_an_error_when_asked_for(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match=r"method awq\+gptq supports tracks \['A'\], none of the requested \['B'\]"):
        pipeline_cells(catalog, ("awq+gptq",), tracks=("B",))


def test_params_go_to_the_stage_that_has_them(catalog: Catalog) -> None:
    (cell,) = pipeline_cells(catalog, ("awq+gptq",), "method.params.percdamp=0.1", "method.params.n_grid=10",
                             "stages.gptq.params.blocksize=64")
    awq, gptq = cell.config.method.stages
    assert (awq.params.n_grid, gptq.params.percdamp, gptq.params.blocksize) == (10, 0.1, 64)
    # a stage's own block takes only its own params
    with pytest.raises(ConfigError, match=r"--override stages.awq.params.percdamp=0.1: unknown key "
                                          r"'stages.awq.params.percdamp' \(known keys here: clip, clip_tokens"):
        pipeline_cells(catalog, ("awq+gptq",), "stages.awq.params.percdamp=0.1")
    # settings of a stage the cell does not run are left out, not an error
    (rtn,) = pipeline_cells(catalog, ("rtn",), "stages.gptq.params.blocksize=64")
    assert [stage.name for stage in rtn.config.method.stages] == ["rtn"]


def test_a_param_two_stages_have_must_name_its_stage() -> None:
    @dataclasses.dataclass(frozen=True)
    class First:
        alpha: float = 0.5

    @dataclasses.dataclass(frozen=True)
    class Second:
        alpha: float = 0.5
        beta: int = 1

    layer = parse_override("method.params.beta=2")
    routed, keys = route_params(layer, {"first": First, "second": Second})
    assert routed.data == {"stages": {"second": {"params": {"beta": 2}}}} and keys == {"beta"}
    assert routed.provenance[("stages", "second", "params", "beta")] == "--override method.params.beta=2"
    with pytest.raises(ConfigError, match=r"method.params.alpha is a parameter of first and second: say which, "
                                          r"e.g. stages.second.params.alpha"):
        route_params(parse_override("method.params.alpha=0.1"), {"first": First, "second": Second})
    assert route_params(layer, {"first": First}) == (Layer({}, {}, layer.source), set())  # none: left out


@dataclasses.dataclass(frozen=True)
class ShiftParams:
    """A test transform: no knobs."""


class Shift(Stage):
    """A transform that changes weights without rounding them."""

    def on_block(self, step: BlockStep) -> None:
        for linear in step.linears().values():
            linear.weight.data.mul_(0.5)


@pytest.fixture
def with_a_transform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A bench/ copy with a registered transform method `shift` on tracks A, B and C."""
    info = MethodInfo("shift", Shift, ShiftParams, frozenset("ABC"), frozenset(), "transform", False, False)
    monkeypatch.setitem(ptq.registry._REGISTRY, "shift", info)
    bench = Path(shutil.copytree(BENCH, tmp_path / "bench"))
    (bench / "methods" / "shift.yaml").write_text("method: {name: shift}\ntracks: {A: {}, B: {}, C: {}}\n")
    return bench


def test_transforms_alone_get_round_to_nearest_when_the_track_quantizes_weights(with_a_transform: Path) -> None:
    catalog = Catalog(with_a_transform)
    cells = {cell.id: cell for cell in pipeline_cells(catalog, ("shift", "shift+gptq", "shift+kivi"),
                                                        tracks=("A", "C"))}
    shift = cells["smollm2-135m-shift-A"]
    assert [(s.name, s.added) for s in shift.config.method.stages] == [("shift", False), ("rtn", True)]
    assert shift.config.weight.bits == 4 and shift.pipeline.rounding_stage == "rtn"
    assert "rtn" not in shift.keywords  # it was not asked for
    assert [s.name for s in cells["smollm2-135m-shift+gptq-c4-A"].config.method.stages] == ["shift", "gptq"]
    # track C quantizes no weights: nothing is added
    assert [s.name for s in cells["smollm2-135m-shift-C"].config.method.stages] == ["shift"]
    assert cells["smollm2-135m-shift-C"].config.weight is None
    assert [s.name for s in cells["smollm2-135m-shift+kivi-int2-C"].config.method.stages] == ["shift", "kivi"]


def test_bad_pipeline_and_bad_params_are_usage_errors_on_the_command_line(pytester: pytest.Pytester,
                                                                        tmp_path: Path) -> None:
    for args, message in ((("--methods", "gptq+awq"), "gptq rounds the weights"),
                          (("--methods", "gptq", "--override", "method.params.percdamp=-1"),
                           "--override method.params.percdamp=-1: stages.gptq.params: percdamp must be > 0"),
                          (("--methods", "gptq", "--override", "method.params.blocksze=64"),
                           "method.params ['blocksze']: no selected method has such a parameter (gptq: blocksize,")):
        result = collect(pytester, tmp_path, *args)
        output = result.stdout.str() + result.stderr.str()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, output
        assert message in output and "Traceback" not in output
        assert collected_ids(result) == []


# ------------------------------------------------------------------------ experiment sweeps


def test_a_sweep_gives_each_method_cell_once_per_entry_and_the_baseline_once(catalog: Catalog) -> None:
    study = BENCH / "experiments" / "sq-gptq-study.yaml"
    cells = {cell.id: cell for cell in catalog.cells(Selection(experiments=(study,)), "cpu")}
    assert len(cells) == 1 + 4 * 3
    fp = cells["smollm2-135m-fp16-B-sq-gptq-study"]
    assert fp.setting is None and fp.config.act is None
    w4a8 = cells["smollm2-135m-smoothquant+gptq-c4-B-w4a8-sq-gptq-study"]
    assert w4a8.setting == "w4a8" and {"w4a8", "smoothquant", "gptq"} <= w4a8.keywords
    assert (w4a8.config.weight.bits, w4a8.config.weight.symmetric, w4a8.config.weight.granularity) == (
        4, False, "channel")
    assert (w4a8.config.act.bits, w4a8.config.act.symmetric, w4a8.config.act.granularity) == (8, False, "token")
    assert cells["smollm2-135m-gptq-c4-B-w4a16-sq-gptq-study"].config.act is None
    assert cells["smollm2-135m-rtn-B-w8a8-sq-gptq-study"].config.weight.bits == 8
    assert w4a8.config.eval.datasets == ("wikitext2", "c4")
    assert w4a8.config.zero_shot.tasks == fp.config.zero_shot.tasks == ("boolq", "piqa", "winogrande")


def test_a_sweep_entry_cannot_change_what_the_baseline_reads(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: {name: bad, methods: [fp16, rtn], tracks: [A]}\n"
                    "sweep:\n  short: {eval: {seqlen: 128}}\n")
    with pytest.raises(ConfigError, match=r"sweep.short sets \['eval'\]: a sweep varies what methods read"):
        catalog.cells(Selection(experiments=(path,)), "cpu")
    path.write_text("experiment: {name: ok, methods: [fp16, rtn, gptq], tracks: [A]}\n"
                    "sweep:\n  w3: {weight: {bits: 3}, per_method: {gptq: {gates: {max_ppl_ratio: 9}}}}\n"
                    "  w2: {weight: {bits: 2}}\n")
    cells = {cell.id: cell for cell in catalog.cells(Selection(experiments=(path,)), "cpu")}
    assert cells["smollm2-135m-gptq-c4-A-w3-ok"].config.gates.max_ppl_ratio == 9
    assert cells["smollm2-135m-gptq-c4-A-w2-ok"].config.gates.max_ppl_ratio == 1.48
    assert cells["smollm2-135m-rtn-A-w2-ok"].config.weight.bits == 2


def test_seeds_repeat_calibrated_cells_and_nothing_else(catalog: Catalog) -> None:
    cells = {cell.id: cell for cell in catalog.cells(Selection(experiments=(BENCH / "experiments" / "seeds.yaml",),
                                                                methods=("fp16", "rtn", "gptq")), "cpu")}
    assert set(cells) == {"smollm2-135m-fp16-A-seeds", "smollm2-135m-rtn-A-seeds",
                          *(f"smollm2-135m-gptq-c4-A-seed{s}-seeds" for s in (0, 1, 2))}
    assert [cells[f"smollm2-135m-gptq-c4-A-seed{s}-seeds"].config.calib.seed for s in (0, 1, 2)] == [0, 1, 2]
