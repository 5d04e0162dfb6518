"""A benchmark session as the pytest plugin drives it, without pytest: the cells a command line
asks for (checked before any model loads), models loaded once, each model's FP baseline measured
once, and a cell run into its record with its gates."""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ptq import progress
from ptq.cache import CacheStore, cache_key
from ptq.calib import CALIB_SPLITS
from ptq.cell import CellOutcome, LoadedModel, SharedTensorsWritten, run_cached
from ptq.config import ModelConfig, parse_override
from ptq.data import load_text
from ptq.dependencies import EVAL_SPLIT, fingerprint, references_inputs
from ptq.errors import BaselineFailed, ConfigError, NonFiniteMetric, PtqError, UnsupportedModel
from ptq.eval.kld import TopKLogprobs
from ptq.eval.lm_tasks import check_task_files, check_task_names
from ptq.eval.suite import float_references, scored_results
from ptq.gates import BaselineStore, GateResult, cell_gates
from ptq.kv import head_dim_of
from ptq.matrix import Catalog, Cell, Selection, shard
from ptq.models.adapters import adapter_for
from ptq.models.loading import load_model
from ptq.models.placement import on_device
from ptq.registry import Pipeline
from ptq.report.records import CellRecord
from ptq.stats import paired_bootstrap_ratio


@dataclass(frozen=True)
class Request:
    """A command line's choice of cells (see conftest.py's options)."""

    models: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    tracks: tuple[str, ...] | None = None
    experiments: tuple[str, ...] = ()  # names in bench/experiments/ or YAML paths
    overrides: tuple[str, ...] = ()  # key.path=value
    shard: str | None = None  # I/N


def _experiment_path(value: str, catalog: Catalog) -> Path:
    if value in catalog.experiments:
        return catalog.experiments[value]
    path = Path(value)
    if path.is_file():
        return path
    raise ConfigError(f"--experiment {value!r} is neither a name in {catalog.bench_dir / 'experiments'} nor a file")


def plan(catalog: Catalog, request: Request, device_type: str, check_data: bool) -> list[Cell]:
    """The cells of a request, checked as far as possible before any model loads: names,
    configurations, zero-shot task names and, with `check_data`, the data files they read
    (evaluation, calibration, zero-shot)."""
    selection = Selection(request.models, request.methods, request.tracks,
                          tuple(_experiment_path(value, catalog) for value in request.experiments),
                          tuple(parse_override(text) for text in request.overrides))
    cells = catalog.cells(selection, device_type)
    if request.shard:
        selected = len(cells)
        cells = shard(cells, request.shard)
        if not cells:
            raise ConfigError(f"--shard {request.shard}: this shard has no cells: the selection has "
                              f"{selected} cell(s), so use at most {selected} shards")
    tasks = tuple(dict.fromkeys(task for cell in cells for task in cell.config.zero_shot.tasks))
    check_task_names(tasks)
    if check_data:
        splits = {(dataset, EVAL_SPLIT) for cell in cells for dataset in cell.config.eval.datasets}
        splits |= {(cell.config.calib.dataset, CALIB_SPLITS[cell.config.calib.dataset])
                   for cell in cells if cell.config.calib is not None}
        for dataset, split in sorted(splits):
            load_text(dataset, split)
        check_task_files(tasks)
    return cells


def start_record(cell: Cell, run_id: str, device_type: str) -> CellRecord:
    return CellRecord(run_id, cell.id, cell.model, cell.method, cell.variant, cell.setting, cell.track,
                      cell.experiment, cell.config.to_dict(), cell.fingerprint(device_type))


