"""The leaderboard: one row per cell, from the cells' records."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from tabulate import tabulate

from ptq.report.compare import Comparison

TRACK_ORDER = {"A": 0, "B": 1, "C": 2}


def nested(mapping: Any, *path: str) -> Any:
    """The value at `path` in nested dicts, None where a level is missing (a record of a cell that
    failed early, or of an older schema, lacks some levels)."""
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


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


BASELINE_METHOD = "fp16"  # the registered name of the float baseline (ptq.registry.baseline_method)
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def baseline_label(dtype: str | None) -> str:
    """How the float baseline is shown: in the dtype it ran in (its method is named fp16 whatever
    the dtype, float32 on CPU)."""
    return f"float ({DTYPE_NAMES.get(dtype, dtype)})" if dtype else "float"


def cell_label(record: dict[str, Any], one_model: bool) -> str:
    """A cell's short name for tables and figures: its id without the model (when the report has
    one) and without the track (its table or panel says it), the baseline's method shown as
    `baseline_label`. `smollm2-135m-kivi-int2-C` -> `kivi-int2`; `m-rtn-A-w3a16` -> `rtn · w3a16`."""
    cell, model, track, experiment = record["cell_id"], record["model"], record["track"], record["experiment"]
    for suffix in (f"-{track}", f"-{track}-{experiment}"):
        if cell.endswith(suffix):
            cell = cell.removesuffix(suffix) + (f" · {experiment}" if suffix != f"-{track}" else "")
            break
    name = cell.removeprefix(f"{model}-")
    if record["method"] == BASELINE_METHOD and name.startswith(BASELINE_METHOD):
        name = baseline_label(nested(record, "config", "model", "dtype")) + name.removeprefix(BASELINE_METHOD)
    return name if one_model else f"{model} {name}"


PPL_PREFIX = "ppl "  # row keys "ppl <dataset>": perplexity on each evaluated dataset


def stages_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages the cell's pipeline ran (name, params, added), from its resolved configuration."""
    return list(nested(record, "config", "method", "stages") or [])


def stage_times(record: dict[str, Any]) -> str | None:
    """Seconds per stage of a pipeline of several stages ("awq 35.2 + gptq 61.0, walk 20.1");
    None for one stage (its time is the quant seconds)."""
    seconds = nested(record, "metrics", "stage_seconds") or {}
    stages = stages_of(record)
    if len(stages) < 2 or not seconds:
        return None
    text = " + ".join(f"{stage['name']} {seconds.get(stage['name'], 0.0):.1f}" for stage in stages)
    return text + (f", walk {seconds['engine']:.1f}" if "engine" in seconds else "")


def methods_as_run(records: list[dict[str, Any]]) -> list[str]:
    """Each method (pipeline) of the records with its stages and their parameters, once."""
    described: dict[str, str] = {}
    for record in records:
        stages = stages_of(record)
        if record["method"] == BASELINE_METHOD or not stages:
            continue
        parts = []
        for stage in stages:
            params = ", ".join(f"{key}={value}" for key, value in (stage.get("params") or {}).items())
            parts.append(f"{stage['name']}({params})" + (" (added: nothing else rounds the weights)"
                                                          if stage.get("added") else ""))
        described.setdefault(record["method"], " then ".join(parts))
    return [f"{method}: {text}" for method, text in described.items()]


