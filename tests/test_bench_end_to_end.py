"""The benchmark run end to end on a tiny random Llama, under xdist: records reach the
controller, the leaderboard holds every cell (failed ones with their reason), and the
baseline gate passes on a re-run and fails on a tampered baseline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_tiny_llama, write_wikitext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("e2e")
    lines = write_wikitext(base / "data", words=300, lines=600)
    model_dir = base / "tiny-llama"
    write_tiny_llama(model_dir, lines, vocab_size=400, heads=2, kv_heads=1)  # head_dim 32

    bench = base / "bench"
    shutil.copytree(ROOT / "bench", bench)
    (bench / "baselines.json").unlink()
    for name, path in (("tiny-llama", model_dir), ("tiny-missing", base / "nowhere")):
        (bench / "models" / f"{name}.yaml").write_text(
            f"model:\n  name: {name}\n  family: llama\n  source: {{kind: local, path: '{path}'}}\n")
    (bench / "experiments" / "tiny.yaml").write_text(
        "experiment:\n  name: tiny\n  models: [tiny-llama, tiny-missing]\n  methods: [fp16, rtn, kv-rtn]\n"
        "eval: {seqlen: 64, max_windows: 4, batch_size: 2}\n"
        "kv_eval: {prefill_chunk: 16, passkey_lengths: [160], passkey_trials: 2, decode_prompt: 48, decode_tokens: 4}\n"
        # a random model's budgets are meaningless: only the baseline gate is exercised here
        "gates: {max_ppl_ratio: null}\n")
    return base


def bench_command(workspace: Path, *args: str) -> list[str]:
    """`pytest bench` on the workspace's benchmark folder, reports and cache; later options win."""
    return [sys.executable, "-m", "pytest", "bench", "-o", f"cache_dir={workspace / 'pytest-cache'}",
            "--bench-dir", str(workspace / "bench"), "--reports-dir", str(workspace / "reports"),
            "--cache-dir", str(workspace / "cache"), "--experiment", "tiny", *args]


def bench_env(workspace: Path, **extra: str) -> dict[str, str]:
    # not the outer session's xdist variables: the run is its own session
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    return {**inherited, "PTQ_DATA_DIR": str(workspace / "data"), "CUDA_VISIBLE_DEVICES": "", **extra}


