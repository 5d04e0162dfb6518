"""PNG figures of a leaderboard, drawn from its rows with matplotlib's Agg renderer (no display).

- PPL vs bits per weight, one panel per track, the Pareto front of each track highlighted;
- quantization seconds per cell that did quantization work, coloured by method;
- Track C: KV-cache bytes per token vs PPL, when the records carry KV metrics.

Made to be read at a glance: legends sit outside the axes; point labels are placed by a small
collision search (`place_labels`) so none covers another label or a point; the quality axis is
the PPL above the float baseline in percent on a symmetric-log scale, so a cell 800% worse
does not squeeze those 0.1% apart; every figure says which cells it leaves out (failed, skipped,
without the metric).

Figures are built on `matplotlib.figure.Figure` directly rather than pyplot, so no global
figure state or interactive backend is involved.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ptq.report.leaderboard import by_track

DPI = 110
FIGURE_WIDTH = 7.0  # inches: at DPI, narrow enough for an 800 px page to show it unscaled
LEGEND_BELOW = 42.0  # pixels from the axes' bottom to the legend's top: room for tick labels and x label
NO_WORK_SECONDS = 0.05  # quantization time below this is no work (float cells, KV caches made at run time)
LABEL_FONT = 7  # points
MARKER_CLEARANCE = 5.0  # pixels kept free around every point's centre (the markers' radius plus a margin)
LABEL_RADII = (2.0, 8.0, 16.0, 28.0, 44.0, 64.0)  # distances from a point tried for its label, pixels
LEADER_FROM = 12.0  # a label placed farther than this from its point gets a thin line to it
LABEL_ANGLES = (0, 30, -30, 180, 150, -150, 90, -90, 60, -60, 120, -120)  # degrees, preferred first
FRONT, OTHER = "#d1495b", "#7b8794"

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


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


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(box: Box, bounds: Box) -> bool:
    return bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]


def _candidates(x: float, y: float, width: float, height: float) -> list[Box]:
    """Boxes of a label around its point (x, y), nearest first, each on the far side of a point
    at distance clearance + r in one of the directions."""
    boxes = []
    for radius in LABEL_RADII:
        for angle in LABEL_ANGLES:
            cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            px, py = x + (MARKER_CLEARANCE + radius) * cos, y + (MARKER_CLEARANCE + radius) * sin
            x0 = px if cos > 0.4 else px - width if cos < -0.4 else px - width / 2
            y0 = py if sin > 0.4 else py - height if sin < -0.4 else py - height / 2
            boxes.append((x0, y0, x0 + width, y0 + height))
    return boxes


def place_labels(anchors: list[tuple[float, float]], sizes: list[tuple[float, float]], bounds: Box,
                 obstacles: tuple[Box, ...] = ()) -> list[Box | None]:
    """A box (display pixels) for each label of size `sizes[i]` near its point `anchors[i]`: the
    first candidate, nearest first, that stays inside `bounds` and overlaps no label placed before,
    no point's marker (MARKER_CLEARANCE around each anchor) and no obstacle. None for a label
    with no such place (the caller says so rather than drawing it over something)."""
    taken = [(x - MARKER_CLEARANCE, y - MARKER_CLEARANCE, x + MARKER_CLEARANCE, y + MARKER_CLEARANCE)
             for x, y in anchors] + list(obstacles)
    placed: list[Box | None] = []
    for (x, y), (width, height) in zip(anchors, sizes):
        box = next((box for box in _candidates(x, y, width, height)
                    if _inside(box, bounds) and not any(_overlaps(box, other) for other in taken)), None)
        placed.append(box)
        if box is not None:
            taken.append(box)
    return placed


def _distance(box: Box, x: float, y: float) -> float:
    return math.hypot(max(box[0] - x, 0.0, x - box[2]), max(box[1] - y, 0.0, y - box[3]))


Segment = tuple[tuple[float, float], tuple[float, float]]  # two ends, in data coordinates


def _label_points(axes: Axes, texts: list[str], xys: list[tuple[float, float]],
                  segments: list[Segment] = ()) -> list[str]:
    """Write each text next to its point (data coordinates) where `place_labels` finds room, off
    the horizontal and vertical line `segments`, with a thin leader line when it had to go far;
    return the texts left unwritten. The axes' limits must be final: positions are in pixels."""
    canvas = axes.figure.canvas
    renderer = canvas.get_renderer()
    font = FontProperties(size=LABEL_FONT)
    scale = axes.figure.dpi / 72.0  # pixels per point
    sizes = []
    for text in texts:
        width, height, _descent = renderer.get_text_width_height_descent(text, font, ismath=False)
        sizes.append((width + 2, height + 2))
    anchors = [tuple(axes.transData.transform(xy)) for xy in xys]
    frame = axes.bbox.extents
    lines = []
    for ends in segments:
        (x0, y0), (x1, y1) = (axes.transData.transform(end) for end in ends)
        lines.append((min(x0, x1) - 1.5, min(y0, y1) - 1.5, max(x0, x1) + 1.5, max(y0, y1) + 1.5))
    inner = (frame[0] + 2, frame[1] + 2, frame[2] - 2, frame[3] - 2)
    boxes = place_labels(anchors, sizes, inner, tuple(lines))
    unplaced = []
    for text, xy, (x, y), box in zip(texts, xys, anchors, boxes):
        if box is None:
            unplaced.append(text)
            continue
        leader = dict(arrowstyle="-", color="#9aa5b1", linewidth=0.6, shrinkA=0, shrinkB=3) \
            if _distance(box, x, y) > LEADER_FROM else None
        axes.annotate(text, xy, xytext=((box[0] + 1 - x) / scale, (box[1] + 1 - y) / scale),
                      textcoords="offset points", ha="left", va="bottom", fontsize=LABEL_FONT,
                      arrowprops=leader, annotation_clip=False)
    return unplaced


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)  # a renderer to measure label sizes before drawing
    return figure


