"""Compare a run's leaderboard with a previous one, cell by cell (lower PPL is better)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METRIC = "ppl_wikitext2"


@dataclass(frozen=True)
class Comparison:
    cell: str
    previous: float | None
    current: float | None
    change: float | None  # relative: (current - previous) / previous
    verdict: str  # better, worse, same, new, gone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_rows(current: list[dict[str, Any]], previous: list[dict[str, Any]], rel_tol: float) -> list[Comparison]:
    """A verdict per cell. A cell that had a metric before and has none now (it failed) is worse."""
    before = {row["cell"]: row.get(METRIC) for row in previous}
    now = {row["cell"]: row.get(METRIC) for row in current}
    out = []
    for cell, value in now.items():
        if cell not in before or before[cell] is None:
            out.append(Comparison(cell, before.get(cell), value, None, "new"))
        elif value is None:
            out.append(Comparison(cell, before[cell], None, None, "worse"))
        else:
            change = (value - before[cell]) / before[cell]
            verdict = "worse" if change > rel_tol else "better" if change < -rel_tol else "same"
            out.append(Comparison(cell, before[cell], value, change, verdict))
    out += [Comparison(cell, value, None, None, "gone") for cell, value in before.items() if cell not in now]
    return out


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"]
