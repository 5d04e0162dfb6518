"""Sharding the matrix and merging the shards' records into one leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptq.errors import ConfigError
from ptq.matrix import Catalog, Selection, shard
from ptq.report.__main__ import main as report_main
from ptq.report.leaderboard import leaderboard_rows
from ptq.report.records import write_record
from tests.test_records import make_record

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def cells():
    return Catalog(BENCH).cells(Selection(experiments=(BENCH / "experiments" / "track-a.yaml",)), "cpu")


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_are_disjoint_cover_the_matrix_and_are_deterministic(cells, count: int) -> None:
    slices = [shard(cells, f"{i}/{count}") for i in range(1, count + 1)]
    ids = [cell.id for part in slices for cell in part]
    assert sorted(ids) == sorted(cell.id for cell in cells)
    assert len(ids) == len(set(ids))
    assert [c.id for c in shard(cells, f"1/{count}")] == [c.id for c in slices[0]]
    assert max(len(p) for p in slices) - min(len(p) for p in slices) <= 1


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_specs_are_config_errors(cells, spec: str) -> None:
    with pytest.raises(ConfigError, match="--shard"):
        shard(cells, spec)


def test_merge_reproduces_the_single_run_leaderboard(tmp_path: Path) -> None:
    records = [make_record("tiny-rtn-A", ppl=12.5), make_record("tiny-gptq-A", ppl=11.0),
               make_record("tiny-fp16-A", ppl=10.0), make_record("tiny-awq-A", status="failed", ppl=None,
                                                                 reason="boom")]
    for index, record in enumerate(records):
        write_record(record, tmp_path / f"shard-{index % 2}")
    assert report_main(["merge", str(tmp_path / "shard-0"), str(tmp_path / "shard-1"),
                        "--reports-dir", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "leaderboard.json").read_text())["rows"]
    assert merged == json.loads(json.dumps(leaderboard_rows(records)))
    assert "| tiny-awq-A" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_merge_refuses_a_cell_recorded_by_two_shards(tmp_path: Path) -> None:
    write_record(make_record("tiny-rtn-A"), tmp_path / "a")
    write_record(make_record("tiny-rtn-A"), tmp_path / "b")
    with pytest.raises(SystemExit, match="tiny-rtn-A is in both"):
        report_main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--reports-dir", str(tmp_path / "out")])


def test_compare_marks_each_cell_and_flags_regressions_beyond_tolerance() -> None:
    from ptq.report.compare import compare_rows

    previous = [{"cell": "a", "ppl_wikitext2": 10.0}, {"cell": "b", "ppl_wikitext2": 10.0},
                {"cell": "c", "ppl_wikitext2": 10.0}, {"cell": "d", "ppl_wikitext2": 10.0},
                {"cell": "gone", "ppl_wikitext2": 10.0}]
    current = [{"cell": "a", "ppl_wikitext2": 10.05}, {"cell": "b", "ppl_wikitext2": 10.5},
               {"cell": "c", "ppl_wikitext2": 9.0}, {"cell": "d", "ppl_wikitext2": None},
               {"cell": "new", "ppl_wikitext2": 12.0}]
    verdicts = {c.cell: c.verdict for c in compare_rows(current, previous, rel_tol=0.01)}
    assert verdicts == {"a": "same", "b": "worse", "c": "better", "d": "worse", "new": "new", "gone": "gone"}


def test_compare_leaves_out_cells_whose_configuration_differs_and_fails_when_nothing_is_compared() -> None:
    """Comparing runs with other evaluation settings flagged the FP baseline itself as 2.3% worse:
    only cells under the same fingerprint are compared, the others say why."""
    from ptq.report.compare import compare_rows, nothing_compared

    previous = [{"cell": "fp", "ppl_wikitext2": 10.0, "fingerprint": "aaa"},
                {"cell": "rtn", "ppl_wikitext2": 12.0, "fingerprint": "bbb"}]
    current = [{"cell": "fp", "ppl_wikitext2": 10.23, "fingerprint": "xxx"},
               {"cell": "rtn", "ppl_wikitext2": 12.0, "fingerprint": "bbb"}]
    comparisons = {c.cell: c for c in compare_rows(current, previous, rel_tol=0.01)}
    assert comparisons["fp"].verdict == "incomparable" and "fingerprint aaa before, xxx now" in comparisons["fp"].reason
    assert comparisons["rtn"].verdict == "same"
    assert nothing_compared(list(comparisons.values())) is None
    only_other = compare_rows(current[:1], previous, rel_tol=0.01)
    assert "no cell could be compared with the previous run: fp: its configuration differs" in nothing_compared(
        only_other)
    assert nothing_compared(compare_rows([{"cell": "x", "ppl_wikitext2": 1.0}], previous, 0.01)) == (
        "no cell could be compared with the previous run: no cell of this run was in it")