def _measured(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """Passed rows that have every one of `keys`."""
    return [row for row in rows
            if row["status"] == "passed" and all(row.get(key) is not None for key in keys)]


def not_shown(rows: list[dict[str, Any]], shown: list[dict[str, Any]], missing: str) -> str:
    """What a figure leaves out of `rows`: "not shown: 1 failed (kivi-int2); 2 skipped", with the
    names when few; passed rows not shown are "cells `missing`"."""
    shown_cells = {row["cell"] for row in shown}
    groups: dict[str, list[str]] = {"failed": [], "skipped": [], "passed": []}
    for row in rows:
        if row["cell"] not in shown_cells:
            groups.setdefault(row["status"], []).append(row["label"])
    parts = []
    for status, labels in groups.items():
        if not labels:
            continue
        what = status if status != "passed" else f"{'cell' if len(labels) == 1 else 'cells'} {missing}"
        parts.append(f"{len(labels)} {what}" + (f" ({', '.join(labels)})" if len(labels) <= 3 else ""))
    return "not shown: " + "; ".join(parts) if parts else ""


def _log_limits(values: list[float], margin: float = 0.08) -> tuple[float, float]:
    low, high = math.log(min(values)), math.log(max(values))
    pad = (high - low) * margin or 0.1
    return math.exp(low - pad), math.exp(high + pad)


def excess_percent(row: dict[str, Any]) -> float:
    """How much worse than the float baseline of its model and evaluation a cell's PPL is, in %."""
    return 100.0 * (row["ppl_ratio"] - 1.0)


def symlog_threshold(values: list[float]) -> float:
    """Where a symmetric-log PPL-excess axis turns linear around 0: the decade of the smallest
    nonzero |value|, between 0.001% and 1%, so every nonzero excess lands in the log part."""
    nonzero = [abs(value) for value in values if value != 0.0]
    decade = math.floor(math.log10(min(nonzero))) if nonzero else -2
    return 10.0 ** min(max(decade, -3), 0)


def _percent(value: float, _pos: Any = None) -> str:
    return "float" if value == 0 else f"{value:+g}%"


def _excess_axis(axes: Axes, values: list[float]) -> None:
    """The y axis: PPL excess over float in %, linear within ±threshold, log beyond, so that 0.03%,
    1% and 800% are all readable and no cell squeezes the others; ticks at 0 and every decade."""
    threshold = symlog_threshold(values)
    axes.set_yscale("symlog", linthresh=threshold, linscale=0.4)
    top = 10.0 ** math.ceil(math.log10(max(max(values), threshold * 10)))
    bottom = -10.0 ** math.ceil(math.log10(-min(values))) if min(values) < -threshold else -threshold / 2
    decades = range(round(math.log10(threshold)), round(math.log10(top)) + 1)
    ticks = [0.0, *(10.0 ** k for k in decades)]
    ticks += [-t for t in ticks if 0 < t <= -bottom and min(values) < 0]
    axes.set_yticks(sorted(ticks))
    axes.yaxis.set_major_formatter(FuncFormatter(_percent))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_ylim(bottom, top)
    axes.set_ylabel("PPL above the float baseline")


def _pareto_panel(axes: Axes, rows: list[dict[str, Any]], x_key: str,
                  vertical: tuple[float, ...] = ()) -> list[str]:
    """Each cell's PPL excess over float (`_excess_axis`) against `x_key` (log 2 scale), each point
    labelled, the Pareto front as a red staircase, dashed vertical lines at `vertical`. Returns the
    labels that found no room."""
    xs = [row[x_key] for row in rows]
    ys = [excess_percent(row) for row in rows]
    front = pareto_front(list(zip(xs, ys)))
    others = [i for i in range(len(rows)) if i not in front]
    if others:
        axes.scatter([xs[i] for i in others], [ys[i] for i in others], color=OTHER, zorder=3, label="cell")
    axes.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color=FRONT, zorder=3,
              drawstyle="steps-post", label="Pareto front")
    axes.set_xscale("log", base=2)  # bits and bytes: halving is the step that matters
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axes.set_xlim(*_log_limits(xs))
    _excess_axis(axes, ys)
    axes.grid(True, which="major", alpha=0.3)
    low, high = axes.get_ylim()
    segments = [((x, low), (x, high)) for x in vertical]
    for x in vertical:
        axes.axvline(x, color="#555555", linestyle="--", linewidth=1, label=f"float KV: {x:.0f} B")
    for a, b in zip(front, front[1:]):  # steps-post: along at the first y, then up or down to the next point
        segments += [((xs[a], ys[a]), (xs[b], ys[a])), ((xs[b], ys[a]), (xs[b], ys[b]))]
    order = sorted(range(len(rows)), key=lambda i: (xs[i], ys[i]))  # left to right, deterministic
    return _label_points(axes, [rows[i]["label"] for i in order], [(xs[i], ys[i]) for i in order], segments)