def run_bench(workspace: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the benchmark on the workspace; `env` adds environment variables."""
    return subprocess.run(bench_command(workspace, *args), cwd=ROOT, env=bench_env(workspace, **env),
                          capture_output=True, text=True, timeout=600)


def leaderboard(workspace: Path) -> dict[str, dict]:
    rows = json.loads((workspace / "reports" / "leaderboard.json").read_text())["rows"]
    return {row["cell"]: row for row in rows}


def test_xdist_run_records_every_cell_and_gates_on_baselines(workspace: Path) -> None:
    first = run_bench(workspace, "-n", "2", "--update-baselines", "--run-id", "first")
    assert first.returncode == 1, first.stdout[-3000:]  # the missing model's cells fail
    rows = leaderboard(workspace)
    methods = {"fp16": "ABC", "rtn": "AB", "kv-rtn-int8": "C", "kv-rtn-int4": "C", "kv-rtn-int2": "C"}
    tiny = {f"tiny-llama-{m}-{t}-tiny" for m, tracks in methods.items() for t in tracks}
    missing = {f"tiny-missing-{m}-{t}-tiny" for m, tracks in methods.items() for t in tracks}
    assert set(rows) == tiny | missing
    assert all(rows[c]["status"] == "passed" for c in tiny)
    assert all(rows[c]["status"] == "failed" and "does not exist" in rows[c]["reason"] for c in missing)
    assert "Traceback" not in first.stdout
    # one record file per cell, written by the workers, in one run folder
    records = sorted(p.stem for p in (workspace / "reports" / "runs" / "first").glob("*.json"))
    assert records == sorted(tiny | missing)
    workers = {json.loads((workspace / "reports" / "runs" / "first" / f"{c}.json").read_text())
               ["environment"]["xdist_worker"] for c in tiny}
    assert workers <= {"gw0", "gw1"} and len(workers) == 1  # grouped by model: one worker
    # the FP cells of tracks A and B share one baseline measurement; track C's scores the same
    # windows by chunked prefill through a float cache, which changes nothing but rounding
    fp = {t: rows[f"tiny-llama-fp16-{t}-tiny"]["ppl_wikitext2"] for t in "ABC"}
    assert fp["A"] == fp["B"] and fp["C"] == pytest.approx(fp["A"], rel=1e-5)
    kv = json.loads((workspace / "reports" / "runs" / "first" / "tiny-llama-kv-rtn-int4-C-tiny.json").read_text())
    assert kv["metrics"]["eval"]["wikitext2"]["prefill_chunk"] == 16
    assert kv["metrics"]["passkey"]["trials"] == 2 and kv["metrics"]["decode_tokens_per_s"] > 0
    assert kv["metrics"]["kv"]["bits_per_element"] == pytest.approx(4 + 32 / 32)  # fp16 scale + zero per 32
    stored = json.loads((workspace / "bench" / "baselines.json").read_text())
    assert set(stored) == tiny
    # progress lines reach the terminal from the workers, whole, prefixed by worker and cell
    assert re.search(r"^\[gw[01]\] tiny-llama-\S+-tiny: loading tiny-llama$", first.stderr, re.M), first.stderr
    assert re.search(r"^\[gw[01]\] tiny-llama-rtn-A-tiny: evaluating window 4/4$", first.stderr, re.M)
    # and the report artefacts are all there
    assert {p.name for p in (workspace / "reports").iterdir()} >= {"leaderboard.html", "plots"}
    assert (workspace / "reports" / "plots" / "ppl_vs_bits.png").read_bytes().startswith(b"\x89PNG")

    # measured again (not from the cache): same numbers, and progress lines without workers too
    second = run_bench(workspace, "--models", "tiny-llama", "--run-id", "second", "--no-cache")
    assert second.returncode == 0, second.stdout[-3000:]
    assert re.search(r"^\[main\] tiny-llama-rtn-B-tiny: evaluating window 4/4$", second.stderr, re.M)
    assert {c: r["ppl_wikitext2"] for c, r in leaderboard(workspace).items()} == {
        c: rows[c]["ppl_wikitext2"] for c in tiny}

    # --compare: a previous leaderboard where rtn-A was much better makes this run a regression
    previous = json.loads((workspace / "reports" / "leaderboard.json").read_text())
    for row in previous["rows"]:
        if row["cell"] == "tiny-llama-rtn-A-tiny":
            row["ppl_wikitext2"] /= 2
    (workspace / "previous.json").write_text(json.dumps(previous))
    compared = run_bench(workspace, "--models", "tiny-llama", "--methods", "rtn", "--tracks", "A",
                         "--compare", str(workspace / "previous.json"), "--run-id", "compared")
    assert compared.returncode == 1, compared.stdout[-3000:]
    assert "regressions against" in compared.stdout and "tiny-llama-rtn-A-tiny | worse" in compared.stdout

    for entry in stored["tiny-llama-rtn-A-tiny"].values():
        entry["ppl"]["wikitext2"] *= 1.5
    (workspace / "bench" / "baselines.json").write_text(json.dumps(stored))
    third = run_bench(workspace, "--models", "tiny-llama", "--methods", "rtn", "--tracks", "A", "--run-id", "third",
                      "--no-progress", "--no-cache")
    assert third.returncode == 1
    assert "evaluating window" not in third.stderr + third.stdout
    reason = leaderboard(workspace)["tiny-llama-rtn-A-tiny"]["reason"]
    assert "baseline" in reason and "beyond tolerance" in reason


def test_workers_sharing_a_model_measure_its_baseline_and_float_references_once(workspace: Path) -> None:
    """With one model and two workers, cells are dealt one by one; whichever worker first needs the
    FP baseline (or the float top-k references) measures it, the other waits and reads it from the
    cache. Each of tracks A/B and C has its own baseline (C's adds the float cache's probes)."""
    cache = workspace / "cache-shared"  # empty, whatever the module's other tests stored
    run = run_bench(workspace, "--models", "tiny-llama", "-n", "2", "--update-baselines",
                    "--run-id", "shared", "--cache-dir", str(cache))
    assert run.returncode == 0, run.stdout[-3000:]
    records = [json.loads(p.read_text()) for p in (workspace / "reports" / "runs" / "shared").glob("*.json")]
    assert {r["environment"]["xdist_worker"] for r in records} == {"gw0", "gw1"}
    for tracks in ("AB", "C"):  # per baseline, one worker measured it (miss), the other read it (hit)
        measured = {r["environment"]["xdist_worker"] for r in records
                    if r["track"] in tracks and r["cache"]["fp_baseline"] == "miss"}
        assert len(measured) == 1, (tracks, [(r["cell_id"], r["cache"]) for r in records])
    # the references come from the A/B baseline's own perplexity pass: no float top-k pass of their own
    assert "float top-k window" not in run.stderr, run.stderr
    assert len(list((cache / "references").glob("*/manifest.json"))) == 1
    kld = {r["cell_id"]: r["metrics"]["kld"]["wikitext2"]["mean"] for r in records if "kld" in r["metrics"]}
    assert set(kld) >= {"tiny-llama-rtn-A-tiny", "tiny-llama-rtn-B-tiny"}
