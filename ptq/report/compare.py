"""Compare a run's leaderboard with a previous one, cell by cell (lower PPL is better)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptq.errors import ConfigError

METRIC = "ppl_wikitext2"


COMPARED = ("better", "worse", "same")  # verdicts of cells that were compared


@dataclass(frozen=True)
class Comparison:
    cell: str
    previous: float | None
    current: float | None
    change: float | None  # relative: (current - previous) / previous
    verdict: str  # better, worse, same; new, gone, incomparable (not compared)
    reason: str | None = None  # why an incomparable cell was not compared

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_rows(current: list[dict[str, Any]], previous: list[dict[str, Any]], rel_tol: float) -> list[Comparison]:
    """A verdict per cell. Only cells measured under the same configuration (fingerprint) are
    compared: another evaluation setting changes the PPL without any regression. A cell that had
    a metric before and has none now (it failed) is worse."""
    before = {row["cell"]: row for row in previous}
    out = []
    for row in current:
        cell, value = row["cell"], row.get(METRIC)
        old = before.get(cell)
        if old is None or old.get(METRIC) is None:
            out.append(Comparison(cell, None, value, None, "new"))
        elif old.get("fingerprint") != row.get("fingerprint"):
            reason = ("its configuration differs (fingerprint "
                      f"{old.get('fingerprint') or 'not recorded'} before, {row.get('fingerprint')} now)")
            out.append(Comparison(cell, old[METRIC], value, None, "incomparable", reason))
        elif value is None:
            out.append(Comparison(cell, old[METRIC], None, None, "worse"))
        else:
            change = (value - old[METRIC]) / old[METRIC]
            verdict = "worse" if change > rel_tol else "better" if change < -rel_tol else "same"
            out.append(Comparison(cell, old[METRIC], value, change, verdict))
    now = {row["cell"] for row in current}
    out += [Comparison(cell, row.get(METRIC), None, None, "gone") for cell, row in before.items() if cell not in now]
    return out


def nothing_compared(comparisons: list[Comparison]) -> str | None:
    """Why a comparison that compared no cell must fail (a CI gate that compares nothing must not
    pass), or None when some cell was compared."""
    if any(c.verdict in COMPARED for c in comparisons):
        return None
    incomparable = [f"{c.cell}: {c.reason}" for c in comparisons if c.verdict == "incomparable"]
    return ("no cell could be compared with the previous run: "
            + ("; ".join(incomparable) if incomparable else "no cell of this run was in it"))


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a previous run's leaderboard.json, checked (read before any cell runs, so a wrong
    file stops the run at once rather than after every cell)."""
    what = f"--compare {path}"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file; give the leaderboard.json of the run to compare "
                          "with") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read it ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    shape = f'a leaderboard.json: {{"rows": [{{"cell": "<id>", "{METRIC}": <number or null>, ...}}, ...]}}'
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise ConfigError(f"{what}: not {shape}")
    for index, row in enumerate(rows):
        value = row.get(METRIC) if isinstance(row, dict) else None
        if not (isinstance(row, dict) and isinstance(row.get("cell"), str)
                and (value is None or isinstance(value, (int, float)) and not isinstance(value, bool))):
            raise ConfigError(f"{what}: rows[{index}] is {json.dumps(row)[:200]}, not a row of {shape}")
    return rows
