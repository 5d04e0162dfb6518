"""The benchmark matrix: one test per model x pipeline x track cell (see conftest.py).

Each cell: load (cached per worker) -> quantize a copy -> evaluate -> record -> gates; the
model is loaded only when the on-disk cache (ptq.cache) lacks the cell's or the baseline's
metrics. The work is ptq.session's; this module only says what passes, fails or is skipped.
"""

from __future__ import annotations

import pytest

from ptq.errors import BackendUnavailable, NotApplicable, PtqError
from ptq.matrix import Cell
from ptq.report.records import CellRecord
from ptq.session import Session


def test_cell(cell: Cell, bench_session: Session, record: CellRecord) -> None:
    if cell.config.model.needs_gpu and bench_session.device.type != "cuda":
        pytest.skip(f"{cell.model} needs a GPU")
    try:
        failed = bench_session.run(cell, record)
    except NotApplicable as exc:  # the method cannot run on this model: skipped, with the reason
        pytest.skip(f"{cell.method} on {cell.model}: {exc}")
    except BackendUnavailable as exc:  # a library that cannot be installed or run here: why, and the command
        pytest.skip(f"{exc}")
    except PtqError as exc:  # known failures (missing data, model offline, NaN metric): the message only
        failed, message = None, f"{type(exc).__name__}: {exc}"
    if failed is None:
        pytest.fail(message, pytrace=False)  # outside the except: no chained traceback
    if failed:
        pytest.fail("; ".join(f"{gate.name} {gate.metric}: {gate.detail}" for gate in failed), pytrace=False)
