"""Session.run: when a cell asks for the FP baseline, relative to its own evaluation. The
baseline comes first where its perplexity pass builds the float references the cell's KLD
needs; a Track C cell's baseline (scored through a float cache) cannot, and the cell does not
wait for it (another worker may be measuring it) before evaluating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ptq.session
from ptq.cache import CacheStore
from ptq.gates import BaselineStore
from ptq.matrix import Catalog, Selection
from ptq.session import Session

BENCH = Path(__file__).resolve().parents[1] / "bench"


class Evaluating(Exception):
    """Stands for the cell's evaluation, which starts once its references are fetched."""


@pytest.mark.parametrize(("method", "track", "expected"), [("rtn", "A", ["baseline", "references"]),
                                                            ("kv-rtn", "C", ["references"])])
def test_a_cell_waits_for_its_baseline_only_when_the_baseline_builds_its_references(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str, track: str,
        expected: list[str]) -> None:
    catalog = Catalog(BENCH)
    cell = catalog.cells(Selection(models=("smollm2-135m",), methods=(method,), tracks=(track,)), "cpu")[0]
    session = Session(catalog, torch.device("cpu"), CacheStore(None), BaselineStore(tmp_path / "none.json"),
                      check_baselines=False, require_baselines=False)
    calls: list[str] = []
    monkeypatch.setattr(Session, "baseline", lambda self, _cell: calls.append("baseline"))
    monkeypatch.setattr(Session, "references", lambda self, _cell: calls.append("references") or ({}, []))

    def run_cached(config, pipeline, device, load, store, references):
        references()
        raise Evaluating

    monkeypatch.setattr(ptq.session, "run_cached", run_cached)
    with pytest.raises(Evaluating):
        session.run(cell, record=None)
    assert calls == expected
