"""The on-disk cache (ptq.cache) and its use by a cell (ptq.pipeline.run_cached): entries
round-trip, keys follow every input, damaged entries are rebuilt and never used, a warm cell
does not load the model and gives the cold cell's metrics; and the options end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
import torch

import ptq.cell
import ptq.data
import ptq.dependencies
from ptq.cache import MANIFEST, CacheStore, cache_dir, cache_key, code_version, tree_sha256
from ptq.config import CalibConfig, CellConfig, EvalConfig, KVEvalConfig, SourceConfig, StageConfig
from ptq.matrix import Catalog, Cell, Selection
from ptq.models.adapters import adapter_for
from ptq.models.loading import ResolvedSource, sha256_file
from ptq.cell import CellOutcome, LoadedModel, run_cached, stage_modules
from ptq.pipeline import quantize
from ptq.dependencies import QUANTIZE_CODE, dependencies, model_identity
from ptq.methods.gptq import GptqParams
from tests.tiny import write_tiny_llama, write_wikitext
from tests.test_bench_end_to_end import leaderboard, run_bench, workspace  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CPU = torch.device("cpu")


def write_payload(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "payload.txt").write_text(text)


# ------------------------------------------------------------------------------ the store


def test_an_entry_round_trips_with_its_manifest(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    key = cache_key({"x": 1})
    assert store.lookup("metrics", key).status == "miss"
    store.store("metrics", key, {"x": 1}, write_payload("hello"))
    found = store.lookup("metrics", key)
    assert found.status == "hit" and found.path == tmp_path / "metrics" / key and found.problem is None
    assert (found.path / "payload.txt").read_text() == "hello"
    manifest = json.loads((found.path / MANIFEST).read_text())
    assert manifest == {"format_version": 1, "kind": "metrics", "key": key, "inputs": {"x": 1},
                        "files": {"payload.txt": sha256_file(found.path / "payload.txt")}}
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == [key]  # no temporary folder left


def test_sealing_an_entry_another_process_sealed_keeps_theirs(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    store.store("metrics", "a" * 64, {}, write_payload("first"))
    store.store("metrics", "a" * 64, {}, write_payload("second"))
    found = store.lookup("metrics", "a" * 64)
    assert found.status == "hit" and (found.path / "payload.txt").read_text() == "first"
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["a" * 64]


def test_a_failing_writer_leaves_no_entry_and_says_why(tmp_path: Path) -> None:
    def fail(folder: Path) -> None:
        (folder / "payload.txt").write_text("half")
        raise OSError("disk full")

    store = CacheStore(tmp_path)
    # the caller keeps its result and records the problem (see ptq.cell)
    problem = store.store("metrics", "a" * 64, {}, fail)
    assert problem == f"metrics entry {'a' * 12} not stored (OSError: disk full)"
    assert store.lookup("metrics", "a" * 64).status == "miss"
    assert list((tmp_path / "metrics").iterdir()) == []


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda entry: flip_a_byte(entry / "payload.txt"), "has a corrupt payload.txt (sha256 differs from the manifest)"),
    (lambda entry: (entry / MANIFEST).unlink(), "has no manifest (partial)"),
    (lambda entry: (entry / "payload.txt").unlink(), "has files [] where the manifest lists ['payload.txt']"),
    (lambda entry: (entry / MANIFEST).write_text("{\"format_"), "has an unreadable manifest (JSONDecodeError)"),
    (lambda entry: (entry / MANIFEST).write_text(
        (entry / MANIFEST).read_text().replace('"format_version": 1', '"format_version": 0')),
     "has a manifest of another format version or key (expected format 1)"),
], ids=["corrupt-payload", "no-manifest", "missing-payload", "unreadable-manifest", "other-format"])
def test_a_damaged_entry_is_removed_and_rebuilt_never_used(tmp_path: Path, damage: Callable[[Path], None],
                                                           problem: str) -> None:
    store = CacheStore(tmp_path)
    key = cache_key({"x": 1})
    store.store("metrics", key, {"x": 1}, write_payload("hello"))
    damage(tmp_path / "metrics" / key)
    found = store.lookup("metrics", key)
    assert found.status == "rebuilt" and found.path is None
    assert found.problem == f"metrics entry {key[:12]} {problem}; removed and rebuilt"
    assert not (tmp_path / "metrics" / key).exists()
    store.store("metrics", key, {"x": 1}, write_payload("hello"))
    assert store.lookup("metrics", key).status == "hit"


def test_a_disabled_store_is_off_and_writes_nothing(tmp_path: Path) -> None:
    store = CacheStore(None)
    store.store("metrics", "a" * 64, {}, write_payload("hello"))
    assert store.lookup("metrics", "a" * 64).status == "off"
    assert list(tmp_path.iterdir()) == []


def test_clear_empties_the_store(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache")
    store.store("metrics", "a" * 64, {}, write_payload("hello"))
    store.store("weights", "b" * 64, {}, write_payload("hello"))
    (tmp_path / "cache" / "weights" / ".tmp-bbbbbbbbbbbb-12345678").mkdir()  # a build a killed run left
    with store.exclusive("references", "c" * 64):  # leaves its lock file
        pass
    store.clear()
    assert not (tmp_path / "cache").exists()
    assert store.lookup("metrics", "a" * 64).status == "miss"


def test_one_process_builds_a_shared_entry_while_the_others_wait_then_read_it(tmp_path: Path) -> None:
    """`exclusive` is the kernel's flock on a file beside the entry; two open descriptions of it
    exclude each other as two processes' would, so two threads stand in for two workers here."""
    store, key = CacheStore(tmp_path), "d" * 64
    statuses: list[str] = []
    building = threading.Event()

    def worker() -> None:
        with store.exclusive("metrics", key):
            found = store.lookup("metrics", key)
            statuses.append(found.status)
            if found.status == "miss":
                building.set()
                time.sleep(0.2)  # the second worker reaches the lock meanwhile
                store.store("metrics", key, {}, write_payload("built once"))

    first = threading.Thread(target=worker)
    first.start()
    assert building.wait(10)
    second = threading.Thread(target=worker)
    second.start()
    first.join(10)
    second.join(10)
    assert statuses == ["miss", "hit"]
    with CacheStore(None).exclusive("metrics", key):  # a disabled store has nothing to lock
        pass


