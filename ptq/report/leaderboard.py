"""The leaderboard: one row per cell, from the cells' records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ptq.report.compare import Comparison
from ptq.report.records import atomic_write

TRACK_ORDER = {"A": 0, "B": 1, "C": 2}


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def zero_shot_columns(zero_shot: dict[str, Any] | None) -> dict[str, Any]:
    """Accuracy per zero-shot task and their average, when the cell measured them."""
    if zero_shot is None:
        return {}
    return {"zero_shot_acc": {task: m["acc"] for task, m in zero_shot["tasks"].items() if "acc" in m},
            "zero_shot_acc_avg": zero_shot["average"]["acc"] if zero_shot["average"] else None,
            "zero_shot_limit": zero_shot["limit"]}


def leaderboard_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, ordered by model, track, then quality (failed and skipped cells last)."""
    rows = []
    for record in records:
        metrics = record["metrics"]
        ppl = metrics.get("ppl", {})
        rows.append({
            "cell": record["cell_id"],
            "model": record["model"],
            "method": record["method"],
            "track": record["track"],
            "experiment": record["experiment"],
            "status": record["status"],
            "ppl_wikitext2": ppl.get("wikitext2"),
            "fp_ppl_wikitext2": metrics.get("fp_ppl", {}).get("wikitext2"),
            "ppl_ratio": metrics.get("ppl_ratio"),
            "quant_seconds": metrics.get("quant_seconds"),
            "eval_tokens_per_s": metrics.get("eval_tokens_per_s"),
            "peak_memory_mb": (metrics["peak_memory_bytes"] / 2**20
                               if metrics.get("peak_memory_bytes") is not None else None),
            "peak_added_over_float": metrics.get("peak_added_over_float"),
            **zero_shot_columns(metrics.get("zero_shot")),
            "reason": record["reason"],
        })
    rows.sort(key=lambda r: (r["model"], TRACK_ORDER.get(r["track"], 9), r["status"] != "passed",
                             r["ppl_wikitext2"] if r["ppl_wikitext2"] is not None else float("inf"), r["method"]))
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    # One accuracy column per zero-shot task any cell measured (in percent), then their average.
    tasks = list(dict.fromkeys(task for row in rows for task in row.get("zero_shot_acc", {})))

    def accuracies(row: dict[str, Any]) -> list[str]:
        if not tasks:
            return []
        acc = row.get("zero_shot_acc", {})
        avg = row.get("zero_shot_acc_avg")
        return [_fmt(100 * acc[task] if task in acc else None, 1) for task in tasks] + [
            _fmt(100 * avg if avg is not None else None, 1)]

    table = [
        [
            row["cell"], row["status"], _fmt(row["ppl_wikitext2"], 2), _fmt(row["ppl_ratio"], 3),
            *accuracies(row),
            _fmt(row["quant_seconds"], 1), _fmt(row["eval_tokens_per_s"], 0), _fmt(row["peak_memory_mb"], 0),
            _fmt(row["peak_added_over_float"], 2),
            (row["reason"] or "").replace("\n", " ")[:120],
        ]
        for row in rows
    ]
    acc_headers = [f"acc {task}" for task in tasks] + ["acc avg"] if tasks else []
    headers = ["cell", "status", "PPL wikitext2", "× FP", *acc_headers, "quant s", "eval tok/s", "peak MB",
               "added/float", "reason"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def render_comparison(comparisons: list[Comparison], source: str) -> str:
    table = [[c.cell, c.verdict, _fmt(c.previous, 3), _fmt(c.current, 3),
              "" if c.change is None else f"{c.change:+.2%}"] for c in comparisons]
    return f"Compared with {source}:\n" + tabulate(
        table, headers=["cell", "verdict", "previous PPL", "PPL", "change"], tablefmt="github", disable_numparse=True)


def write_leaderboard(records: list[dict[str, Any]], reports_dir: Path, run_id: str,
                      comparison: tuple[str, list[Comparison]] | None = None) -> tuple[Path, Path]:
    """Write reports/leaderboard.md and reports/leaderboard.json for one run (with, if given, the
    comparison against a previous leaderboard: its source and the per-cell verdicts)."""
    rows = leaderboard_rows(records)
    cells_of: dict[str, list[str]] = {}
    for record in records:
        for note in record["notes"]:
            cells_of.setdefault(note, []).append(record["cell_id"])
    notes = [f"{note} ({', '.join(sorted(cells))})" for note, cells in sorted(cells_of.items())]
    baselines = sorted({f"{r['model']}: {r['config']['model']['baseline_note']}" for r in records
                        if r["config"].get("model", {}).get("baseline_note")})
    md = [f"# Leaderboard (run {run_id})", "", render_table(rows), ""]
    if baselines:
        md += ["## Baselines", ""] + [f"- {line}" for line in baselines] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    payload: dict[str, Any] = {"run_id": run_id, "rows": rows}
    if comparison is not None:
        source, comparisons = comparison
        md += ["## Comparison", "", render_comparison(comparisons, source), ""]
        payload["comparison"] = {"source": source, "cells": [c.to_dict() for c in comparisons]}
    md_path = reports_dir / "leaderboard.md"
    json_path = reports_dir / "leaderboard.json"
    atomic_write(md_path, "\n".join(md))
    atomic_write(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    return md_path, json_path