class ModelStore:
    """Holds the most recently used model: cells of one model run together (grouped per
    worker), so keeping one bounds memory to one float model plus the cell's copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._key: tuple[str, str] | None = None
        self._loaded: LoadedModel | None = None
        # why a model could not be loaded: every later cell of it fails with that, without trying again
        self._failed: dict[tuple[str, str], PtqError] = {}

    def discard(self) -> None:
        self._key, self._loaded = None, None

    def get(self, config: ModelConfig) -> LoadedModel:
        key = (config.name, config.dtype)
        if key in self._failed:
            raise self._failed[key].with_traceback(None)
        if key != self._key:
            self._loaded = None
            gc.collect()
            progress.report(f"loading {config.name}")
            try:
                self._loaded = self._load(config)
            except PtqError as exc:
                self._failed[key] = exc
                raise
            self._key = key
        assert self._loaded is not None
        return self._loaded

    def _load(self, config: ModelConfig) -> LoadedModel:
        model, tokenizer, source = load_model(config)
        if config.head_dim is not None and config.head_dim != head_dim_of(model.config):
            raise UnsupportedModel(f"model {config.name}: its YAML states head_dim {config.head_dim}, the "
                                   f"loaded model has {head_dim_of(model.config)}")
        return LoadedModel(model, tokenizer, adapter_for(model, config.family), source, self.device)


def ratio_intervals(metrics: dict[str, Any], fp_metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per dataset, the 95% paired bootstrap interval of PPL / FP PPL over the same windows."""
    intervals = {}
    for dataset, nll in metrics.get("window_nll", {}).items():
        fp_nll = fp_metrics.get("window_nll", {}).get(dataset)
        if fp_nll is None or len(fp_nll) != len(nll):
            continue
        interval = paired_bootstrap_ratio(nll, fp_nll)
        intervals[dataset] = {"low": interval.low, "high": interval.high, "level": interval.level,
                              "n_boot": interval.n_boot}
    return intervals


def _write_references(stores: dict[str, TopKLogprobs], folder: Path) -> None:
    for dataset, store in stores.items():
        store.save(folder / f"{dataset}.safetensors")


def _plain(cell: Cell) -> Cell:
    """The cell with the FP baseline of plain forwards (Track C's scores through a float cache and
    adds the KV probes; the other tracks' is that already)."""
    if cell.baseline_config.kv_eval is None:
        return cell
    return dataclasses.replace(cell, baseline_config=dataclasses.replace(cell.baseline_config, kv_eval=None))