def test_cache_dir_is_the_option_else_the_environment_else_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", "/env/cache")
    assert cache_dir("/given") == Path("/given")
    assert cache_dir(None) == Path("/env/cache")
    monkeypatch.delenv("PTQ_CACHE_DIR")
    assert cache_dir(None) == Path.home() / ".cache" / "ptq-bench"


# ------------------------------------------------------------------------------- the keys


def test_cache_key_is_canonical() -> None:
    assert cache_key({"a": 1, "b": {"c": [1, 2]}}) == cache_key({"b": {"c": [1, 2]}, "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_code_version_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cache_probe_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_version(("cache_probe_mod", "ptq.quant"))
    assert code_version(("ptq.quant", "cache_probe_mod")) == before  # order does not matter
    (tmp_path / "cache_probe_mod.py").write_text("X = 2\n")
    assert code_version(("cache_probe_mod", "ptq.quant")) != before
    assert code_version(("ptq.quant",)) != code_version(("ptq.calib",))


def test_tree_sha256_follows_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("2")
    before = tree_sha256(tmp_path)
    (tmp_path / "sub" / "b").write_text("3")
    assert tree_sha256(tmp_path) != before
    (tmp_path / "sub" / "b").write_text("2")
    assert tree_sha256(tmp_path) == before
    (tmp_path / "sub" / "b").rename(tmp_path / "sub" / "c")
    assert tree_sha256(tmp_path) != before


@pytest.fixture(scope="module")
def cells() -> dict[str, Cell]:
    catalog = Catalog(BENCH)
    experiments = tuple(BENCH / "experiments" / f"{name}.yaml" for name in ("default", "track-a", "track-c"))
    return {cell.id: cell for cell in catalog.cells(Selection(experiments=experiments), "cpu")}


@pytest.fixture
def fake_texts(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], str]:
    """Texts by (dataset, split), as their sha256: the keys read nothing else of them."""
    shas = {("wikitext2", "test"): "t" * 64, ("c4", "calibration"): "c" * 64, ("wikitext2", "validation"): "v" * 64,
            ("c4", "test"): "e" * 64}
    monkeypatch.setattr(ptq.dependencies, "load_text",
                        lambda dataset, split: SimpleNamespace(sha256=shas[dataset, split]))
    return shas


def keys(cell: Cell, device_type: str = "cpu") -> tuple[str, str]:
    deps = dependencies(cell.config, stage_modules(cell.pipeline), device_type)
    return deps.weights_key, deps.metrics_key


def baseline_keys(cell: Cell) -> tuple[str, str]:
    deps = dependencies(cell.baseline_config, ("ptq.methods.fp16",), "cpu")
    return deps.weights_key, deps.metrics_key


def with_changes(cell: Cell, **sections: dict[str, Any]) -> Cell:
    config = cell.config
    for section, changes in sections.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})
    return dataclasses.replace(cell, config=config)


