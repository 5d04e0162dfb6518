"""The leaderboard as one self-contained HTML file: inline CSS, a table per track, the figures
embedded as base64 PNGs (no external resources, so the file can be mailed or archived alone)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from ptq.report.compare import Comparison
from ptq.report.leaderboard import by_track, comparison_cells, table_cells
from ptq.report.plots import Plot

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2933; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #cbd2d9; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f4f8; }
td:first-child, td:nth-child(2), td:last-child { text-align: left; }
tr.failed td { background: #fde8e8; }
tr.skipped td { color: #7b8794; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #52606d; max-width: 900px; }
"""


def _table(headers: list[str], cells: list[list[str]], classes: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{escape(cls)}">' + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row, cls in zip(cells, classes))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def render_html(rows: list[dict[str, Any]], run_id: str, baselines: list[str], notes: list[str],
                comparison: tuple[str, list[Comparison]] | None, plots: list[Plot]) -> str:
    parts = [f"<h1>Leaderboard (run {escape(run_id)})</h1>",
             "<p>Δ FP is PPL minus the FP baseline's PPL of the same model and evaluation; × FP their ratio.</p>"]
    for track, group in by_track(rows).items():
        headers, cells = table_cells(group)
        parts += [f"<h2>Track {escape(track)}</h2>", _table(headers, cells, [row["status"] for row in group])]
    if baselines:
        parts += ["<h2>Baselines</h2>", _list(baselines)]
    if notes:
        parts += ["<h2>Notes</h2>", _list(notes)]
    if comparison is not None:
        source, comparisons = comparison
        headers, cells = comparison_cells(comparisons)
        parts += [f"<h2>Comparison with {escape(source)}</h2>",
                  _table(headers, cells, [c.verdict for c in comparisons])]
    if plots:
        parts.append("<h2>Figures</h2>")
    for plot in plots:
        data = base64.b64encode(plot.png).decode("ascii")
        parts.append(f'<figure><img alt="{escape(plot.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption><b>{escape(plot.title)}.</b> {escape(plot.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ptq-bench leaderboard {escape(run_id)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
