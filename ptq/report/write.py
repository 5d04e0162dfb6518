"""Every report artefact of a run, written in one place (used by the pytest plugin and by
`python -m ptq.report merge`): leaderboard.md, leaderboard.json, leaderboard.html and the
figures under plots/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ptq.report.compare import Comparison
from ptq.report.html import render_html
from ptq.report.leaderboard import leaderboard_payload, leaderboard_rows
from ptq.report.markdown import render_leaderboard
from ptq.report.plots import render_plots
from ptq.report.records import atomic_write

PLOTS_DIR = "plots"


def interrupted_note(interrupted: str, records: list[dict[str, Any]]) -> str:
    """What a leaderboard of an interrupted run says first."""
    return (f"Interrupted ({interrupted}): this run stopped after {len(records)} finished cell(s); the "
            "leaderboard holds only those. Cells that had not finished have no record.")


def write_reports(records: list[dict[str, Any]], reports_dir: Path, run_id: str,
                  comparison: tuple[str, list[Comparison]] | None = None,
                  interrupted: str | None = None) -> list[Path]:
    """Write the leaderboard (Markdown, JSON, HTML) and its figures; return the paths written.
    Figures of an earlier run that this one has no data for are removed, so none is stale.
    `interrupted` (what stopped the run: Ctrl-C, SIGTERM) marks the leaderboard as partial:
    a note under the Markdown title, and the JSON's `interrupted` (absent for a whole run)."""
    rows = leaderboard_rows(records)
    plots = render_plots(rows)
    plots_dir = reports_dir / PLOTS_DIR
    for stale in set(plots_dir.glob("*.png")) - {plots_dir / plot.name for plot in plots}:
        stale.unlink()
    written = []
    for plot in plots:
        atomic_write(plots_dir / plot.name, plot.png)
        written.append(plots_dir / plot.name)
    figures = [(plot.title, f"{PLOTS_DIR}/{plot.name}", plot.caption) for plot in plots]
    markdown = render_leaderboard(records, run_id, comparison, figures)
    payload = leaderboard_payload(records, run_id, comparison)
    if interrupted is not None:
        note = interrupted_note(interrupted, records)
        title, rest = markdown.split("\n", 1)
        markdown = f"{title}\n\n**{note}**\n{rest}"
        payload["interrupted"] = {"by": interrupted, "finished_cells": len(records), "note": note}
    texts = {
        "leaderboard.md": markdown,
        "leaderboard.json": json.dumps(payload, indent=2, default=str) + "\n",
        "leaderboard.html": render_html(records, run_id, comparison, plots,
                                        payload.get("interrupted", {}).get("note")),
    }
    for name, text in texts.items():
        atomic_write(reports_dir / name, text)
        written.append(reports_dir / name)
    return written
