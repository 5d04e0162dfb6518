"""The leaderboard as one self-contained HTML file, read at a glance from 800 px wide up: the
run's summary, a table per track (short cell names, constant columns folded into one line under
the table, headers explained on hover and in the glossary), the figures (embedded base64 PNGs),
then notes. Inline CSS and no external resources, so the file can be mailed or archived alone."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from ptq.report.compare import Comparison
from ptq.report.leaderboard import (
    LABEL,
    Table,
    by_track,
    cached_cells,
    comparison_cells,
    constant_line,
    leaderboard_rows,
    make_table,
    methods_as_run,
    notes_of,
    seed_spread,
    sweep_tables,
    track_descriptions,
)
from ptq.report.plots import Plot
from ptq.report.records import STATUSES
from ptq.report.summary import duration, glossary, run_summary, span, tracks_of

TEXT_COLUMNS = ("label", "cell", "status", "verdict", "stages")  # left-aligned; the others are numbers
IN_LISTS = ("reason",)  # columns given as a list under each table instead
WARNING_ITEMS = ("Full precision",)  # summary items shown as a warning: they qualify every number
REASON_CHARS = 400  # of a failed or skipped cell's reason, under its table

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1200px;
       color: #1f2933; line-height: 1.4; }
h1 { margin-bottom: 0.1em; } h1 + p { margin-top: 0; color: #52606d; }
h2 { margin: 1.4em 0 0.3em; border-bottom: 1px solid #e4e7eb; }
dl { display: grid; grid-template-columns: fit-content(14em) 1fr; gap: 0.2em 1em; margin: 0.5em 0;
     font-size: 0.9em; }
dt { font-weight: 600; } dd { margin: 0; }
dd.warning, dt.warning { background: #fff3c4; }
table { border-collapse: collapse; margin: 0.3em 0 0.2em; font-size: 0.85em; }
th, td { border: 1px solid #cbd2d9; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f0f4f8; white-space: normal; vertical-align: bottom; cursor: help; }
.text { text-align: left; }
td.stages { white-space: normal; min-width: 9em; }  /* "smoothquant 31.3 + rtn 0.3, walk 72.5" wraps */
div.table { overflow-x: auto; }  /* the last resort of a table too wide even so: it scrolls, not the page */
tr.failed td { background: #fde8e8; }
tr.skipped td { color: #7b8794; }
p.track { margin: 0; color: #52606d; font-size: 0.9em; }
p.constant { margin: 0 0 0.5em; color: #52606d; font-size: 0.8em; }
ul.reasons { margin: 0.2em 0 0.5em; padding-left: 1.2em; font-size: 0.8em; color: #9b2c2c; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #52606d; max-width: 900px; }
@media (max-width: 900px) {
  body { padding: 0 0.5em; }
  table { font-size: 0.7em; }
  th, td { padding: 0.2em 0.25em; }
}
@media (min-width: 1150px) {  /* wide: the caption beside its figure, which stays at its drawn size */
  figure { display: flex; gap: 1.5em; align-items: flex-start; }
  figcaption { max-width: 26em; padding-top: 2em; }
}
@media (max-width: 600px) { dl { grid-template-columns: 1fr; } dd { margin: 0 0 0.4em 1em; } }
"""


def _attributes(key: str, title: str) -> str:
    text = ' class="text"' if key in TEXT_COLUMNS else ""
    return text + (f' title="{escape(title)}"' if title else "")


def _breakable(header: str) -> str:
    """A header that may wrap after "/" and "_" too (bits/weight, acc arc_challenge), not only at spaces."""
    return escape(header).replace("/", "/<wbr>").replace("_", "_<wbr>")


def _table(headers: list[str], cells: list[list[str]], classes: list[str], keys: list[str],
           titles: list[str] | None = None) -> str:
    titles = titles or [""] * len(headers)
    head = "".join(f"<th{_attributes(key, title)}>{_breakable(header)}</th>"
                   for header, title, key in zip(headers, titles, keys))
    starts = [f'<td class="text {key}">' if key in TEXT_COLUMNS else "<td>" for key in keys]
    body = "".join(f'<tr class="{escape(cls)}">'
                   + "".join(f"{start}{escape(cell)}</td>" for cell, start in zip(row, starts)) + "</tr>"
                   for row, cls in zip(cells, classes))
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _track_table(table: Table, statuses: list[str]) -> str:
    return _table(table.headers, table.cells, statuses, [c.key for c in table.columns],
                  [c.description for c in table.columns])