def _plain_log(axis: Any) -> None:
    """Log ticks at 1, 2 and 5 per decade, written as plain numbers."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _panel_title(axes: Axes, title: str, notes: list[str]) -> None:
    """The panel's title on the left; on the right, in red, what it leaves out or could not label."""
    axes.set_title(title, loc="left", fontsize=11)
    if text := "; ".join(note for note in notes if note):
        axes.set_title(text, loc="right", fontsize=7, color="#9b2c2c")


def _legend_below(axes: Axes, handles: list[Any] | None = None) -> None:
    """The legend (of `handles`, else of the axes' labelled artists) in one row under the x label,
    where it covers nothing."""
    handles = handles or axes.get_legend_handles_labels()[0]
    axes.legend(handles=handles, fontsize=8, loc="upper center", ncol=len(handles), frameon=False,
                bbox_to_anchor=(0.5, -LEGEND_BELOW / axes.bbox.height))


def _unlabelled(texts: list[str]) -> str:
    return f"no room for the label of {', '.join(texts)}" if texts else ""


EXCESS_NOTE = ("Up the y axis: PPL above the float baseline of the same model and evaluation, in percent, "
               "linear near 0 and logarithmic beyond, so that cells 0.1% and 800% worse are both readable.")


def ppl_vs_bits(rows: list[dict[str, Any]]) -> Plot | None:
    # a track whose cells all store weights alike (Track C: float weights) has nothing to trade off
    measured = by_track(_measured(rows, "ppl_ratio", "bits_per_weight"))
    tracks = {track: group for track, group in measured.items()
              if len({row["bits_per_weight"] for row in group}) > 1}
    if not tracks:
        return None
    every = by_track(rows)
    figure = _figure(FIGURE_WIDTH, 3.4 * len(tracks) + 0.6)
    figure.subplots_adjust(hspace=0.45)  # before any label is placed: it moves the axes
    panels = [figure.add_subplot(len(tracks), 1, panel) for panel in range(1, len(tracks) + 1)]
    omitted = []
    for axes, (track, group) in zip(panels, tracks.items()):
        unplaced = _pareto_panel(axes, group, "bits_per_weight")
        axes.set_xlabel("bits per weight (block linears)")
        note = not_shown(every[track], group, "without bits per weight or a float PPL")
        _panel_title(axes, f"Track {track}", [note, _unlabelled(unplaced)])
        omitted += [f"Track {track}: {note}"] if note else []
    _legend_below(panels[-1])
    caption = ("Bits per weight of the decoder blocks' linear layers: code bits plus a 16-bit scale (and "
               "zero point when asymmetric) per group; float cells count their dtype (32 for float32); "
               "embeddings and LM head stay float. Track B's activation quantization is not on this axis; "
               "Track C, whose weights all stay float, has no panel. Red: each track's Pareto front (no "
               f"other cell has both fewer bits and a lower PPL). {EXCESS_NOTE} "
               + ("Passed cells only; " + "; ".join(omitted) + "." if omitted
                  else "Every cell of these tracks is shown."))
    return Plot("ppl_vs_bits.png", "PPL vs bits per weight", caption, _png(figure))


