"""Session.run: when a cell asks for the FP baseline, relative to its own evaluation. The plain
baseline comes first: its perplexity pass builds the float references the cell's KLD needs. A
Track C cell's own baseline (the float cache's) comes after: it measures the KV probes and takes
its perplexity from the plain baseline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import ptq.session
from ptq.cache import CacheStore
from ptq.cell import CellOutcome
from ptq.dependencies import fingerprint
from ptq.eval.perplexity import PerplexityResult
from ptq.eval.suite import Evaluation
from ptq.gates import BaselineStore
from ptq.matrix import Catalog, Cell, Selection
from ptq.session import Session

BENCH = Path(__file__).resolve().parents[1] / "bench"


class Evaluating(Exception):
    """Stands for the cell's evaluation, which starts once its references are fetched."""


@pytest.mark.parametrize(("method", "track"), [("rtn", "A"), ("kv-rtn", "C")])
def test_a_cell_waits_for_the_plain_baseline_which_builds_its_references(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str, track: str) -> None:
    catalog = Catalog(BENCH)
    cell = catalog.cells(Selection(models=("smollm2-135m",), methods=(method,), tracks=(track,)), "cpu")[0]
    session = Session(catalog, torch.device("cpu"), CacheStore(None), BaselineStore(tmp_path / "none.json"),
                      check_baselines=False, require_baselines=False)
    calls: list[str] = []
    def baseline(_session: Session, asked: Cell) -> None:
        calls.append(f"baseline, kv_eval {asked.baseline_config.kv_eval}")

    monkeypatch.setattr(Session, "baseline", baseline)
    monkeypatch.setattr(Session, "references", lambda self, _cell: calls.append("references") or ({}, []))

    def run_cached(config, pipeline, device, load, store, references):
        references()
        raise Evaluating

    monkeypatch.setattr(ptq.session, "run_cached", run_cached)
    with pytest.raises(Evaluating):
        session.run(cell, record=None)
    assert calls == ["baseline, kv_eval None", "references"]


def test_a_track_c_baseline_takes_its_perplexity_from_the_plain_baseline(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """Through a float cache the perplexity is the one-shot forward's (tests/test_kv.py): the Track C
    baseline measures its KV probes and takes its perplexity from the baseline the other tracks use,
    which runs once and only when the C baseline is measured (not when its outcome is cached)."""
    catalog = Catalog(BENCH)
    fp16 = catalog.cells(Selection(models=("smollm2-135m",), methods=("fp16",)), "cpu")
    cells = {cell.track: cell for cell in fp16}
    plain = dataclasses.replace(cells["C"].baseline_config, kv_eval=None)
    assert fingerprint(plain, "cpu") == fingerprint(cells["A"].baseline_config, "cpu")
    session = Session(catalog, torch.device("cpu"), CacheStore(None), BaselineStore(tmp_path / "none.json"),
                      check_baselines=False, require_baselines=False)
    measured = PerplexityResult(28.8, 32, 512, 16352, 50.0, None, (3.3,) * 32)
    runs: list[str] = []

    def run_cached(config, pipeline, device, load, store, references=None, topk=False, scored=None):
        if config.kv_eval is None:
            runs.append("plain")
            metrics = Evaluation({"wikitext2": measured}, {}).metrics()
            return CellOutcome(metrics, {}, [], [], {}, cache={"metrics": "miss"})
        runs.append("C")
        if cached:
            return CellOutcome({}, {}, [], [], {}, cache={"metrics": "hit"})
        assert scored() == {"wikitext2": measured}
        return CellOutcome({"ppl": {"wikitext2": 28.8}}, {}, [], [], {}, cache={"metrics": "miss"})

    monkeypatch.setattr(ptq.session, "run_cached", run_cached)
    cached = True
    session.baseline(cells["C"])
    assert runs == ["C"]
    session._fp_outcomes.clear()
    cached = False
    session.baseline(cells["C"])
    session.baseline(cells["A"])  # measured once, for both
    assert runs == ["C", "C", "plain"]
