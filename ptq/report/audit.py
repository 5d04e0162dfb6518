"""The fidelity audit: each library backend's cell (`gptq@gptqmodel`) next to our implementation
of the same algorithm (`gptq`) on the same model, track, calibration tokens and evaluation
windows, as a table (reports/audit.md, reports/audit.json), gated.

A pair is the backend cell and the native cell whose ids differ only in the method. Its gate
(bench/audit.yaml): our PPL at most `tolerance` above the library's (better is fine), and any
difference larger than `explain_above` in either direction explained there (a default the
library applies, a documented deviation). The records add what each backend ran with (versions,
the mapping, the library defaults kept) so the explanation can be checked against them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ptq.config import read_yaml_layer
from ptq.errors import ConfigError
from ptq.report.records import atomic_write

LIBRARY = "@"


@dataclass(frozen=True)
class AuditConfig:
    tolerance: float = 0.02  # our PPL may exceed the library's by this fraction
    explain_above: float = 0.005  # a larger difference, either way, needs an explanation
    explanations: dict[str, str] = field(default_factory=dict)  # backend method -> why its PPL differs

    @classmethod
    def load(cls, path: Path) -> AuditConfig:
        """The audit's gate from `path`; a malformed file or an unknown key is a usage error naming it."""
        data = read_yaml_layer(path).data
        unknown = sorted(set(data) - {"tolerance", "explain_above", "explanations"})
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown} (known: tolerance, explain_above, explanations)")
        return cls(**data)


@dataclass(frozen=True)
class AuditRow:
    algorithm: str
    library: str
    track: str
    native_cell: str
    library_cell: str
    native_ppl: float
    library_ppl: float
    diff_percent: float  # (ours - library) / library, in percent: negative is ours better
    native_seconds: float
    library_seconds: float  # the cell's quantization, exchange and environment start included
    library_own_seconds: float | None  # the library's quantize call alone
    time_ratio: float  # ours / library's (cell seconds)
    versions: dict[str, Any]
    library_defaults: dict[str, Any]
    explanation: str | None
    verdict: str  # "ok", "explained", "unexplained", "worse"

    @property
    def failed(self) -> bool:
        return self.verdict in ("unexplained", "worse")


def _ppl(record: dict[str, Any]) -> float | None:
    ppl = (record.get("metrics") or {}).get("ppl") or {}
    return next(iter(ppl.values()), None)


def audit_rows(records: list[dict[str, Any]], config: AuditConfig) -> list[AuditRow]:
    """Every backend cell that passed or failed on its gates (measured) with its native partner."""
    measured = {r["cell_id"]: r for r in records if _ppl(r) is not None}
    rows = []
    for cell, record in sorted(measured.items()):
        method = record["method"]
        if LIBRARY not in method:
            continue
        algorithm, library = method.rsplit(LIBRARY, 1)
        native = measured.get(cell.replace(f"-{method}-", f"-{algorithm}-", 1))
        if native is None:
            continue
        ours, theirs = _ppl(native), _ppl(record)
        diff = (ours - theirs) / theirs
        details = ((record.get("data") or {}).get("stages") or {}).get(method, {})
        explanation = config.explanations.get(method)
        verdict = "worse" if diff > config.tolerance else \
            "ok" if abs(diff) <= config.explain_above else "explained" if explanation else "unexplained"
        native_s, library_s = native["metrics"]["quant_seconds"], record["metrics"]["quant_seconds"]
        rows.append(AuditRow(algorithm, library, record["track"], native["cell_id"], cell, ours, theirs, 100 * diff,
                             native_s, library_s, (details.get("seconds") or {}).get("quantize"),
                             native_s / library_s if library_s else float("nan"), details.get("versions", {}),
                             details.get("library_defaults", {}), explanation, verdict))
    return rows


def render_audit(rows: list[AuditRow], config: AuditConfig, run_id: str) -> str:
    md = [f"# Fidelity audit — run {run_id}", "",
          "Our implementation of each algorithm next to a library's, on the same model, calibration tokens and "
          f"evaluation windows. Gate: ours at most {100 * config.tolerance:.1f}% above the library's PPL; a "
          f"difference over {100 * config.explain_above:.1f}% either way must be explained in bench/audit.yaml.", "",
          "| algorithm | library | track | PPL ours | PPL library | diff % | quant s ours | quant s library "
          "(own call) | time ratio | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        own = f" ({row.library_own_seconds:.1f})" if row.library_own_seconds is not None else ""
        md.append(f"| {row.algorithm} | {row.library} | {row.track} | {row.native_ppl:.3f} | {row.library_ppl:.3f} | "
                  f"{row.diff_percent:+.2f} | {row.native_seconds:.1f} | {row.library_seconds:.1f}{own} | "
                  f"{row.time_ratio:.2f} | {row.verdict} |")
    if not rows:
        md.append("| (no backend cell with a measured native partner) |||||||||| ")
    md += ["", "diff % = (ours - library) / library; time ratio = our quantization seconds / the library cell's "
               "(which include saving the model, starting its environment and reading the weights back).", ""]
    for row in rows:
        md += [f"## {row.algorithm}@{row.library}, track {row.track}: {row.diff_percent:+.2f}% ({row.verdict})", "",
               f"- cells: `{row.native_cell}` vs `{row.library_cell}`",
               f"- versions: {', '.join(f'{k} {v}' for k, v in row.versions.items())}"]
        md += [f"- library default kept or set: {key}: {value}" for key, value in row.library_defaults.items()]
        if row.explanation:
            md.append(f"- explanation: {row.explanation}")
        md.append("")
    return "\n".join(md)


def write_audit(records: list[dict[str, Any]], config: AuditConfig, reports_dir: Path,
                run_id: str) -> list[AuditRow]:
    """reports/audit.md and reports/audit.json when the run has audit pairs; returns the rows."""
    rows = audit_rows(records, config)
    if rows:
        payload = {"run_id": run_id, "tolerance": config.tolerance, "explain_above": config.explain_above,
                   "rows": [{**asdict(row), "failed": row.failed} for row in rows]}
        atomic_write(reports_dir / "audit.md", render_audit(rows, config, run_id) + "\n")
        atomic_write(reports_dir / "audit.json", json.dumps(payload, indent=2, default=str) + "\n")
    return rows
