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


def write_reports(records: list[dict[str, Any]], reports_dir: Path, run_id: str,
                  comparison: tuple[str, list[Comparison]] | None = None) -> list[Path]:
    """Write the leaderboard (Markdown, JSON, HTML) and its figures; return the paths written.
    Figures of an earlier run that this one has no data for are removed, so none is stale."""
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
    texts = {
        "leaderboard.md": render_leaderboard(records, run_id, comparison, figures),
        "leaderboard.json": json.dumps(leaderboard_payload(records, run_id, comparison), indent=2, default=str) + "\n",
        "leaderboard.html": render_html(records, run_id, comparison, plots),
    }
    for name, text in texts.items():
        atomic_write(reports_dir / name, text)
        written.append(reports_dir / name)
    return written
