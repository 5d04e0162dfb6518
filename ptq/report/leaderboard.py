"""The leaderboard: one row per cell, from the cells' records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tabulate import tabulate

from ptq.report.compare import Comparison

TRACK_ORDER = {"A": 0, "B": 1, "C": 2}


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


ACC_PREFIX = "acc "  # row keys "acc <task>" and "acc avg": zero-shot accuracy, a fraction


def zero_shot_columns(zero_shot: dict[str, Any] | None) -> dict[str, Any]:
    """Accuracy per zero-shot task and their average, when the cell measured them."""
    if zero_shot is None:
        return {}
    accuracies = {f"{ACC_PREFIX}{task}": m["acc"] for task, m in zero_shot["tasks"].items() if "acc" in m}
    return {**accuracies, f"{ACC_PREFIX}avg": zero_shot["average"]["acc"] if zero_shot["average"] else None,
            "zero_shot_limit": zero_shot["limit"],
            "zero_shot_sampling": zero_shot.get("sampling", "random")}  # records before the field: random


def leaderboard_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, ordered by model, track, then quality (failed and skipped cells last)."""
    rows = []
    for record in records:
        metrics = record["metrics"]
        ppl = metrics.get("ppl", {}).get("wikitext2")
        fp_ppl = metrics.get("fp_ppl", {}).get("wikitext2")
        kv = metrics.get("kv", {})
        rows.append({
            "cell": record["cell_id"],
            "model": record["model"],
            "method": record["method"],
            "variant": record.get("variant"),
            "track": record["track"],
            "experiment": record["experiment"],
            "status": record["status"],
            "ppl_wikitext2": ppl,
            "fp_ppl_wikitext2": fp_ppl,
            "ppl_delta": _difference(ppl, fp_ppl),
            "ppl_ratio": metrics.get("ppl_ratio"),
            "bits_per_weight": metrics.get("bits_per_weight"),
            "kv_bytes_per_token": kv.get("bytes_per_token"),
            "kv_float_bytes_per_token": kv.get("float_bytes_per_token"),
            "kv_bits_per_element": kv.get("bits_per_element"),
            "passkey_accuracy": metrics.get("passkey", {}).get("accuracy"),
            "decode_tokens_per_s": metrics.get("decode_tokens_per_s"),
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


@dataclass(frozen=True)
class Column:
    """One leaderboard column, shared by the Markdown, terminal and HTML renderings."""

    key: str  # in a leaderboard row
    header: str
    format: Callable[[Any], str]
    optional: bool = False  # shown only when some row has a value (e.g. KV metrics: Track C with them)


def _number(digits: int, signed: bool = False) -> Callable[[Any], str]:
    return lambda value: "" if value is None else f"{value:{'+' if signed else ''}.{digits}f}"


COLUMNS: tuple[Column, ...] = (
    Column("cell", "cell", str),
    Column("status", "status", str),
    Column("ppl_wikitext2", "PPL wikitext2", _number(2)),
    Column("ppl_delta", "Δ FP", _number(2, signed=True)),
    Column("ppl_ratio", "× FP", _number(3)),
    Column("bits_per_weight", "bits/weight", _number(3), optional=True),
    Column("kv_bytes_per_token", "KV B/token", _number(0), optional=True),
    Column("kv_float_bytes_per_token", "float KV B/token", _number(0), optional=True),
    Column("kv_bits_per_element", "KV bits/elem", _number(2), optional=True),
    Column("passkey_accuracy", "passkey", _number(2), optional=True),
    Column("decode_tokens_per_s", "decode tok/s", _number(1), optional=True),
    Column("quant_seconds", "quant s", _number(1)),
    Column("eval_tokens_per_s", "eval tok/s", _number(0)),
    Column("peak_memory_mb", "peak MB", _number(0)),
    Column("peak_added_over_float", "added/float", _number(2)),
    Column("reason", "reason", lambda value: (value or "").replace("\n", " ")[:120]),
)


def visible_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The columns some row has a value for, with one accuracy column (in percent) per
    zero-shot task any row measured, then their average, after the PPL columns."""
    columns = [c for c in COLUMNS if not c.optional or any(row.get(c.key) is not None for row in rows)]
    accuracy_keys = list(dict.fromkeys(key for row in rows for key in row if key.startswith(ACC_PREFIX)))
    accuracy_keys.sort(key=lambda key: key == f"{ACC_PREFIX}avg")  # the average last
    percent = _number(1)
    accuracy = [Column(key, key, lambda value: percent(None if value is None else 100 * value))
                for key in accuracy_keys]
    at = next(i for i, c in enumerate(columns) if c.key == "ppl_ratio") + 1
    return columns[:at] + accuracy + columns[at:]


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the rows, over the columns they have values for."""
    columns = visible_columns(rows)
    return [c.header for c in columns], [[c.format(row.get(c.key)) for c in columns] for row in rows]


def by_track(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each track, tracks in A, B, C order, rows in leaderboard order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: TRACK_ORDER.get(r["track"], 9)):  # stable: keeps the row order
        groups.setdefault(row["track"], []).append(row)
    return groups


def render_table(rows: list[dict[str, Any]]) -> str:
    headers, cells = table_cells(rows)
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


def render_tracks(rows: list[dict[str, Any]]) -> str:
    """One table per track, each under a Markdown heading."""
    return "\n\n".join(f"## Track {track}\n\n{render_table(group)}" for track, group in by_track(rows).items())


def comparison_cells(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of a comparison with a previous run."""
    return ["cell", "verdict", "previous PPL", "PPL", "change"], [
        [c.cell, c.verdict, _number(3)(c.previous), _number(3)(c.current), "" if c.change is None else f"{c.change:+.2%}"]
        for c in comparisons]


def render_comparison(comparisons: list[Comparison], source: str) -> str:
    headers, cells = comparison_cells(comparisons)
    return f"Compared with {source}:\n" + tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


def notes_of(records: list[dict[str, Any]]) -> list[str]:
    """Each distinct note of the records, with the cells that carry it."""
    cells_of: dict[str, list[str]] = {}
    for record in records:
        for note in record["notes"]:
            cells_of.setdefault(note, []).append(record["cell_id"])
    return [f"{note} ({', '.join(sorted(cells))})" for note, cells in sorted(cells_of.items())]


def cached_cells(records: list[dict[str, Any]]) -> list[str]:
    """Cells whose metrics this run read from the on-disk cache instead of measuring them."""
    return sorted(r["cell_id"] for r in records if r["cache"].get("metrics") == "hit")


def baselines_of(records: list[dict[str, Any]]) -> list[str]:
    """What "full precision" means for each model (its config's baseline note)."""
    return sorted({f"{r['model']}: {r['config']['model']['baseline_note']}" for r in records
                   if r["config"].get("model", {}).get("baseline_note")})


def render_leaderboard(records: list[dict[str, Any]], run_id: str,
                       comparison: tuple[str, list[Comparison]] | None = None,
                       figures: list[tuple[str, str, str]] = ()) -> str:
    """The Markdown leaderboard: a table per track, then baselines, notes, the comparison with a
    previous run and the figures (title, relative path, caption)."""
    md = [f"# Leaderboard (run {run_id})", "",
          "Δ FP is PPL minus the FP baseline's PPL of the same model and evaluation; × FP their ratio.", "",
          render_tracks(leaderboard_rows(records)), ""]
    if baselines := baselines_of(records):
        md += ["## Baselines", ""] + [f"- {line}" for line in baselines] + [""]
    if notes := notes_of(records):
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    if cached := cached_cells(records):
        md += ["## Cache", "", f"Metrics of {len(cached)} of {len(records)} cells are from the on-disk cache, "
               f"as measured on the run that stored them: {', '.join(cached)}.", ""]
    if comparison is not None:
        source, comparisons = comparison
        md += ["## Comparison", "", render_comparison(comparisons, source), ""]
    if figures:
        md += ["## Figures", ""]
        for title, path, caption in figures:
            md += [f"![{title}]({path})", "", f"*{caption}*", ""]
    return "\n".join(md)


def leaderboard_payload(records: list[dict[str, Any]], run_id: str,
                        comparison: tuple[str, list[Comparison]] | None = None) -> dict[str, Any]:
    """The JSON leaderboard: the rows and, if any, the comparison with a previous run."""
    payload: dict[str, Any] = {"run_id": run_id, "rows": leaderboard_rows(records)}
    if comparison is not None:
        source, comparisons = comparison
        payload["comparison"] = {"source": source, "cells": [c.to_dict() for c in comparisons]}
    return payload