def test_keys_follow_every_setting_and_eval_only_the_metrics(cells: dict[str, Cell], fake_texts: dict) -> None:
    rtn = cells["smollm2-135m-rtn-A"]
    weights, metrics = keys(rtn)
    assert keys(with_changes(rtn, weight={"bits": 3}))[0] != weights
    assert keys(with_changes(rtn, model={"dtype": "bfloat16"}))[0] != weights
    assert keys(rtn, "cuda")[0] != weights
    gptq = cells["smollm2-135m-gptq-c4-A-track-a"]
    damped = with_changes(gptq, method={"stages": (StageConfig("gptq", GptqParams(percdamp=0.1)),)})
    assert keys(damped)[0] != keys(gptq)[0]
    evaluated_longer = keys(with_changes(rtn, eval={"max_windows": 64}))
    assert evaluated_longer[0] == weights and evaluated_longer[1] != metrics  # the weights are reused
    # what does not determine a result does not enter its key
    assert keys(with_changes(rtn, gates={"max_ppl_ratio": 9.0})) == (weights, metrics)
    assert rtn.config.calib is None  # rtn reads no calibration data: none of it is in its keys
    assert keys(with_changes(rtn, method={"description": "other prose"})) == (weights, metrics)


def test_the_fp_baseline_has_one_key_whichever_cell_it_serves(cells: dict[str, Cell], fake_texts: dict) -> None:
    served = {baseline_keys(cell)[1] for cell in cells.values()}
    # one for the cells without KV probes, one for track C's (the probes are part of its metrics)
    assert served == {keys(cells["smollm2-135m-fp16-A"])[1], keys(cells["smollm2-135m-fp16-C"])[1]}
    fp16 = {track: keys(cells[f"smollm2-135m-fp16-{track}"]) for track in "ABC"}
    assert fp16["A"] == fp16["B"] != fp16["C"]
    assert len({keys(cells[f"smollm2-135m-rtn-{track}"]) for track in "AB"}) == 2
    assert len({keys(cells[f"smollm2-135m-kv-rtn-{variant}-C-track-c"]) for variant in ("int8", "int4", "int2")}) == 3


def test_cells_that_differ_only_in_activations_share_their_weights(fake_texts: dict) -> None:
    catalog = Catalog(BENCH)
    study = BENCH / "experiments" / "sq-gptq-study.yaml"
    cells = {cell.id: cell for cell in catalog.cells(Selection(experiments=(study,)), "cpu")}
    shared = {}
    for setting in ("w4a16", "w4a8", "w8a8"):
        cell = cells[f"smollm2-135m-gptq-c4-B-{setting}-sq-gptq-study"]
        shared[setting] = keys(cell)
    assert shared["w4a16"][0] == shared["w4a8"][0] != shared["w8a8"][0]
    assert shared["w4a16"][1] != shared["w4a8"][1]