class Session:
    """Runs cells into their records: the FP baseline of each model and evaluation setting once
    (from the disk cache when it can), the cell's pipeline, then its gates."""

    def __init__(self, catalog: Catalog, device: torch.device, cache: CacheStore, baselines: BaselineStore,
                 check_baselines: bool, require_baselines: bool) -> None:
        self.catalog = catalog
        self.device = device
        self.cache = cache
        self.baselines = baselines
        self.check_baselines = check_baselines  # off with --update-baselines
        self.require_baselines = require_baselines  # off for ad hoc configurations (--override)
        self.models = ModelStore(device)
        # by baseline fingerprint: its outcome, or why it failed (each cell needing it fails with that)
        self._fp_outcomes: dict[str, CellOutcome | str] = {}
        self._fp_pipeline = Pipeline((catalog.baseline,))
        # by cache key (model and evaluation setting): the stores, and why they could not be cached
        self._references: dict[str, tuple[dict[str, TopKLogprobs], list[str]]] = {}

    def baseline(self, cell: Cell) -> CellOutcome:
        """The FP baseline the cell is judged against, measured once per model and evaluation
        setting; when it failed, every cell needing it fails with its reason, without measuring
        it again."""
        key = fingerprint(cell.baseline_config, self.device.type)
        if key not in self._fp_outcomes:
            try:
                outcome: CellOutcome | str = self._measure_baseline(cell)
            except PtqError as exc:
                outcome = f"the FP baseline of {cell.model} failed: {type(exc).__name__}: {exc}"
            self._fp_outcomes[key] = outcome
        found = self._fp_outcomes[key]
        if isinstance(found, str):
            raise BaselineFailed(found)
        return found

    def _measure_baseline(self, cell: Cell) -> CellOutcome:
        """The FP baseline's outcome (from the cache when it can). Measured with plain forwards, its
        perplexity pass also builds the float references when neither this process nor the cache
        has them: the same forward on the same windows, instead of one more. It holds their lock
        meanwhile, so a worker needing them waits rather than computing them too."""
        load = partial(self.models.get, cell.config.model)
        run = partial(run_cached, cell.baseline_config, self._fp_pipeline, self.device, load, self.cache)
        if cell.baseline_config.kv_eval is not None:
            # Through the float cache the model's perplexity is the one-shot forward's (the chunks
            # read exactly what they wrote: tests/test_kv.py), so it is the plain baseline's, which
            # scores those windows for the other tracks anyway; this baseline measures its KV probes.
            return run(scored=lambda: scored_results(self.baseline(_plain(cell)).metrics))
        inputs = references_inputs(cell.config, self.device.type)  # hashes code and packages: only here
        key = cache_key(inputs)
        if key in self._references:
            return run()
        with self.cache.exclusive("references", key):
            found = self.cache.lookup("references", key)
            if found.path is None:
                outcome = run(topk=True)
                if outcome.topk is not None:  # measured, not read from the cache
                    write = partial(_write_references, outcome.topk)
                    unstored = self.cache.store("references", key, inputs, write)
                    self._references[key] = outcome.topk, [p for p in (found.problem, unstored) if p]
                return outcome
        return run()

    def check_baseline_not_failed(self, cell: Cell) -> None:
        """Fail the cell at once when its FP baseline already failed in this process (it would
        quantize for nothing, and try a model that did not load again)."""
        found = self._fp_outcomes.get(fingerprint(cell.baseline_config, self.device.type))
        if isinstance(found, str):
            raise BaselineFailed(found)

    def references(self, cell: Cell) -> tuple[dict[str, TopKLogprobs], list[str]]:
        """The float model's top-k stores of the cell's evaluation windows (for the KLD), computed
        once per model and evaluation setting (what decides the windows and the draws), and kept in
        the disk cache: workers of one run share them, and the next run reads them. Also returns
        why they could not be read from or written to the cache."""
        inputs = references_inputs(cell.config, self.device.type)
        key = cache_key(inputs)
        if key not in self._references:
            with self.cache.exclusive("references", key):
                found = self.cache.lookup("references", key)
                problems = [found.problem] if found.problem else []
                if found.path is not None:
                    stores = {dataset: TopKLogprobs.load(found.path / f"{dataset}.safetensors")
                              for dataset in cell.config.eval.datasets}
                else:
                    loaded = self.models.get(cell.config.model)
                    with on_device(loaded.model, loaded.device):
                        stores = float_references(loaded.model, loaded.tokenizer, cell.config)
                    unstored = self.cache.store("references", key, inputs, partial(_write_references, stores))
                    problems += [unstored] if unstored else []
            self._references[key] = stores, problems
        return self._references[key]

    def run(self, cell: Cell, record: CellRecord) -> list[GateResult]:
        """Measure the cell into `record` and return the gates that failed. The method quantizes
        before the float references are fetched (they come before its evaluation), and before the
        plain FP baseline, whose pass builds them: under xdist, a worker quantizes while another
        measures what they share (see ptq.cache's exclusive), instead of measuring it too. A Track C
        cell's own baseline (the float cache's probes) comes after its evaluation."""
        self.check_baseline_not_failed(cell)
        load = partial(self.models.get, cell.config.model)

        reference_problems: list[str] = []

        def references() -> dict[str, TopKLogprobs]:
            # the plain baseline's pass builds the references: it comes first, and when it failed,
            # the cell fails before its evaluation
            self.baseline(_plain(cell))
            stores, problems = self.references(cell)
            reference_problems.extend(problems)
            return stores

        try:
            outcome = self.baseline(cell) if cell.pipeline.baseline else \
                run_cached(cell.config, cell.pipeline, self.device, load, self.cache, references)
        except NonFiniteMetric as exc:  # the float model's metrics are finite: the method's are not
            raise NonFiniteMetric(f"{exc}; the FP baseline's are finite: check the method's scales and the "
                                  "model dtype") from None
        except SharedTensorsWritten:
            self.models.discard()  # damaged: the next cell loads it again
            raise
        baseline = self.baseline(cell)
        record.model_source = baseline.model_source
        metrics, fp_metrics = outcome.metrics, baseline.metrics
        first = next(iter(metrics["ppl"]))
        record.metrics = {**metrics, "fp_ppl": fp_metrics["ppl"], "ppl_ratio": metrics["ppl"][first] /
                          fp_metrics["ppl"][first], "ppl_ratio_ci": ratio_intervals(metrics, fp_metrics)}
        if "zero_shot" in metrics:
            record.metrics["fp_zero_shot"] = fp_metrics["zero_shot"]
        record.data, record.notes = outcome.data, outcome.notes
        problems = outcome.cache_problems + reference_problems
        record.fallbacks = outcome.fallbacks + [f"cache: {problem}" for problem in problems]
        record.cache = {**outcome.cache, "fp_baseline": baseline.cache["metrics"]}
        committed = self.baselines.check(cell.id, record.config_fingerprint, metrics,
                                         cell.config.gates.baseline_rel_tol, self.require_baselines) \
            if self.check_baselines else []
        gates = cell_gates(metrics, fp_metrics, cell.config.gates, committed)
        record.gates = [gate.to_dict() for gate in gates]
        return [gate for gate in gates if gate.passed is False]

