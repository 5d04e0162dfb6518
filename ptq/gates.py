"""The two gates of a cell: a quality budget against the FP baseline of the same session,
and a regression check against committed expected metrics (regenerated only on purpose)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptq.config import GateConfig
from ptq.report.records import atomic_write


@dataclass(frozen=True)
class GateResult:
    name: str
    metric: str
    measured: float | None
    limit: float | None
    baseline: float | None
    passed: bool | None  # None: the gate did not apply (recorded, not failed)
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality_gates(ppl: dict[str, float], fp_ppl: dict[str, float], gates: GateConfig) -> list[GateResult]:
    """quantized PPL / FP PPL <= max_ppl_ratio, per evaluation dataset."""
    if gates.max_ppl_ratio is None:
        return []
    results = []
    for dataset, value in ppl.items():
        ratio = value / fp_ppl[dataset]
        passed = ratio <= gates.max_ppl_ratio
        results.append(GateResult(
            "max_ppl_ratio", f"ppl.{dataset}", ratio, gates.max_ppl_ratio, fp_ppl[dataset], passed,
            f"PPL {value:.3f} is {ratio:.3f}x the FP baseline {fp_ppl[dataset]:.3f} "
            f"({'within' if passed else 'over'} the budget of {gates.max_ppl_ratio}x)"))
    return results


class BaselineStore:
    """Expected metrics per cell id and config fingerprint, in one committed JSON file.

    Layout: {cell_id: {fingerprint: {"ppl": {dataset: value}, "device": ..., "commit": ...}}}.
    A changed configuration has a new fingerprint and so no baseline until one is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, dict[str, Any]]] = (
            json.loads(path.read_text()) if path.is_file() else {}
        )

    def expected(self, cell_id: str, fingerprint: str) -> dict[str, Any] | None:
        return self.entries.get(cell_id, {}).get(fingerprint)

    def check(self, cell_id: str, fingerprint: str, ppl: dict[str, float], rel_tol: float,
              required: bool) -> list[GateResult]:
        """Compare PPL with the stored values; a missing baseline fails only when `required`
        (ad hoc runs with --override have none and are not expected to)."""
        entry = self.expected(cell_id, fingerprint)
        if entry is None:
            return [GateResult("baseline", "ppl", None, rel_tol, None, False if required else None,
                               f"no committed baseline for {cell_id} with config {fingerprint}"
                               + (": run with --update-baselines to record one (on purpose)" if required
                                  else ": not applied to an ad hoc configuration (--override)"))]
        results = []
        for dataset, value in ppl.items():
            expected = entry["ppl"].get(dataset)
            if expected is None:
                results.append(GateResult("baseline", f"ppl.{dataset}", value, rel_tol, None, False,
                                          f"the baseline of {cell_id} has no ppl.{dataset}"))
                continue
            drift = abs(value - expected) / expected
            passed = drift <= rel_tol
            results.append(GateResult(
                "baseline", f"ppl.{dataset}", value, rel_tol, expected, passed,
                f"PPL {value:.4f} vs baseline {expected:.4f}: relative drift {drift:.4%} "
                f"({'within' if passed else 'beyond'} tolerance {rel_tol:.2%})"))
        return results

    def update(self, cell_id: str, fingerprint: str, entry: dict[str, Any]) -> None:
        """The cell's expected metrics become these, for this configuration only (older ones go)."""
        self.entries[cell_id] = {fingerprint: entry}

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.entries, indent=2, sort_keys=True) + "\n")
