"""The leaderboard as text: reports/leaderboard.md, and the shorter version the pytest plugin
prints at the end of a session. Both open with the run's summary and end with the glossary."""

from __future__ import annotations

from typing import Any

from ptq.report.compare import Comparison
from tabulate import tabulate

from ptq.report.leaderboard import (
    cached_cells,
    leaderboard_rows,
    methods_as_run,
    notes_of,
    render_comparison,
    render_tracks,
    seed_spread,
    sweep_tables,
    track_descriptions,
)
from ptq.report.summary import glossary, run_summary


def render_leaderboard(records: list[dict[str, Any]], run_id: str,
                       comparison: tuple[str, list[Comparison]] | None = None,
                       figures: list[tuple[str, str, str]] = ()) -> str:
    """The Markdown leaderboard: the summary, a table per track, the glossary, then notes, the cells
    served from the cache, the comparison with a previous run and the figures (title, relative
    path, caption)."""
    rows = leaderboard_rows(records)
    md = [f"# Leaderboard (run {run_id})", ""]
    md += [f"- **{label}:** {text}" for label, text in run_summary(records, run_id)] + [""]
    md += [render_tracks(rows, track_descriptions(records)), ""]
    for experiment, table in sweep_tables(rows).items():
        md += [f"## {experiment}", "", "The experiment's cells as a study lays them out: a row per setting of "
               "its sweep and method, o where a stage ran.", "",
               tabulate(table.cells, headers=table.headers, tablefmt="github", disable_numparse=True), ""]
    if spread := seed_spread(rows):
        md += ["## Spread over calibration seeds", "", "Mean ± standard deviation over the seeds each cell ran "
               "with (experiment.seeds).", "",
               tabulate(spread.cells, headers=spread.headers, tablefmt="github", disable_numparse=True), ""]
    if methods := methods_as_run(records):
        md += ["## Methods as run", ""] + [f"- {line}" for line in methods] + [""]
    md += ["## Glossary", ""]
    md += [f"- **{term}:** {text}" for term, text in glossary(records, rows)] + [""]
    if notes := notes_of(records):
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    if cached := cached_cells(records):
        md += ["## Cache", "", f"Metrics of {len(cached)} of {len(records)} cells are from the on-disk "
               f"cache, as measured on the run that stored them: {', '.join(cached)}.", ""]
    if comparison is not None:
        source, comparisons = comparison
        md += ["## Comparison", "", render_comparison(comparisons, source), ""]
    if figures:
        md += ["## Figures", ""]
        for title, path, caption in figures:
            md += [f"![{title}]({path})", "", f"*{caption}*", ""]
    return "\n".join(md)


def render_terminal(records: list[dict[str, Any]], run_id: str) -> str:
    """What a session prints: the tables, then the summary and the glossary, one line each."""
    rows = leaderboard_rows(records)
    lines = [render_tracks(rows), ""]
    lines += [f"{label}: {text}" for label, text in run_summary(records, run_id)] + [""]
    lines += [f"{term}: {text}" for term, text in glossary(records, rows)]
    return "\n".join(lines)