def test_calibrated_keys_follow_the_calibration_settings_and_text(cells: dict[str, Cell], fake_texts: dict) -> None:
    gptq = cells["smollm2-135m-gptq-c4-A-track-a"]
    weights, _ = keys(gptq)
    assert keys(with_changes(gptq, calib={"n_samples": 8}))[0] != weights
    assert keys(with_changes(gptq, calib={"seed": 1}))[0] != weights
    fake_texts["c4", "calibration"] = "d" * 64
    assert keys(gptq)[0] != weights


def test_keys_follow_data_packages_code_and_model(cells: dict[str, Cell], fake_texts: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rtn = cells["smollm2-135m-rtn-A"]
    weights, metrics = keys(rtn)
    fake_texts["wikitext2", "test"] = "u" * 64
    other_text = keys(rtn)
    assert other_text[0] == weights and other_text[1] != metrics  # the evaluation text: metrics only

    inputs = dependencies(rtn.config, stage_modules(rtn.pipeline), "cpu").weights
    assert inputs["code"] == code_version(("ptq.methods.rtn", *QUANTIZE_CODE))
    assert inputs["packages"].keys() == {"torch", "transformers", "tokenizers", "gguf", "safetensors", "hqq",
                                         "optimum-quanto", "lm_eval"}
    with monkeypatch.context() as patch:
        patch.setattr(ptq.dependencies, "package_versions", lambda names: {name: "0.0" for name in names})
        assert keys(rtn)[0] != weights
    with monkeypatch.context() as patch:
        patch.setattr(ptq.dependencies, "code_version", lambda modules: "edited")
        assert keys(rtn)[0] != weights

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    local = dataclasses.replace(rtn, config=dataclasses.replace(
        rtn.config, model=dataclasses.replace(rtn.config.model, source=SourceConfig("local", path=str(folder)))))
    before = keys(local)[0]
    (folder / "model.safetensors").write_bytes(b"other weights")
    model_identity.cache_clear()  # hashed once per process
    assert keys(local)[0] != before


# ------------------------------------------------------------------- a cell, cold and warm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny random Llama saved to disk, its tokenizer, and a data dir with a WikiText-2 stand-in."""
    base = tmp_path_factory.mktemp("tiny")
    lines = write_wikitext(base / "data", words=200, lines=300)
    model, tokenizer = write_tiny_llama(base / "model", lines, vocab_size=300, heads=4, kv_heads=2)
    return SimpleNamespace(base=base, model=model, tokenizer=tokenizer)


@pytest.fixture
def tiny_run(tiny: SimpleNamespace, cells: dict[str, Cell], monkeypatch: pytest.MonkeyPatch,
             tmp_path: Path) -> Iterator[SimpleNamespace]:
    """run(cell_id, store) -> (outcome, model loads) for a default cell moved onto the tiny model."""
    monkeypatch.setenv(ptq.data.DATA_DIR_ENV, str(tiny.base / "data"))
    ptq.data.load_text.cache_clear()
    source = ResolvedSource("local", str(tiny.base / "model"), None, None, None)
    loaded = LoadedModel(tiny.model, tiny.tokenizer, adapter_for(tiny.model, "llama"), source, CPU)

    def config_of(cell_id: str) -> CellConfig:
        config = cells[cell_id].config
        model = dataclasses.replace(config.model, source=SourceConfig("local", path=str(tiny.base / "model")),
                                    head_dim=None)
        probes = config.kv_eval and KVEvalConfig(prefill_chunk=16, passkey_lengths=(160,), passkey_trials=1,
                                                 decode_prompt=32, decode_tokens=2)
        return dataclasses.replace(config, model=model, eval=EvalConfig(seqlen=64, max_windows=4, batch_size=2),
                                   kv_eval=probes)

    def run(cell_id: str, store: CacheStore, **changes: Any) -> tuple[CellOutcome, int]:
        loads = []
        config = dataclasses.replace(config_of(cell_id), **changes)
        outcome = run_cached(config, cells[cell_id].pipeline, CPU, lambda: loads.append(1) or loaded, store)
        return outcome, len(loads)

    yield SimpleNamespace(run=run, store=CacheStore(tmp_path / "cache"), root=tmp_path / "cache")
    ptq.data.load_text.cache_clear()


def test_a_warm_cell_does_not_load_the_model_and_gives_the_cold_metrics(tiny_run: SimpleNamespace) -> None:
    cold, cold_loads = tiny_run.run("smollm2-135m-rtn-A", tiny_run.store)
    assert cold.cache == {"metrics": "miss", "weights": "miss"} and cold_loads == 1
    warm, warm_loads = tiny_run.run("smollm2-135m-rtn-A", tiny_run.store)
    assert warm.cache == {"metrics": "hit", "weights": "skipped"} and warm_loads == 0
    assert warm.stored() == json.loads(json.dumps(cold.stored()))  # quant_seconds included: as measured cold


def test_cached_weights_give_the_same_perplexity(tiny_run: SimpleNamespace) -> None:
    cold, _ = tiny_run.run("smollm2-135m-rtn-A", tiny_run.store)
    shutil.rmtree(tiny_run.root / "metrics")
    again, loads = tiny_run.run("smollm2-135m-rtn-A", tiny_run.store)
    assert again.cache == {"metrics": "miss", "weights": "hit"} and loads == 1
    assert again.metrics["ppl"] == cold.metrics["ppl"]
    assert again.metrics["quant_seconds"] == cold.metrics["quant_seconds"]
    assert again.notes == cold.notes + [
        "quantized weights from the cache: quant_seconds as measured when they were built; peak memory covers "
        "loading them and the evaluation, not the quantization"]


def test_corrupt_cached_weights_are_rebuilt_not_used(tiny_run: SimpleNamespace) -> None:
    cold, _ = tiny_run.run("smollm2-135m-rtn-A", tiny_run.store)
    shutil.rmtree(tiny_run.root / "metrics")
    (entry,) = (tiny_run.root / "weights").iterdir()
    flip_a_byte(entry / "weights.safetensors")
    again, _ = tiny_run.run("smollm2-135m-rtn-A", tiny_run.store)
    assert again.cache == {"metrics": "miss", "weights": "rebuilt"}
    assert again.cache_problems == [f"weights entry {entry.name[:12]} has a corrupt weights.safetensors "
                                    "(sha256 differs from the manifest); removed and rebuilt"]
    assert again.metrics["ppl"] == cold.metrics["ppl"]
    assert tiny_run.store.lookup("weights", entry.name).status == "hit"


def test_only_pure_weight_replacements_store_weights(tiny_run: SimpleNamespace) -> None:
    """Track B's weights are stored (its quantized activations are re-applied from the config);
    a quantized KV cache and the float baseline have no weights to store."""
    for cell_id, weights in (("smollm2-135m-rtn-B", "miss"), ("smollm2-135m-kv-rtn-int8-C-track-c", "none"),
                             ("smollm2-135m-fp16-A", "none")):
        outcome, _ = tiny_run.run(cell_id, tiny_run.store)
        assert outcome.cache == {"metrics": "miss", "weights": weights}, cell_id
    assert len(list((tiny_run.root / "weights").iterdir())) == 1
    assert len(list((tiny_run.root / "metrics").iterdir())) == 3


def test_cells_sharing_weights_on_two_workers_quantize_once(tiny_run: SimpleNamespace, cells: dict[str, Cell],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One pipeline at W8A8 and at W8A16 (same weights) on two workers at once: the second waits
    for the first's weights entry and loads it. Threads stand in for the workers (see ptq.cache)."""
    quantizing = threading.Event()

    def slow_quantize(*args: Any, **kwargs: Any) -> Any:  # the second worker arrives meanwhile
        quantizing.set()
        time.sleep(0.5)
        return quantize(*args, **kwargs)

    monkeypatch.setattr(ptq.cell, "quantize", slow_quantize)
    outcomes: dict[str, CellOutcome] = {}
    acts = {"w8a8": cells["smollm2-135m-rtn-B"].config.act, "w8a16": None}

    def worker(setting: str) -> None:
        outcomes[setting] = tiny_run.run("smollm2-135m-rtn-B", tiny_run.store, act=acts[setting])[0]

    first = threading.Thread(target=worker, args=("w8a8",))
    first.start()
    assert quantizing.wait(30)
    second = threading.Thread(target=worker, args=("w8a16",))
    second.start()
    first.join(60)
    second.join(60)
    assert {s: o.cache["weights"] for s, o in outcomes.items()} == {"w8a8": "miss", "w8a16": "hit"}
    assert outcomes["w8a16"].data["quantized"]["inputs"] == [] != outcomes["w8a8"].data["quantized"]["inputs"]


def test_static_ranges_of_a_method_without_calibration_are_observed_on_the_calibration_set(
        tiny_run: SimpleNamespace, tiny: SimpleNamespace, cells: dict[str, Cell]) -> None:
    """rtn reads no calibration data; with a static act spec its cell reads the calibration set
    for the activation ranges alone (w8a8-act-modes' tensor-static rows)."""
    valid = tiny.base / "data" / "wikitext2" / "wiki.valid.raw"
    valid.write_text((tiny.base / "data" / "wikitext2" / "wiki.test.raw").read_text())
    static = dataclasses.replace(cells["smollm2-135m-rtn-B"].config.act, granularity="tensor", dynamic=False)
    calib = CalibConfig(dataset="wikitext2", n_samples=4, seqlen=32, batch_size=2)
    try:
        outcome, _ = tiny_run.run("smollm2-135m-rtn-B", tiny_run.store, act=static, calib=calib)
    finally:
        valid.unlink()
    assert outcome.data["calibration"]["dataset"] == "wikitext2"
    assert {group["spec"]["dynamic"] for group in outcome.data["quantized"]["inputs"]} == {False}


def test_cached_weights_of_track_b_get_their_activations_quantized_again(tiny_run: SimpleNamespace) -> None:
    cold, _ = tiny_run.run("smollm2-135m-rtn-B", tiny_run.store)
    shutil.rmtree(tiny_run.root / "metrics")
    again, _ = tiny_run.run("smollm2-135m-rtn-B", tiny_run.store)
    assert again.cache == {"metrics": "miss", "weights": "hit"}
    assert again.metrics["ppl"] == cold.metrics["ppl"]
    assert again.data["quantized"]["inputs"] == cold.data["quantized"]["inputs"] != []


def test_editing_a_stage_changes_the_keys_of_every_pipeline_that_runs_it(cells: dict[str, Cell], fake_texts: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = Catalog(BENCH)
    pipelines = {name: catalog.cells(Selection(models=("smollm2-135m",), methods=(name,), tracks=("A",)), "cpu")[0]
                 for name in ("gptq", "awq+gptq", "awq")}
    before = {name: keys(cell) for name, cell in pipelines.items()}
    real = ptq.dependencies.code_version
    monkeypatch.setattr(ptq.dependencies, "code_version",  # as if ptq/methods/gptq.py had been edited
                        lambda modules: real(modules) + ("edited" if "ptq.methods.gptq" in modules else ""))
    after = {name: keys(cell) for name, cell in pipelines.items()}
    assert after["gptq"][0] != before["gptq"][0] and after["awq+gptq"][0] != before["awq+gptq"][0]
    assert after["awq"] == before["awq"]


def test_without_a_store_every_stage_is_off(tiny_run: SimpleNamespace) -> None:
    for _ in range(2):
        outcome, loads = tiny_run.run("smollm2-135m-rtn-A", CacheStore(None))
        assert outcome.cache == {"metrics": "off", "weights": "off"} and loads == 1
    assert not tiny_run.root.exists()


# ----------------------------------------------------------------------------- end to end


def records(base: Path, run_id: str) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in (base / "reports" / "runs" / run_id).glob("*.json")}


def test_a_second_run_hits_the_cache_and_gives_identical_metrics(workspace: Path) -> None:  # noqa: F811
    args = ("--models", "tiny-llama")
    cold = run_bench(workspace, *args, "--update-baselines", "--run-id", "cold")
    assert cold.returncode == 0, cold.stdout[-3000:]
    cold_rows = leaderboard(workspace)
    warm = run_bench(workspace, *args, "--run-id", "warm")
    assert warm.returncode == 0, warm.stdout[-3000:]
    warm_rows = leaderboard(workspace)
    cold_records, warm_records = records(workspace, "cold"), records(workspace, "warm")
    assert {c: r["cache"] for c, r in cold_records.items()} == {
        **{f"tiny-llama-fp16-{t}-tiny": {"metrics": "miss", "weights": "none", "fp_baseline": "miss"} for t in "ABC"},
        "tiny-llama-rtn-A-tiny": {"metrics": "miss", "weights": "miss", "fp_baseline": "miss"},
        "tiny-llama-rtn-B-tiny": {"metrics": "miss", "weights": "miss", "fp_baseline": "miss"},
        **{f"tiny-llama-kv-rtn-{v}-C-tiny": {"metrics": "miss", "weights": "none", "fp_baseline": "miss"}
           for v in ("int8", "int4", "int2")}}
    assert all(r["cache"] == {"metrics": "hit", "weights": "skipped", "fp_baseline": "hit"}
               for r in warm_records.values())
    for cell, record in warm_records.items():
        assert record["metrics"] == cold_records[cell]["metrics"], cell
    assert warm_rows == cold_rows  # timing and memory too: as measured on the cold run

    off = run_bench(workspace, *args, "--methods", "rtn", "--tracks", "A", "--no-cache", "--run-id", "off")
    assert off.returncode == 0, off.stdout[-3000:]
    assert records(workspace, "off")["tiny-llama-rtn-A-tiny"]["cache"] == {
        "metrics": "off", "weights": "off", "fp_baseline": "off"}


def test_a_cache_only_cell_works_on_the_loaded_model_and_its_check_sees_any_change(
        tiny: SimpleNamespace) -> None:
    """Cache stages change no tensor, so their cell copies nothing; a tensor written in place or
    replaced is still found."""
    from ptq.cell import CellCopy

    adapter = adapter_for(tiny.model, "llama")
    for change in ("write", "replace"):
        work = CellCopy.of(tiny.model, adapter, copy_blocks=False)
        assert work.model is tiny.model
        work.check()
        up = work.model.model.layers[0].mlp.up_proj
        original = up.weight
        with torch.no_grad():
            if change == "write":
                up.weight.add_(0)
            else:
                up.weight = torch.nn.Parameter(up.weight.clone())
        with pytest.raises(RuntimeError, match=r"\['model.layers.0.mlp.up_proj.weight'\]"):
            work.check()
        up.weight = original


def test_a_cell_copies_the_blocks_and_shares_the_rest(tiny: SimpleNamespace) -> None:
    from ptq.cell import CellCopy

    adapter = adapter_for(tiny.model, "llama")
    work = CellCopy.of(tiny.model, adapter)
    assert work.model.model.embed_tokens.weight is tiny.model.model.embed_tokens.weight
    assert work.model.lm_head.weight is tiny.model.lm_head.weight
    original, copied = tiny.model.model.layers[0].mlp.up_proj.weight, work.model.model.layers[0].mlp.up_proj.weight
    assert copied is not original and torch.equal(copied, original)
    with torch.no_grad():
        copied.mul_(2)  # the copy's own block: fine
        work.check()
        work.model.model.norm.weight = torch.nn.Parameter(work.model.model.norm.weight * 2)  # replaced: fine
        work.check()
        assert not torch.equal(work.model.model.norm.weight, tiny.model.model.norm.weight)
        shared = work.model.model.embed_tokens.weight
        shared.add_(0)  # written in place: the loaded model's tensor
    with pytest.raises(RuntimeError, match=r"wrote in place into tensors shared with the loaded model: "
                                           r"\['model.embed_tokens.weight'\]"):
        work.check()