def leaderboard_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, ordered by model, track, then quality (failed and skipped cells last). The
    differences to the float baseline are on the first evaluated dataset (the gated one)."""
    rows = []
    one_model = len({record["model"] for record in records}) == 1
    for record in records:
        metrics = record["metrics"]
        ppls = metrics.get("ppl", {})
        first = next(iter(ppls), "wikitext2")
        ppl = ppls.get(first)
        fp_ppl = metrics.get("fp_ppl", {}).get(first)
        kv = metrics.get("kv", {})
        rows.append({
            "cell": record["cell_id"],
            "fingerprint": record["config_fingerprint"],
            "label": cell_label(record, one_model),
            "model": record["model"],
            "method": record["method"],
            "variant": record.get("variant"),
            "setting": record.get("setting"),
            "stage_names": [stage["name"] for stage in stages_of(record) if not stage.get("added")],
            "track": record["track"],
            "experiment": record["experiment"],
            "status": record["status"],
            "ppl_wikitext2": ppls.get("wikitext2"),
            **{f"{PPL_PREFIX}{name}": value for name, value in ppls.items() if name != "wikitext2"},
            "fp_ppl_wikitext2": metrics.get("fp_ppl", {}).get("wikitext2"),
            "stages": stage_times(record),
            "ppl_delta": _difference(ppl, fp_ppl),
            "ppl_ratio": metrics.get("ppl_ratio"),
            "ppl_ratio_ci": metrics.get("ppl_ratio_ci", {}).get(first),
            "kld": metrics.get("kld", {}).get(first, {}).get("mean"),
            "top1_agreement": metrics.get("kld", {}).get(first, {}).get("top1_agreement"),
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
    description: str  # for the glossary
    optional: bool = False  # shown only when some row has a value (e.g. KV metrics: Track C with them)
    keep: bool = False  # shown even when every row of a table has the same value


def _number(digits: int, signed: bool = False) -> Callable[[Any], str]:
    return lambda value: "" if value is None else f"{value:{'+' if signed else ''}.{digits}f}"


SIMULATED = " (sim.)"  # header suffix of the speeds that time the simulation, see SIMULATION_NOTE
SIMULATION_NOTE = (
    "Quantized weights are stored dequantized (fake-quantized), and activations (Track B) and KV caches "
    "(Track C) are quantized and dequantized in float as they flow, so tokens/s and memory measure this "
    "simulation on this hardware, not a deployment with low-bit kernels.")

CELL = Column("cell", "cell", str, "the cell id: model-method[-variant][-calibration set]-track"
              "[-experiment]; its record is runs/<run id>/<cell id>.json", keep=True)
LABEL = Column("label", "cell", str, "method[-variant][-calibration set] of the cell (the model and track "
               "are in the headings); the float baseline (method fp16) is named by the dtype it ran in",
               keep=True)
COLUMNS: tuple[Column, ...] = (
    CELL,
    Column("status", "status", str,
           "passed, failed (the method raised or a quality gate failed: see reason) or skipped"),
    Column("ppl_wikitext2", "PPL wikitext2", _number(2),
           "perplexity on WikiText-2 test windows (lower is better)", keep=True),
    Column("ppl_delta", "Δ FP", _number(2, signed=True),
           "PPL minus the float baseline's PPL (same model and evaluation; on the first PPL dataset)"),
    Column("ppl_ratio", "× FP", _number(3), "PPL divided by the float baseline's PPL"),
    Column("ppl_ratio_ci", "95% CI", lambda ci: "" if ci is None else f"{ci['low']:.3f}–{ci['high']:.3f}",
           "95% paired bootstrap interval of × FP: the evaluation windows resampled jointly for the cell and "
           "the float baseline (ptq/stats.py); the evaluation's noise, not the calibration's",
           optional=True),
    Column("kld", "KLD", _number(4),
           "mean KL divergence from the float model's next-token distribution to the cell's, per token (nats), "
           "on the same windows (ptq/eval/kld.py: top-32 exact, tail estimated from 16 samples)", optional=True),
    Column("top1_agreement", "same top-1", lambda value: "" if value is None else f"{100 * value:.1f}%",
           "share of positions where the cell's most likely next token is the float model's", optional=True),
    Column("bits_per_weight", "bits/weight", _number(3),
           "stored bits per weight of the blocks' linear layers: code bits plus 16-bit scales (and zero "
           "points) per group; float cells count their dtype", optional=True),
    Column("kv_bytes_per_token", "KV B/token", _number(0),
           "bytes the KV cache stores per token, all layers: codes, scales, zero points and any "
           "full-precision window, after the decoding probe", optional=True),
    Column("kv_float_bytes_per_token", "float KV B/token", _number(0),
           "the same for a float cache in the model's dtype", optional=True),
    Column("kv_bits_per_element", "KV bits/elem", _number(2),
           "KV-cache bits per stored key or value element, overheads included (a float32 cache: 32)",
           optional=True),
    Column("passkey_accuracy", "passkey", _number(2),
           "fraction of passkey trials answered exactly: a five-digit key hidden in filler text, answered "
           "greedily through the cache", optional=True),
    Column("decode_tokens_per_s", "decode tok/s" + SIMULATED, _number(1),
           "greedy decoding tokens per second through the cache after a prompt (simulated, see below)",
           optional=True),
    Column("quant_seconds", "quant s", _number(1),
           "seconds the quantization step took, calibration included, evaluation excluded"),
    Column("stages", "stage s", lambda value: value or "",
           "seconds per stage of a pipeline of several methods, and of the block walk's own forwards "
           "(capture, propagation)", optional=True),
    Column("eval_tokens_per_s", "eval tok/s" + SIMULATED, _number(0),
           "tokens per second of the perplexity evaluation (simulated, see below)"),
    Column("peak_memory_mb", "peak MB", _number(0),
           "peak memory of the process during the cell, the loaded float model included (on CPU what "
           "malloc has handed out, glibc's count, else the RSS; allocated memory on GPU), in MiB"),
    Column("peak_added_over_float", "added/float", _number(2),
           "peak memory added during the cell over its start, as a multiple of the float model's size"),
    Column("reason", "reason", lambda value: (value or "").replace("\n", " ")[:120],
           "why the cell failed or was skipped"),
)
ACCURACY_DESCRIPTION = ("zero-shot accuracy in percent through lm-eval, per task (acc <task>) and their mean "
                        "(acc avg)")


def visible_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The columns some row has a value for, with one accuracy column (in percent) per
    zero-shot task any row measured, then their average, after the PPL columns."""
    columns = [c for c in COLUMNS if not c.optional or any(row.get(c.key) is not None for row in rows)]
    accuracy_keys = list(dict.fromkeys(key for row in rows for key in row if key.startswith(ACC_PREFIX)))
    accuracy_keys.sort(key=lambda key: key == f"{ACC_PREFIX}avg")  # the average last
    percent = _number(1)
    accuracy = [Column(key, key, lambda value: percent(None if value is None else 100 * value),
                       ACCURACY_DESCRIPTION) for key in accuracy_keys]
    at = max(i for i, c in enumerate(columns) if c.key in ("ppl_ratio", "ppl_ratio_ci")) + 1
    datasets = list(dict.fromkeys(key.removeprefix(PPL_PREFIX) for row in rows for key in row
                                  if key.startswith(PPL_PREFIX) and row[key] is not None))
    perplexities = [Column(f"{PPL_PREFIX}{name}", f"PPL {name}", _number(2),
                           f"perplexity on the {name} evaluation windows (lower is better)") for name in datasets]
    return columns[:at] + perplexities + accuracy + columns[at:]


