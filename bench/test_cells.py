"""The benchmark matrix: one test per model x method x track cell (see conftest.py).

Each cell: load (cached per worker) -> quantize a copy -> evaluate -> record -> gates; the
model is loaded only when the on-disk cache (ptq.cache) lacks the cell's or the baseline's metrics.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import pytest

from fixtures.models import BaselineCache, ModelStore
from ptq.cache import CacheStore
from ptq.errors import PtqError
from ptq.gates import BaselineStore, quality_gates, zero_shot_gates
from ptq.matrix import Cell
from ptq.pipeline import run_cached


@contextmanager
def user_errors() -> Iterator[None]:
    """Known failures (missing data, model offline, NaN metric) fail the cell with their message only."""
    try:
        yield
        return
    except PtqError as exc:
        message = f"{type(exc).__name__}: {exc}"
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


def test_cell(cell: Cell, models: ModelStore, fp_baselines: BaselineCache, result_cache: CacheStore,
              baseline_store: BaselineStore, record: dict[str, Any], pytestconfig: pytest.Config) -> None:
    config = cell.config
    if config.model.needs_gpu and pytestconfig.ptq_device.type != "cuda":
        pytest.skip(f"{cell.model} needs a GPU")
    method = pytestconfig.ptq_catalog.registry[cell.method]
    with user_errors():
        load = partial(models.get, config)
        baseline = fp_baselines.get(config, models.device, load)
        record["model_source"] = baseline.model_source
        outcome = baseline if method.baseline else run_cached(method, config, models.device, load, result_cache)
    fp_ppl = baseline.metrics["ppl"]
    ppl = outcome.metrics["ppl"]
    first = next(iter(ppl))
    metrics = {**outcome.metrics, "fp_ppl": fp_ppl, "ppl_ratio": ppl[first] / fp_ppl[first]}
    if "zero_shot" in outcome.metrics:
        metrics["fp_zero_shot"] = baseline.metrics["zero_shot"]
    record.update(
        metrics=metrics,
        data=outcome.data,
        notes=outcome.notes,
        fallbacks=outcome.fallbacks + [f"cache: {problem}" for problem in outcome.cache_problems],
        cache={**outcome.cache, "fp_baseline": baseline.cache["metrics"]},
    )
    gates = quality_gates(ppl, fp_ppl, config.gates)
    if "zero_shot" in outcome.metrics:
        gates += zero_shot_gates(outcome.metrics["zero_shot"], baseline.metrics["zero_shot"], config.gates)
    if not pytestconfig.getoption("update_baselines"):
        gates += baseline_store.check(cell.id, record["config_fingerprint"], ppl, config.gates.baseline_rel_tol,
                                      required=not pytestconfig.getoption("override"))
    record["gates"] = [gate.to_dict() for gate in gates]
    failed = [gate for gate in gates if gate.passed is False]
    if failed:
        pytest.fail("; ".join(f"{gate.name} {gate.metric}: {gate.detail}" for gate in failed), pytrace=False)