def timed_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bars of the quantization-time chart, by method then cell: passed cells whose
    quantization did work (at least NO_WORK_SECONDS), so that no bar has zero length."""
    worked = [row for row in _measured(rows, "quant_seconds") if row["quant_seconds"] >= NO_WORK_SECONDS]
    return sorted(worked, key=lambda row: (row["method"], row["cell"]))


def quant_seconds(rows: list[dict[str, Any]]) -> Plot | None:
    measured = timed_cells(rows)
    if not measured:
        return None
    methods = sorted({row["method"] for row in measured})
    colours = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    figure = _figure(FIGURE_WIDTH, 0.9 + 0.3 * len(measured))
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(measured)))
    seconds = [row["quant_seconds"] for row in measured]
    log = max(seconds) / min(seconds) > 30
    axes.barh(positions, seconds, color=[colours[row["method"]] for row in measured], height=0.6)
    for position, value in zip(positions, seconds):
        axes.annotate(f"{value:.1f} s", (value, position), textcoords="offset points", xytext=(3, 0),
                      va="center", fontsize=7)
    axes.set_yticks(positions, [f"{row['label']} ({row['track']})" for row in measured], fontsize=7)
    axes.set_ylim(len(measured) - 0.5, -0.5)
    if log:
        axes.set_xscale("log")
        _plain_log(axes.xaxis)
        axes.set_xlim(min(seconds) / 2, max(seconds) * 4)
    else:
        axes.set_xlim(0, max(seconds) * 1.25)
    axes.set_xlabel("quantization seconds" + (" (log scale)" if log else ""))
    axes.grid(True, axis="x", alpha=0.3)
    if len(methods) > 1:
        _legend_below(axes, [Patch(color=colours[method], label=method) for method in methods])
    note = not_shown(rows, measured, f"with no quantization work (< {NO_WORK_SECONDS:g} s)")
    if note:
        axes.set_title(note, fontsize=7, color="#9b2c2c", loc="left")
    caption = ("Wall-clock seconds of each cell's quantization step (calibration passes included, "
               "evaluation excluded), coloured by method, track in brackets. Float baselines and KV-cache "
               "methods, which quantize while the model runs, do no work here. "
               + (f"{note[0].upper()}{note[1:]}." if note else "Every cell is shown."))
    return Plot("quant_seconds.png", "Quantization time per cell", caption, _png(figure))


def kv_bytes_vs_ppl(rows: list[dict[str, Any]]) -> Plot | None:
    track_c = [row for row in rows if row["track"] == "C"]
    measured = _measured(track_c, "ppl_ratio", "kv_bytes_per_token")
    if not measured:
        return None
    figure = _figure(FIGURE_WIDTH, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    float_bytes = sorted({row["kv_float_bytes_per_token"] for row in measured
                          if row.get("kv_float_bytes_per_token") is not None})
    unplaced = _pareto_panel(axes, measured, "kv_bytes_per_token", tuple(float_bytes))
    axes.set_xlabel("KV-cache bytes per token (all layers)")
    note = not_shown(track_c, measured, "without KV metrics or a float PPL")
    _panel_title(axes, "Track C", [note, _unlabelled(unplaced)])
    _legend_below(axes)
    caption = ("KV-cache bytes per token over all layers, measured from what the cache stores (log 2 "
               "scale); dashed: a float cache. Red: the Pareto front (no other cell has both fewer bytes and "
               f"a lower PPL). {EXCESS_NOTE} "
               + (f"Passed cells only; {note}." if note else "Every Track C cell is shown."))
    return Plot("kv_bytes_vs_ppl.png", "KV bytes per token vs PPL (Track C)", caption, _png(figure))


PLOTS = (ppl_vs_bits, quant_seconds, kv_bytes_vs_ppl)


def render_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """Every figure the rows have data for (a figure without data is left out, not drawn empty)."""
    return [plot for make in PLOTS if (plot := make(rows)) is not None]