@dataclass(frozen=True)
class Table:
    """A table's columns and formatted cells, without the columns that tell nothing about its
    rows: those empty in every row, and those with one value in two rows or more and empty in
    none but failed or skipped rows, which `constant` lists once as (header, value)."""

    columns: list[Column]
    cells: list[list[str]]
    constant: list[tuple[str, str]]

    @property
    def headers(self) -> list[str]:
        return [column.header for column in self.columns]


def make_table(rows: list[dict[str, Any]], first: Column = CELL, leave_out: tuple[str, ...] = ()) -> Table:
    """The table of `rows`, its first column `first` (the cell id, or `LABEL`'s short name), without
    the columns of keys `leave_out` (shown elsewhere)."""
    columns = [first if column is CELL else column for column in visible_columns(rows)
               if column.key not in leave_out]
    shown, constant = [], []
    for column in columns:
        values = [column.format(row.get(column.key)) for row in rows]
        present = [value for value, row in zip(values, rows) if value or row["status"] == "passed"]
        if column.keep:
            shown.append((column, values))
        elif len(present) > 1 and len(set(present)) == 1:
            if present[0]:
                constant.append((column.header, present[0]))
        elif any(values):
            shown.append((column, values))
    cells = [list(row) for row in zip(*(values for _, values in shown))]
    return Table([column for column, _ in shown], cells, constant)


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the rows (see `make_table`)."""
    table = make_table(rows)
    return table.headers, table.cells


def by_track(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each track, tracks in A, B, C order, rows in leaderboard order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: TRACK_ORDER.get(r["track"], 9)):  # stable: keeps the row order
        groups.setdefault(row["track"], []).append(row)
    return groups


def constant_line(table: Table) -> str:
    """The values a table leaves out because every row has them."""
    return ("Same in every row: " + ", ".join(f"{header} {value}" for header, value in table.constant) + "."
            if table.constant else "")


def render_table(rows: list[dict[str, Any]]) -> str:
    table = make_table(rows)
    return tabulate(table.cells, headers=table.headers, tablefmt="github", disable_numparse=True)


def render_tracks(rows: list[dict[str, Any]], descriptions: dict[str, str] | None = None) -> str:
    """One table per track, each under a Markdown heading, with the track's description when given
    and the values every row shares."""
    sections = []
    for track, group in by_track(rows).items():
        lines = [f"## Track {track}", ""]
        if descriptions and descriptions.get(track):
            lines += [f"*{descriptions[track]}*", ""]
        lines.append(render_table(group))
        if note := constant_line(make_table(group)):
            lines += ["", note]
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def track_descriptions(records: list[dict[str, Any]]) -> dict[str, str]:
    """What each track measures, from the records' track config."""
    described = {}
    for record in records:
        if text := nested(record, "config", "track", "description"):
            described.setdefault(record["track"], " ".join(text.split()))
    return dict(sorted(described.items(), key=lambda item: TRACK_ORDER.get(item[0], 9)))


