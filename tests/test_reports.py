"""Report artefacts (ptq.report.write): the leaderboard grouped by track with deltas to the FP
baseline, in Markdown, JSON and self-contained HTML, and the PNG figures."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from ptq.report.leaderboard import COLUMNS, leaderboard_rows, render_table, render_tracks, visible_columns
from ptq.report.plots import pareto_front, render_plots
from ptq.report.write import write_reports
from tests.test_records import make_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def with_metrics(record: dict[str, Any], **metrics: Any) -> dict[str, Any]:
    record["metrics"].update(metrics)
    return record


def sample_records(kv: bool = True) -> list[dict[str, Any]]:
    """FP and quantized cells of two tracks (FP PPL 10.0, see make_record), one skipped."""
    kv_metrics = {"kv": {"bytes_per_token": 9216.0, "float_bytes_per_token": 36864.0}} if kv else {}
    return [
        with_metrics(make_record("m-fp16-A", ppl=10.0), bits_per_weight=32.0, quant_seconds=0.0),
        with_metrics(make_record("m-rtn-A", ppl=12.5), bits_per_weight=4.25),
        with_metrics(make_record("m-gptq-A", ppl=11.0), bits_per_weight=4.25, quant_seconds=200.0),
        with_metrics(make_record("m-hqq-A", ppl=13.0), bits_per_weight=3.25),
        make_record("m-awq-A", status="skipped", reason="needs a GPU", ppl=None),
        with_metrics(make_record("m-fp16-C", ppl=10.0), bits_per_weight=32.0),
        with_metrics(make_record("m-rtn-C", ppl=10.04), bits_per_weight=32.0, **kv_metrics),
    ]


def test_rows_carry_the_delta_to_the_fp_baseline_and_the_size_metrics() -> None:
    rows = {row["cell"]: row for row in leaderboard_rows(sample_records())}
    assert rows["m-rtn-A"]["ppl_delta"] == 12.5 - 10.0
    assert rows["m-rtn-A"]["ppl_ratio"] == 1.25
    assert rows["m-fp16-A"]["ppl_delta"] == 0.0
    assert rows["m-awq-A"]["ppl_delta"] is None  # no PPL, no delta
    assert rows["m-hqq-A"]["bits_per_weight"] == 3.25
    assert (rows["m-rtn-C"]["kv_bytes_per_token"], rows["m-rtn-C"]["kv_float_bytes_per_token"]) == (9216.0, 36864.0)
    assert rows["m-rtn-A"]["kv_bytes_per_token"] is None


def test_markdown_has_one_table_per_track_with_signed_deltas() -> None:
    text = render_tracks(leaderboard_rows(sample_records()))
    sections = text.split("## Track ")[1:]
    assert [section.split("\n", 1)[0] for section in sections] == ["A", "C"]
    track_a, track_c = sections
    assert all(f"| m-{m}-A " in track_a for m in ("fp16", "rtn", "gptq", "hqq", "awq"))
    assert "-C " not in track_a and "-A " not in track_c
    line = next(line for line in track_a.splitlines() if line.startswith("| m-rtn-A "))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    headers = [h.strip() for h in track_a.splitlines()[2].strip("|").split("|")]
    assert dict(zip(headers, cells))["Δ FP"] == "+2.50"
    assert dict(zip(headers, cells))["× FP"] == "1.250"
    assert dict(zip(headers, cells))["bits/weight"] == "4.250"


def test_optional_columns_show_only_with_values() -> None:
    with_kv = [c.header for c in visible_columns(leaderboard_rows(sample_records(kv=True)))]
    without = [c.header for c in visible_columns(leaderboard_rows(sample_records(kv=False)))]
    assert "KV B/token" in with_kv and "KV B/token" not in without
    assert without == [c.header for c in COLUMNS if not c.optional or c.header == "bits/weight"]
    assert "KV B/token" not in render_table(leaderboard_rows(sample_records(kv=True))[:5])  # track A rows only


@pytest.mark.parametrize(("points", "front"), [
    ([(4.25, 12.5), (4.25, 11.0), (3.25, 13.0), (32.0, 10.0)], [2, 1, 3]),
    ([(4.0, 10.0), (3.0, 12.0), (5.0, 10.0), (2.0, 20.0)], [3, 1, 0]),  # 5 bits for the same PPL: dominated
    ([(1.0, 1.0), (1.0, 1.0)], [0]),
    ([], []),
])
def test_pareto_front(points: list[tuple[float, float]], front: list[int]) -> None:
    assert pareto_front(points) == front


def assert_png(data: bytes, path: Path) -> None:
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_write_reports_writes_every_artefact(tmp_path: Path) -> None:
    records = sample_records()
    reports = tmp_path / "reports"
    written = write_reports(records, reports, "run-7")
    names = ["plots/ppl_vs_bits.png", "plots/quant_seconds.png", "plots/kv_bytes_vs_ppl.png",
             "leaderboard.md", "leaderboard.json", "leaderboard.html"]
    assert written == [reports / name for name in names]
    assert sorted(str(p.relative_to(reports)) for p in reports.rglob("*") if p.is_file()) == sorted(names)
    for path in written[:3]:
        assert_png(path.read_bytes(), path)

    data = json.loads((reports / "leaderboard.json").read_text())
    assert data["run_id"] == "run-7" and data["rows"] == leaderboard_rows(records)

    md = (reports / "leaderboard.md").read_text()
    assert md.startswith("# Leaderboard (run run-7)\n")
    assert render_tracks(leaderboard_rows(records)) in md
    assert "![PPL vs bits per weight](plots/ppl_vs_bits.png)" in md


def test_html_is_self_contained_with_a_table_per_track(tmp_path: Path) -> None:
    write_reports(sample_records(), tmp_path, "run-7")
    html = (tmp_path / "leaderboard.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "<link" not in html and "<script" not in html
    assert html.count("<h2>Track ") == 2 and html.count("<table>") == 2
    assert "<td>+2.50</td>" in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3
    for index, encoded in enumerate(images):
        path = tmp_path / f"embedded-{index}.png"
        path.write_bytes(base64.b64decode(encoded))
        assert_png(path.read_bytes(), path)


def test_the_kv_figure_is_skipped_without_kv_metrics_and_a_stale_one_removed(tmp_path: Path) -> None:
    write_reports(sample_records(kv=True), tmp_path, "run-1")
    assert (tmp_path / "plots" / "kv_bytes_vs_ppl.png").is_file()
    written = write_reports(sample_records(kv=False), tmp_path, "run-2")
    assert tmp_path / "plots" / "kv_bytes_vs_ppl.png" not in written
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["ppl_vs_bits.png", "quant_seconds.png"]
    assert "kv_bytes_vs_ppl" not in (tmp_path / "leaderboard.md").read_text()


def test_no_figure_without_measured_cells() -> None:
    assert render_plots(leaderboard_rows([make_record("m-awq-A", status="failed", reason="boom", ppl=None)])) == []
