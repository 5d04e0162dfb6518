"""The two gates of a cell: a quality budget against the FP baseline of the same session,
and a regression check against committed expected metrics (regenerated only on purpose)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptq.config import GateConfig
from ptq.report.records import atomic_write
from ptq.stats import RatioInterval, paired_bootstrap_ratio


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


def accuracy_drop_gate(metric: str, acc: float, stderr: float | None, fp_acc: float, fp_stderr: float | None,
                       gates: GateConfig) -> GateResult:
    """The FP accuracy minus the quantized one, in points, fails when it is over max_acc_drop
    *and* over acc_drop_stderrs standard errors of the difference (the two estimates taken as
    independent, which overstates the noise of a paired comparison: a conservative gate)."""
    assert gates.max_acc_drop is not None
    drop = 100 * (fp_acc - acc)
    noise = 100 * gates.acc_drop_stderrs * math.hypot(stderr or 0.0, fp_stderr or 0.0)
    passed = drop <= gates.max_acc_drop or drop <= noise
    verdict = ("within the budget" if drop <= gates.max_acc_drop
               else "over the budget, within the noise" if passed else "over the budget and the noise")
    return GateResult(
        "max_acc_drop", metric, drop, gates.max_acc_drop, 100 * fp_acc, passed,
        f"accuracy {100 * acc:.1f} vs FP {100 * fp_acc:.1f}: drop {drop:.1f} points; budget "
        f"{gates.max_acc_drop:g} points, noise ({gates.acc_drop_stderrs:g} stderr) {noise:.1f} points: {verdict}")


def zero_shot_gates(zero_shot: dict[str, Any], fp_zero_shot: dict[str, Any], gates: GateConfig) -> list[GateResult]:
    """max_acc_drop on every task with an accuracy, and on their average."""
    if gates.max_acc_drop is None:
        return []
    scored = [(f"zero_shot.{task}.acc", zero_shot["tasks"][task], fp_zero_shot["tasks"][task])
              for task, metrics in zero_shot["tasks"].items() if "acc" in metrics]
    if zero_shot["average"] is not None:
        scored.append(("zero_shot.average.acc", zero_shot["average"], fp_zero_shot["average"]))
    return [accuracy_drop_gate(metric, ours["acc"], ours["acc_stderr"], fp["acc"], fp["acc_stderr"], gates)
            for metric, ours, fp in scored]


def cell_gates(metrics: dict[str, Any], fp_metrics: dict[str, Any], gates: GateConfig,
               baseline: list[GateResult]) -> list[GateResult]:
    """Every gate of a cell: its quality budget against the FP baseline (PPL, and zero-shot
    accuracy when measured), then `baseline`, the committed-baseline check (see BaselineStore)."""
    results = quality_gates(metrics["ppl"], fp_metrics["ppl"], gates)
    if "zero_shot" in metrics:
        results += zero_shot_gates(metrics["zero_shot"], fp_metrics["zero_shot"], gates)
    return results + baseline


def _interval(current: list[float] | None, committed: list[float] | None,
              committed_ppl: float) -> RatioInterval | None:
    """The paired interval of current / committed PPL, when both hold the same windows and the
    committed windows give the committed PPL (an edited PPL is then judged by tolerance alone)."""
    if not current or not committed or len(current) != len(committed) \
            or not math.isclose(math.exp(sum(committed) / len(committed)), committed_ppl, rel_tol=1e-9):
        return None
    return paired_bootstrap_ratio(current, committed)


class BaselineStore:
    """Expected metrics per cell id and config fingerprint, in one committed JSON file.

    Layout: {cell_id: {fingerprint: {"ppl": {dataset: value}, "window_nll": {dataset: [per window]},
    "device": ..., "commit": ...}}} (entries written before per-window NLLs were kept have none).
    A changed configuration has a new fingerprint and so no baseline until one is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, dict[str, Any]]] = (
            json.loads(path.read_text()) if path.is_file() else {}
        )

    def expected(self, cell_id: str, fingerprint: str) -> dict[str, Any] | None:
        return self.entries.get(cell_id, {}).get(fingerprint)

    def check(self, cell_id: str, fingerprint: str, metrics: dict[str, Any], rel_tol: float,
              required: bool) -> list[GateResult]:
        """Compare PPL with the stored values; a missing baseline fails only when `required`
        (ad hoc runs with --override have none and are not expected to). Noise-aware when the
        baseline holds per-window NLLs: a drift beyond `rel_tol` still passes when the 95% paired
        bootstrap interval of the ratio over the same windows contains 1."""
        entry = self.expected(cell_id, fingerprint)
        if entry is None:
            return [GateResult("baseline", "ppl", None, rel_tol, None, False if required else None,
                               f"no committed baseline for {cell_id} with config {fingerprint}"
                               + (": run with --update-baselines to record one (on purpose)" if required
                                  else ": not applied to an ad hoc configuration (--override)"))]
        results = []
        for dataset, value in metrics["ppl"].items():
            expected = entry["ppl"].get(dataset)
            if expected is None:
                results.append(GateResult("baseline", f"ppl.{dataset}", value, rel_tol, None, False,
                                          f"the baseline of {cell_id} has no ppl.{dataset}"))
                continue
            drift = abs(value - expected) / expected
            noise = _interval(metrics.get("window_nll", {}).get(dataset),
                              entry.get("window_nll", {}).get(dataset), expected)
            within_noise = noise is not None and noise.low <= 1 <= noise.high
            passed = drift <= rel_tol or within_noise
            verdict = ("within" if drift <= rel_tol else "beyond") + f" tolerance {rel_tol:.2%}"
            if noise is not None:
                verdict += (f"; ratio to the baseline over the same windows {noise.ratio:.4f}, 95% interval "
                            f"[{noise.low:.4f}, {noise.high:.4f}]: {'within' if within_noise else 'beyond'} "
                            "the noise")
            results.append(GateResult(
                "baseline", f"ppl.{dataset}", value, rel_tol, expected, passed,
                f"PPL {value:.4f} vs baseline {expected:.4f}: relative drift {drift:.4%} ({verdict})"))
        return results

    def update(self, cell_id: str, fingerprint: str, entry: dict[str, Any]) -> None:
        """The cell's expected metrics become these, for this configuration only (older ones go)."""
        self.entries[cell_id] = {fingerprint: entry}

    def update_passed(self, records: list[dict[str, Any]]) -> None:
        """Each passed cell's measured PPL becomes its baseline (--update-baselines)."""
        for record in records:
            if record["status"] == "passed":
                self.update(record["cell_id"], record["config_fingerprint"], {
                    "ppl": record["metrics"]["ppl"], "window_nll": record["metrics"].get("window_nll", {}),
                    "device": record["environment"]["device"],
                    "commit": record["environment"]["git_commit"]})

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.entries, indent=2, sort_keys=True) + "\n")