def _reasons(rows: list[dict[str, Any]]) -> str:
    """Why the failed and skipped rows of a table failed or were skipped, under it: a reason is too
    long for a column that would widen every row."""
    items = [f"<li><b>{escape(row['label'])}</b> {escape(row['status'])}: "
             f"{escape(' '.join((row['reason'] or 'no reason recorded').split())[:REASON_CHARS])}</li>"
             for row in rows if row["status"] != "passed"]
    return f'<ul class="reasons">{"".join(items)}</ul>' if items else ""


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def _definitions(items: list[tuple[str, str]]) -> str:
    def cls(term: str) -> str:
        return ' class="warning"' if term in WARNING_ITEMS else ""
    return "<dl>" + "".join(f"<dt{cls(term)}>{escape(term)}</dt><dd{cls(term)}>{escape(text)}</dd>"
                            for term, text in items) + "</dl>"


def _headline(records: list[dict[str, Any]], run_id: str) -> str:
    """One line under the title: models, tracks, outcome, when and how long."""
    models = ", ".join(sorted({r["model"] for r in records}))
    counts = ", ".join(f"{n} {status}" for status in STATUSES
                       if (n := sum(r["status"] == status for r in records)))
    started, seconds = span(records)
    return escape(f"{models} · tracks {' '.join(tracks_of(records))} · {len(records)} cells: {counts} · "
                  f"run {run_id}, {started:%Y-%m-%d}, {duration(seconds)}")


def render_html(records: list[dict[str, Any]], run_id: str, comparison: tuple[str, list[Comparison]] | None,
                plots: list[Plot], interrupted: str | None = None) -> str:
    """The report as one page; `interrupted` (the note of a run stopped early) heads it."""
    rows = leaderboard_rows(records)
    descriptions = track_descriptions(records)
    parts = ["<h1>ptq-bench leaderboard</h1>", f"<p>{_headline(records, run_id)}</p>"]
    if interrupted:
        parts.append(f'<p class="warning"><b>{escape(interrupted)}</b></p>')
    parts += ["<h2>Summary</h2>", _definitions(run_summary(records, run_id))]
    for track, group in by_track(rows).items():
        table = make_table(group, LABEL, IN_LISTS)
        parts.append(f"<h2>Track {escape(track)}</h2>")
        if track in descriptions:
            parts.append(f'<p class="track">{escape(descriptions[track])}</p>')
        parts.append(_track_table(table, [row["status"] for row in group]))
        if note := constant_line(table):
            parts.append(f'<p class="constant">{escape(note)}</p>')
        parts.append(_reasons(group))
    for experiment, table in sweep_tables(rows).items():
        parts += [f"<h2>{escape(experiment)}</h2>", "<p>The experiment's cells as a study lays them out: a row "
                  "per setting of its sweep and method, o where a stage ran.</p>",
                  _table(table.headers, table.cells, [""] * len(table.cells),
                         ["label"] + [""] * (len(table.headers) - 1))]
    if spread := seed_spread(rows):
        parts += ["<h2>Spread over calibration seeds</h2>", "<p>Mean ± standard deviation over the seeds each "
                  "cell ran with (experiment.seeds).</p>",
                  _table(spread.headers, spread.cells, [""] * len(spread.cells),
                         ["label"] + [""] * (len(spread.headers) - 1))]
    if methods := methods_as_run(records):
        parts += ["<h2>Methods as run</h2>", _list(methods)]
    parts += ["<h2>Glossary</h2>", _definitions(glossary(records, rows, LABEL, IN_LISTS))]
    if plots:
        parts.append("<h2>Figures</h2>")
    for plot in plots:
        data = base64.b64encode(plot.png).decode("ascii")
        parts.append(f'<figure><img alt="{escape(plot.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption><b>{escape(plot.title)}.</b> {escape(plot.caption)}</figcaption></figure>")
    if notes := notes_of(records):
        parts += ["<h2>Notes</h2>", _list(notes)]
    if cached := cached_cells(records):
        parts += ["<h2>Cache</h2>", f"<p>Metrics of {len(cached)} of {len(records)} cells are from the "
                  f"on-disk cache, as measured on the run that stored them: {escape(', '.join(cached))}.</p>"]
    if comparison is not None:
        source, comparisons = comparison
        headers, cells = comparison_cells(comparisons)
        parts += [f"<h2>Comparison with {escape(source)}</h2>",
                  _table(headers, cells, [c.verdict for c in comparisons], ["cell", "verdict"] + [""] * 3)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>ptq-bench leaderboard {escape(run_id)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