def comparison_cells(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of a comparison with a previous run."""
    return ["cell", "verdict", "previous PPL", "PPL", "change"], [
        [c.cell, c.verdict if c.reason is None else f"{c.verdict}: {c.reason}", _number(3)(c.previous),
         _number(3)(c.current), "" if c.change is None else f"{c.change:+.2%}"]
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
    return sorted({f"{r['model']}: {note}" for r in records
                   if (note := nested(r, "config", "model", "baseline_note"))})


def leaderboard_payload(records: list[dict[str, Any]], run_id: str,
                        comparison: tuple[str, list[Comparison]] | None = None) -> dict[str, Any]:
    """The JSON leaderboard: the rows and, if any, the comparison with a previous run."""
    payload: dict[str, Any] = {"run_id": run_id, "rows": leaderboard_rows(records)}
    if comparison is not None:
        source, comparisons = comparison
        payload["comparison"] = {"source": source, "cells": [c.to_dict() for c in comparisons]}
    return payload


def sweep_tables(rows: list[dict[str, Any]]) -> dict[str, Table]:
    """Per experiment with a sweep (e.g. sq-gptq-study), its cells as the study lays them out: a row
    per setting and method in the order they ran, a column per stage saying whether it ran
    (o / x), then every perplexity and accuracy; the float baseline first."""
    tables = {}
    for experiment in dict.fromkeys(row["experiment"] for row in rows if row.get("setting")):
        group = [row for row in rows if row["experiment"] == experiment]
        settings = list(dict.fromkeys(row["setting"] for row in group if row.get("setting")))
        pipelines = sorted({row["method"] for row in group if row["method"] != BASELINE_METHOD},
                           key=lambda method: -method.count("+"))
        stages = list(dict.fromkeys(name for method in pipelines for name in method.split("+")))

        def flags(row: dict[str, Any]) -> tuple[bool, ...]:  # the study's order: x x, o x, x o, o o
            return tuple(name in row["method"].split("+") for name in reversed(stages))

        ordered = sorted(group, key=lambda row: (row.get("setting") is not None,
                                                 settings.index(row["setting"]) if row.get("setting") else -1,
                                                 flags(row)))
        measures = [c for c in visible_columns(group)
                    if c.key == "ppl_wikitext2" or c.key.startswith((PPL_PREFIX, ACC_PREFIX))]
        headers = ["setting", *stages, *(c.header for c in measures)]
        cells = [[row.get("setting") or row["label"].split(" · ")[0],
                  *("" if row["method"] == BASELINE_METHOD else "o" if flag else "x"
                    for flag in reversed(flags(row))),
                  *(c.format(row.get(c.key)) for c in measures)] for row in ordered]
        columns = [Column(header, header, str, "") for header in headers]
        tables[experiment] = Table(columns, cells, [])
    return tables


SEED = re.compile(r"(?:^|-)seed(\d+)$")  # the seed part of a setting (experiment.seeds)


def seed_spread(rows: list[dict[str, Any]]) -> Table | None:
    """Cells repeated over calibration seeds (experiment.seeds): per cell without its seed, the mean
    and the sample standard deviation of every perplexity over the seeds that passed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("setting") and SEED.search(row["setting"]) and row["status"] == "passed":
            key = (row["model"], row["method"], row.get("variant"), row["track"], row["experiment"],
                   SEED.sub("", row["setting"]))
            groups.setdefault(key, []).append(row)
    if not groups:
        return None
    keys = ["ppl_wikitext2", *dict.fromkeys(k for row in rows for k in row if k.startswith(PPL_PREFIX))]
    headers = ["cell", "seeds", *(("PPL " + k.removeprefix(PPL_PREFIX).removeprefix("ppl_")) for k in keys)]
    cells = []
    for (model, method, variant, track, _experiment, setting), group in groups.items():
        name = "-".join(filter(None, (method, variant, track, setting)))
        values = []
        for key in keys:
            data = [row[key] for row in group if row.get(key) is not None]
            values.append("" if not data else f"{statistics.mean(data):.2f} ± "
                          f"{statistics.stdev(data) if len(data) > 1 else 0.0:.2f}")
        cells.append([name if len({k[0] for k in groups}) == 1 else f"{model} {name}",
                      ", ".join(SEED.search(row["setting"]).group(1) for row in group), *values])
    return Table([Column(h, h, str, "") for h in headers], cells, [])

