"""Cell records (ptq.report.records), the leaderboard (ptq.report.leaderboard) and the
gates (ptq.gates)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ptq.config import GateConfig
from ptq.gates import BaselineStore, GateResult, quality_gates
from ptq.matrix import Catalog, Selection
from ptq.session import start_record
from ptq.report.leaderboard import leaderboard_rows, render_table, table_cells
from ptq.report.records import (
    RECORD_FIELDS,
    SCHEMA_VERSION,
    atomic_write,
    environment,
    render_markdown,
    validate_record,
    write_record,
)

ROOT = Path(__file__).resolve().parents[1]


def make_record(cell_id: str = "tiny-rtn-A", status: str = "passed", ppl: float | None = 12.5,
                reason: str | None = None, **changes: Any) -> dict[str, Any]:
    model, method, track = cell_id.rsplit("-", 2)
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": "run-1",
        "cell_id": cell_id,
        "model": model,
        "method": method,
        "variant": None,
        "setting": None,
        "track": track,
        "experiment": "default",
        "status": status,
        "reason": reason,
        "config": {"model": {"name": model, "baseline_note": None}},
        "config_fingerprint": "0123456789abcdef",
        "metrics": {} if ppl is None else {"ppl": {"wikitext2": ppl}, "fp_ppl": {"wikitext2": 10.0},
                                           "ppl_ratio": ppl / 10.0, "quant_seconds": 1.25,
                                           "eval_tokens_per_s": 900.0, "peak_memory_bytes": 3 * 2**20},
        "gates": [],
        "notes": [],
        "fallbacks": [],
        "model_source": {"kind": "hub", "id": "org/tiny"},
        "data": {"wikitext2": {"sha256": "ab" * 32}},
        "cache": {"metrics": "miss", "weights": "miss", "fp_baseline": "hit"},
        "environment": {"device": "cpu", "git_commit": None},
        "started": "2026-01-01T00:00:00+00:00",
        "wall_seconds": 3.5,
    }
    record.update(changes)
    return record


def test_the_fake_record_matches_the_schema_exactly() -> None:
    record = make_record()
    assert set(record) == set(RECORD_FIELDS)
    validate_record(record)


# ------------------------------------------------------------------------------ validate


@pytest.mark.parametrize("key", sorted(RECORD_FIELDS))
def test_a_missing_key_is_rejected(key: str) -> None:
    record = make_record()
    del record[key]
    with pytest.raises(ValueError, match=rf"missing \['{key}'\]"):
        validate_record(record)


def test_an_extra_key_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        validate_record(make_record(extra=1))


@pytest.mark.parametrize(("key", "value"), [
    ("schema_version", "1"),
    ("run_id", None),
    ("cell_id", 3),
    ("experiment", 5),
    ("reason", ["x"]),
    ("config", []),
    ("config_fingerprint", 123),
    ("metrics", None),
    ("gates", {}),
    ("notes", "a note"),
    ("model_source", "hub"),
    ("wall_seconds", "3.5"),
    ("wall_seconds", None),
    ("started", 0),
])
def test_a_wrong_type_is_rejected(key: str, value: Any) -> None:
    record = make_record()
    record[key] = value
    with pytest.raises(ValueError, match=rf"record\['{key}'\]"):
        validate_record(record)


def test_nullable_fields_accept_none() -> None:
    validate_record(make_record(experiment=None, reason=None, config_fingerprint=None, model_source=None))


@pytest.mark.parametrize("status", ["error", "PASSED", "", "xfailed"])
def test_a_bad_status_is_rejected(status: str) -> None:
    with pytest.raises(ValueError, match="status"):
        validate_record(make_record(status=status))


@pytest.mark.parametrize("status", ["passed", "failed", "skipped"])
def test_the_three_statuses_are_accepted(status: str) -> None:
    validate_record(make_record(status=status))


def test_a_started_record_is_valid_and_finishes_valid() -> None:
    catalog = Catalog(ROOT / "bench")
    experiment = ROOT / "bench" / "experiments" / "default.yaml"
    cell = next(c for c in catalog.cells(Selection(experiments=(experiment,)), "cpu") if c.id == "smollm2-135m-rtn-A")
    record = start_record(cell, "r1", "cpu").to_dict()
    assert set(record) == set(RECORD_FIELDS)
    assert (record["cell_id"], record["experiment"], record["status"]) == ("smollm2-135m-rtn-A", "default", "failed")
    assert record["config_fingerprint"] == cell.fingerprint("cpu")
    assert record["config"]["weight"]["bits"] == 4
    assert list(record["config"]["method"]["stages"]) == [{"name": "rtn", "params": {}, "added": False}]
    # once finished as the report hook does, it is still valid and serialisable
    finished = start_record(cell, "r1", "cpu")
    finished.finish("passed", None, environment(ROOT, torch.device("cpu"), ["pytest"]), 1.0)
    json.dumps(finished.to_dict())
    finished.status = "lost"
    with pytest.raises(ValueError, match="status 'lost'"):
        finished.to_dict()


def test_environment_describes_the_run() -> None:
    env = environment(ROOT, torch.device("cpu"), ["python", "-m", "pytest"])
    assert env["device"] == "cpu"
    assert env["command_line"] == ["python", "-m", "pytest"]
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(env["packages"]) >= {"torch", "transformers", "numpy"}


# --------------------------------------------------------------------------------- write


def test_write_record_writes_json_and_markdown_and_no_temp_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"  # created on demand
    gate = GateResult("max_ppl_ratio", "ppl.wikitext2", 1.25, 1.45, 10.0, True, "within").to_dict()
    record = make_record(notes=["uneven groups"], fallbacks=["sdpa -> eager"], gates=[gate])
    path = write_record(record, run_dir)
    assert path == run_dir / "tiny-rtn-A.json"
    assert sorted(p.name for p in run_dir.iterdir()) == ["tiny-rtn-A.json", "tiny-rtn-A.md"]
    assert json.loads(path.read_text()) == record
    md = (run_dir / "tiny-rtn-A.md").read_text()
    assert md.startswith("# tiny-rtn-A: passed\n")
    assert "| max_ppl_ratio | 1.25 | 1.45 | 10.0 | True |" in md
    assert "- uneven groups" in md and "- sdpa -> eager" in md
    assert '"kind": "hub"' in md  # the model source section


def test_markdown_shows_the_reason_of_a_failed_cell() -> None:
    md = render_markdown(make_record(status="failed", reason="ModelUnavailable: offline", ppl=None))
    assert md.startswith("# tiny-rtn-A: failed\n")
    assert "**Reason:** ModelUnavailable: offline" in md
    assert "## Gates" not in md


def test_an_invalid_record_is_not_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_record(make_record(status="weird"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_record_replaces_it(tmp_path: Path) -> None:
    write_record(make_record(ppl=20.0), tmp_path)
    path = write_record(make_record(ppl=11.0), tmp_path)
    assert json.loads(path.read_text())["metrics"]["ppl"]["wikitext2"] == 11.0
    assert len(list(tmp_path.iterdir())) == 2


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 123)  # type: ignore[arg-type]  # fails while writing
    assert target.read_text() == "old"  # the previous content is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ---------------------------------------------------------------------------- leaderboard


def test_leaderboard_order() -> None:
    records = [
        make_record("zeta-rtn-A", ppl=11.0),
        make_record("alpha-rtn-C", ppl=10.5),
        make_record("alpha-gptq-A", status="failed", reason="gate failed", ppl=10.1),
        make_record("alpha-rtn-A", ppl=13.0),
        make_record("alpha-fp16-A", ppl=10.0),
        make_record("alpha-awq-A", status="skipped", reason="needs a GPU", ppl=None),
        make_record("alpha-rtn-B", ppl=10.2),
        make_record("alpha-smooth-A", ppl=12.0),
    ]
    rows = leaderboard_rows(records)
    assert [row["cell"] for row in rows] == [
        "alpha-fp16-A", "alpha-smooth-A", "alpha-rtn-A",  # passed, lower PPL first
        "alpha-gptq-A", "alpha-awq-A",  # not passed: after, even with a lower PPL
        "alpha-rtn-B", "alpha-rtn-C",  # then tracks B, C
        "zeta-rtn-A",  # then the next model
    ]
    by_cell = {row["cell"]: row for row in rows}
    assert by_cell["alpha-gptq-A"]["reason"] == "gate failed"
    assert by_cell["alpha-awq-A"]["reason"] == "needs a GPU"
    assert by_cell["alpha-awq-A"]["ppl_wikitext2"] is None
    assert by_cell["alpha-fp16-A"]["reason"] is None
    row = by_cell["alpha-rtn-A"]
    assert (row["model"], row["method"], row["track"], row["status"]) == ("alpha", "rtn", "A", "passed")
    assert (row["ppl_wikitext2"], row["fp_ppl_wikitext2"], row["ppl_ratio"]) == (13.0, 10.0, 1.3)
    assert row["peak_memory_mb"] == 3.0


def test_leaderboard_ties_on_ppl_are_broken_by_method() -> None:
    rows = leaderboard_rows([make_record("m-zz-A", ppl=10.0), make_record("m-aa-A", ppl=10.0)])
    assert [row["method"] for row in rows] == ["aa", "zz"]


def test_render_table_shows_every_row() -> None:
    rows = leaderboard_rows([make_record("m-rtn-A", ppl=12.5),
                             make_record("m-gptq-A", status="failed", reason="line one\nline two", ppl=None)])
    table = render_table(rows).splitlines()
    assert table[0].startswith("| cell")
    assert len(table) == 2 + len(rows)
    assert "| m-rtn-A " in table[2] and "12.50" in table[2] and "1.250" in table[2]
    assert "| m-gptq-A " in table[3] and "failed" in table[3]
    assert "line one line two" in table[3]  # reasons stay on one line


# ---------------------------------------------------------------------------------- gates


def test_quality_gate_boundary() -> None:
    gates = GateConfig(max_ppl_ratio=1.5)
    fp = {"wikitext2": 10.0}
    at_limit = quality_gates({"wikitext2": 15.0}, fp, gates)  # ratio exactly 1.5
    assert len(at_limit) == 1 and at_limit[0].passed is True
    assert (at_limit[0].measured, at_limit[0].limit, at_limit[0].baseline) == (1.5, 1.5, 10.0)
    assert at_limit[0].metric == "ppl.wikitext2" and "within" in at_limit[0].detail
    over = quality_gates({"wikitext2": 15.000001}, fp, gates)[0]
    assert over.passed is False and "over" in over.detail
    assert quality_gates({"wikitext2": 9.0}, fp, gates)[0].passed is True  # better than FP


def test_quality_gate_per_dataset_and_disabled() -> None:
    results = quality_gates({"a": 11.0, "b": 30.0}, {"a": 10.0, "b": 10.0}, GateConfig(max_ppl_ratio=1.2))
    assert [(r.metric, r.passed) for r in results] == [("ppl.a", True), ("ppl.b", False)]
    assert quality_gates({"a": 1e9}, {"a": 1.0}, GateConfig(max_ppl_ratio=None)) == []


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    store = BaselineStore(tmp_path / "baselines.json")
    store.update("m-rtn-A", "fp1", {"ppl": {"wikitext2": 16.0}, "device": "cpu", "commit": None})
    return store


def test_baseline_within_and_beyond_tolerance(store: BaselineStore) -> None:
    def check(value: float) -> GateResult:
        [result] = store.check("m-rtn-A", "fp1", {"ppl": {"wikitext2": value}}, rel_tol=0.0625, required=True)
        return result

    assert check(17.0).passed is True  # drift exactly 1/16: at the tolerance
    assert check(15.0).passed is True  # either direction
    assert check(16.0).passed is True
    beyond = check(17.01)
    assert beyond.passed is False and "beyond tolerance" in beyond.detail
    assert check(14.99).passed is False
    assert (beyond.measured, beyond.limit, beyond.baseline, beyond.metric) == (17.01, 0.0625, 16.0, "ppl.wikitext2")


def test_baseline_drift_beyond_tolerance_passes_only_within_the_window_noise(store: BaselineStore) -> None:
    """With per-window NLLs on both sides the gate is paired: every window 2% worse is a real
    change (the interval is the single point e^0.02); the same mean shift made of windows +-0.3
    apart is indistinguishable from window noise (the interval contains 1)."""
    committed = [2.0 + 0.01 * i for i in range(32)]
    store.update("m-gptq-A", "fp1", {"ppl": {"wikitext2": math.exp(sum(committed) / 32)},
                                      "window_nll": {"wikitext2": committed}, "device": "cpu", "commit": None})

    def check(current: list[float]) -> GateResult:
        metrics = {"ppl": {"wikitext2": math.exp(sum(current) / 32)}, "window_nll": {"wikitext2": current}}
        [result] = store.check("m-gptq-A", "fp1", metrics, rel_tol=0.01, required=True)
        return result

    shifted = check([nll + 0.02 for nll in committed])
    assert shifted.passed is False and "beyond the noise" in shifted.detail
    noisy = check([nll + 0.02 + (0.3 if i % 2 else -0.3) for i, nll in enumerate(committed)])
    assert noisy.passed is True and "beyond tolerance" in noisy.detail and "within the noise" in noisy.detail


def test_baseline_missing(store: BaselineStore) -> None:
    [required] = store.check("m-rtn-A", "other-fingerprint", {"ppl": {"wikitext2": 16.0}}, 0.01, required=True)
    assert required.passed is False and "--update-baselines" in required.detail
    [optional] = store.check("m-rtn-B", "fp1", {"ppl": {"wikitext2": 16.0}}, 0.01, required=False)
    assert optional.passed is None
    # a stored baseline without the dataset fails, required or not
    [no_dataset] = store.check("m-rtn-A", "fp1", {"ppl": {"c4": 16.0}}, 0.01, required=False)
    assert no_dataset.passed is False and "no ppl.c4" in no_dataset.detail


def test_baseline_update_save_reload(store: BaselineStore, tmp_path: Path) -> None:
    assert not store.path.exists()  # nothing written until saved
    store.update("m-rtn-A", "fp2", {"ppl": {"wikitext2": 17.5}, "device": "cpu", "commit": "abc"})
    store.update("m-rtn-A", "fp1", {"ppl": {"wikitext2": 15.0}, "device": "cpu", "commit": "def"})
    store.save()
    assert [p.name for p in tmp_path.iterdir()] == ["baselines.json"]

    reloaded = BaselineStore(store.path)
    assert reloaded.entries == store.entries
    assert reloaded.expected("m-rtn-A", "fp1") == {"ppl": {"wikitext2": 15.0}, "device": "cpu", "commit": "def"}
    # an update is the cell's new expectation: the other configuration's entry is gone
    assert reloaded.expected("m-rtn-A", "fp2") is None
    assert reloaded.expected("m-rtn-A", "fp3") is None and reloaded.expected("x", "fp1") is None
    assert reloaded.check("m-rtn-A", "fp1", {"ppl": {"wikitext2": 15.0}}, 0.0, required=True)[0].passed is True


def test_gate_results_serialise_into_records(tmp_path: Path) -> None:
    gates = quality_gates({"wikitext2": 12.0}, {"wikitext2": 10.0}, GateConfig(max_ppl_ratio=1.1))
    record = make_record(status="failed", gates=[g.to_dict() for g in gates])
    path = write_record(copy.deepcopy(record), tmp_path)
    stored = json.loads(path.read_text())["gates"][0]
    assert stored["passed"] is False and stored["limit"] == 1.1
    assert set(stored) == {"name", "metric", "measured", "limit", "baseline", "passed", "detail"}
    assert os.path.exists(tmp_path / "tiny-rtn-A.md")


def test_kv_columns_appear_only_when_some_cell_has_them() -> None:
    plain = make_record("alpha-rtn-A")
    kv = make_record("alpha-kivi-C")
    kv["metrics"].update(passkey={"accuracy": 0.75}, decode_tokens_per_s=42.0,
                         kv={"bytes_per_token": 1234.0, "float_bytes_per_token": 4096, "bits_per_element": 3.25})
    kv_headers = ["KV B/token", "float KV B/token", "KV bits/elem", "passkey", "decode tok/s (sim.)"]
    assert not set(kv_headers) & set(table_cells(leaderboard_rows([plain]))[0])
    headers, cells = table_cells(leaderboard_rows([plain, kv]))
    by_cell = {row[0]: dict(zip(headers, row)) for row in cells}
    assert [by_cell["alpha-kivi-C"][h] for h in kv_headers] == ["1234", "4096", "3.25", "0.75", "42.0"]
    assert [by_cell["alpha-rtn-A"][h] for h in kv_headers] == [""] * 5
