"""PNG figures of a leaderboard, drawn from its rows with matplotlib's Agg renderer (no display).

- PPL vs bits per weight, one panel per track, the Pareto front of each track highlighted;
- quantization seconds per cell, coloured by method;
- Track C: KV-cache bytes per token vs PPL, when the records carry KV metrics.

Figures are built on `matplotlib.figure.Figure` directly rather than pyplot, so no global
figure state or interactive backend is involved.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter

from ptq.report.leaderboard import by_track

DPI = 110
LOG_SCALE_ABOVE = 4.0  # a PPL axis spanning more than this factor is drawn in log scale


@dataclass(frozen=True)
class Plot:
    name: str  # file name, e.g. ppl_vs_bits.png
    title: str
    caption: str
    png: bytes


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices, by increasing x, of the points that no other point matches or beats on both axes
    (lower is better on both): walking by x (then y), a point is on the front when its y is below
    every y seen so far. Of identical points, the first is kept."""
    front: list[int] = []
    for index in sorted(range(len(points)), key=lambda i: points[i]):
        if not front or points[index][1] < points[front[-1]][1]:
            front.append(index)
    return front


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _measured(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """Passed rows that have every one of `keys`."""
    return [row for row in rows if row["status"] == "passed" and all(row.get(key) is not None for key in keys)]


def _label(row: dict[str, Any]) -> str:
    """A point's label: the cell id without the model and track, which the panel already says."""
    cell = row["cell"].removeprefix(f"{row['model']}-")
    return cell.replace(f"-{row['track']}", "", 1) if f"-{row['track']}" in cell else cell


def _pareto_panel(axes, rows: list[dict[str, Any]], x_key: str) -> None:
    points = [(row[x_key], row["ppl_wikitext2"]) for row in rows]
    front = set(pareto_front(points))
    axes.scatter([p[0] for i, p in enumerate(points) if i not in front],
                 [p[1] for i, p in enumerate(points) if i not in front], color="#9aa5b1", zorder=2, label="cell")
    ordered = sorted(front, key=lambda i: points[i])
    axes.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "o-", color="#d1495b", zorder=3,
              drawstyle="steps-post", label="Pareto front")
    for row, (x, y) in zip(rows, points):
        axes.annotate(_label(row), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ys = [p[1] for p in points]
    if max(ys) / min(ys) > LOG_SCALE_ABOVE:
        axes.set_yscale("log")
        for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
            axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axes.grid(True, which="both", alpha=0.3)


def ppl_vs_bits(rows: list[dict[str, Any]]) -> Plot | None:
    # a track whose cells all store weights alike (Track C: float weights) has nothing to trade off
    tracks = {track: group for track, group in by_track(_measured(rows, "ppl_wikitext2", "bits_per_weight")).items()
              if len({row["bits_per_weight"] for row in group}) > 1}
    if not tracks:
        return None
    figure = Figure(figsize=(5.5 * len(tracks), 4.2))
    for panel, (track, group) in enumerate(tracks.items(), start=1):
        axes = figure.add_subplot(1, len(tracks), panel)
        _pareto_panel(axes, group, "bits_per_weight")
        axes.set_title(f"Track {track}")
        axes.set_xlabel("bits per weight (block linears)")
        axes.set_ylabel("PPL wikitext2")
        axes.legend(fontsize=8, loc="lower left")  # below and left of a Pareto front there is no point
    caption = ("Passed cells only. Bits per weight of the decoder blocks' linear layers (embeddings and LM head "
               "stay float): the code bits plus one scale, and one zero point when asymmetric, per group, each "
               "assumed stored at 16 bits. Float cells count the weights as they ran (32 bits: float32 on CPU). "
               "Track B also quantizes activations, which this axis does not show; a track whose cells all store "
               "weights alike (Track C) has no panel. The red staircase is each track's Pareto front: no other cell "
               "has both fewer bits and a lower PPL. PPL is in log scale when it spans more than "
               f"{LOG_SCALE_ABOVE:g}x.")
    return Plot("ppl_vs_bits.png", "PPL vs bits per weight", caption, _png(figure))


def quant_seconds(rows: list[dict[str, Any]]) -> Plot | None:
    measured = sorted(_measured(rows, "quant_seconds"), key=lambda row: (row["method"], row["cell"]))
    if not measured:
        return None
    methods = sorted({row["method"] for row in measured})
    colours = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    figure = Figure(figsize=(7.5, 0.6 + 0.28 * len(measured)))
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(measured)))
    seconds = [row["quant_seconds"] for row in measured]
    axes.barh(positions, seconds, color=[colours[row["method"]] for row in measured])
    for position, value in zip(positions, seconds):
        axes.annotate(f"{value:.1f} s", (value, position), textcoords="offset points", xytext=(3, -3), fontsize=7)
    axes.set_yticks(positions, [row["cell"] for row in measured], fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("symlog", linthresh=1.0)  # seconds span 0.1 to hundreds: linear below 1 s, log above
    axes.set_xlim(0, max(seconds) * 3 + 1)
    axes.set_xlabel("quantization seconds (linear below 1, log above)")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(handles=[Patch(color=colours[method], label=method) for method in methods], fontsize=8,
                loc="lower right")
    caption = ("Wall-clock seconds of each cell's quantization step (the method's calibration passes included; "
               "drawing the calibration windows and evaluation excluded), coloured by method; passed cells only. "
               "Float cells do no work.")
    return Plot("quant_seconds.png", "Quantization time per method", caption, _png(figure))


def kv_bytes_vs_ppl(rows: list[dict[str, Any]]) -> Plot | None:
    measured = [row for row in _measured(rows, "ppl_wikitext2", "kv_bytes_per_token") if row["track"] == "C"]
    if not measured:
        return None
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot(1, 1, 1)
    _pareto_panel(axes, measured, "kv_bytes_per_token")
    for float_bytes in sorted({row["kv_float_bytes_per_token"] for row in measured
                               if row.get("kv_float_bytes_per_token") is not None}):
        axes.axvline(float_bytes, color="#555555", linestyle="--", linewidth=1, label=f"float KV: {float_bytes:.0f} B")
    axes.set_title("Track C")
    axes.set_xlabel("KV-cache bytes per token (all layers)")
    axes.set_ylabel("PPL wikitext2")
    axes.legend(fontsize=8, loc="lower left")
    caption = ("Passed Track C cells that record KV metrics: KV-cache bytes per token (metrics.kv.bytes_per_token, "
               "all layers) against PPL; dashed: the float cache's bytes per token (metrics.kv.float_bytes_per_token). "
               "The red line is the Pareto front.")
    return Plot("kv_bytes_vs_ppl.png", "KV bytes per token vs PPL (Track C)", caption, _png(figure))


PLOTS = (ppl_vs_bits, quant_seconds, kv_bytes_vs_ppl)


def render_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """Every figure the rows have data for (a figure without data is left out, not drawn empty)."""
    return [plot for make in PLOTS if (plot := make(rows)) is not None]
