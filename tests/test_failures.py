"""The failure cases users hit (issue 13, "Failures that must be clear, and data that must not be
lost"), each as it was tried: every one is a one-paragraph usage error (exit 4, before any model
loads) or a clear failure of the cells concerned only, and nothing is deleted or lost. Tests are
numbered as the issue's list."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ptq.cache import CacheStore, cache_key
from ptq.registry import discover
from ptq.report.__main__ import main as report_main
from ptq.report.records import write_record
from tests.test_bench_end_to_end import ROOT, bench_command, bench_env, run_bench
from tests.test_matrix import collect
from tests.test_records import make_record
from tests.tiny import write_tiny_llama, write_wikitext

discover()  # pytester runs pytest in this process (see tests/test_matrix.py)
pytest_plugins = ["pytester"]

TINY_CELLS = [f"tiny-llama-{method}-{track}-tiny" for track in "AB" for method in ("fp16", "rtn")]
UNREACHABLE_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: the connection is refused at once


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A benchmark folder with a tiny random Llama, the same model with a NaN weight, and a hub model
    that is nowhere; WikiText-2 data only (no C4). Experiment `tiny`: fp16 and rtn on tracks A, B."""
    base = tmp_path_factory.mktemp("failures")
    lines = write_wikitext(base / "data", words=300, lines=600)
    model, tokenizer = write_tiny_llama(base / "tiny-llama", lines, vocab_size=400, heads=2, kv_heads=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(base / "nan-llama")
    tokenizer.save_pretrained(base / "nan-llama")
    bench = base / "bench"
    shutil.copytree(ROOT / "bench", bench)
    (bench / "baselines.json").unlink()
    sources = {"tiny-llama": f"{{kind: local, path: '{base / 'tiny-llama'}'}}",
               "nan-llama": f"{{kind: local, path: '{base / 'nan-llama'}'}}",
               "hub-missing": "{kind: hub, id: ptq-bench/no-such-model}"}
    for name, source in sources.items():
        (bench / "models" / f"{name}.yaml").write_text(
            f"model:\n  name: {name}\n  family: llama\n  source: {source}\n")
    (bench / "experiments" / "tiny.yaml").write_text(
        "experiment:\n  name: tiny\n  models: [tiny-llama]\n  methods: [fp16, rtn]\n  tracks: [A, B]\n"
        "eval: {seqlen: 64, max_windows: 4, batch_size: 2}\ngates: {max_ppl_ratio: null}\n")
    return base


def usage_error(result: subprocess.CompletedProcess | pytest.RunResult) -> str:
    """The output of a run that must have stopped with one usage error paragraph, and no traceback."""
    if isinstance(result, subprocess.CompletedProcess):
        code, output = result.returncode, result.stdout + result.stderr
    else:
        code, output = result.ret, result.stdout.str() + result.stderr.str()
    assert code == pytest.ExitCode.USAGE_ERROR, output[-3000:]
    assert "Traceback" not in output and "INTERNALERROR" not in output, output[-3000:]
    return output


def empty_outcome(entry: Path) -> None:
    (entry / "outcome.json").write_text("{}")


def records_of(ws: Path, run_id: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (ws / "reports" / "runs" / run_id).glob("*.json")}


# 1 ---------------------------------------------------------------------------- --cache-clear


def test_1_cache_clear_removes_only_cache_entries_and_never_when_collecting(ws: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my-files"  # a folder of a user's files, given as the cache by mistake
    (folder / "metrics").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "metrics" / "results.csv").write_text("mine")
    key = cache_key({"x": 1})
    CacheStore(folder).store("metrics", key, {"x": 1}, empty_outcome)

    listed = run_bench(ws, "--collect-only", "-q", "--cache-clear", "--cache-dir", str(folder))
    assert listed.returncode == 0, listed.stdout[-3000:]
    assert (folder / "metrics" / key).is_dir()  # listing the cells deletes nothing

    cleared = run_bench(ws, "--cache-clear", "--cache-dir", str(folder), "-k", "no-such-cell")
    assert cleared.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, cleared.stdout[-3000:]
    assert not (folder / "metrics" / key).exists()  # the cache's entry is gone ...
    assert (folder / "thesis.tex").read_text() == "years of work"  # ... and nothing else
    assert (folder / "metrics" / "results.csv").read_text() == "mine"


# 2 ---------------------------------------------------------------------------------- --run-id


@pytest.mark.parametrize("kind", ["relative", "absolute", "300-characters"])
def test_2_run_id_must_be_a_file_name(pytester: pytest.Pytester, tmp_path: Path, kind: str) -> None:
    run_id = {"relative": "../../escaped", "absolute": str(tmp_path / "x"), "300-characters": "r" * 300}[kind]
    output = usage_error(collect(pytester, tmp_path, "--run-id", run_id))  # checked at the start of any run
    assert f"--run-id {run_id!r}" in output and "1 to 100 letters" in output


# 3 ----------------------------------------------------------------------------- --reports-dir


def test_3_reports_dir_that_is_a_file_is_refused_before_any_cell(ws: Path, tmp_path: Path) -> None:
    file = tmp_path / "reports"
    file.write_text("not a folder")
    output = usage_error(run_bench(ws, "--methods", "fp16", "--tracks", "A", "--reports-dir", str(file)))
    assert f"--reports-dir {file}: {file} is a file" in output
    assert "loading" not in output  # no model loaded
    assert file.read_text() == "not a folder"


# 4 ------------------------------------------------------------------------------ value ranges


@pytest.mark.parametrize(("override", "message"), [
    ("eval.seqlen=0", "seqlen must be at least 2 tokens"),
    ("eval.batch_size=-1", "batch_size must be at least 1, got -1"),
    ("eval.max_windows=0", "max_windows must be at least 1, got 0"),
    ("calib.n_samples=0", "n_samples must be at least 1, got 0"),
    ("calib.batch_size=0", "batch_size must be at least 1, got 0"),
    ("gates.max_ppl_ratio=-1", "max_ppl_ratio must be positive"),
    ("gates.baseline_rel_tol=-0.1", "baseline_rel_tol must be at least 0, got -0.1"),
    ("kv_eval.decode_prompt=0", "decode_prompt must be at least 1, got 0"),
])
def test_4_out_of_range_settings_are_usage_errors_naming_the_override(
        pytester: pytest.Pytester, tmp_path: Path, override: str, message: str) -> None:
    output = usage_error(collect(pytester, tmp_path, "--methods", "gptq", "kv-rtn", "--override", override))
    assert f"--override {override}: " in output and message in output


# 5 ------------------------------------------------------------------------- undecodable files


@pytest.mark.parametrize(("content", "message"), [
    (b"experiment:\n  name: bad\n  description: \"caf\xe9\"\n", ":3: not UTF-8 text: byte 0xe9 at offset 43"),
    (b"experiment:\n  name: bad\n  description: \"a\x07b\"\n",
     ":3: malformed YAML: unacceptable character #x0007"),
], ids=["latin-1", "control-character"])
def test_5_a_yaml_file_that_is_not_utf8_text_is_an_error_naming_it(pytester: pytest.Pytester, tmp_path: Path,
                                                                  content: bytes, message: str) -> None:
    experiment = tmp_path / "bad.yaml"
    experiment.write_bytes(content)
    output = usage_error(collect(pytester, tmp_path, "--experiment", str(experiment)))
    assert f"{experiment}{message}" in output


def test_5_a_data_file_cut_inside_a_character_is_an_error_naming_it(ws: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(ws / "data", data)
    raw = data / "wikitext2" / "wiki.test.raw"
    raw.write_bytes(raw.read_bytes() + " Qué".encode()[:-1])  # the last byte is the first half of "é"
    output = usage_error(run_bench(ws, "--methods", "fp16", "--tracks", "A", PTQ_DATA_DIR=str(data)))
    assert f"{raw} is not UTF-8 text at byte" in output


# 6 --------------------------------------------------------------------- a broken float model


def test_6_a_failed_fp_baseline_is_measured_once_and_named_in_every_cell(ws: Path) -> None:
    result = run_bench(ws, "--models", "nan-llama", "--run-id", "nan", "--progress")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout[-3000:]
    cells = [cell.replace("tiny-llama", "nan-llama") for cell in TINY_CELLS]
    reasons = {cell: record["reason"] for cell, record in records_of(ws, "nan").items()}
    assert set(reasons) == set(cells)
    for reason in reasons.values():
        assert reason.startswith("BaselineFailed: the FP baseline of nan-llama failed: NonFiniteMetric: "
                                 "perplexity is nan"), reason
        assert "method" not in reason
    assert len(re.findall(r"evaluating window 4/4$", result.stderr, re.M)) == 1  # the baseline, measured once
    # one paragraph per cell in pytest's failure report, without a chained traceback
    assert len(re.findall(r"^BaselineFailed: ", result.stdout, re.M)) == len(cells)
    assert "Traceback" not in result.stdout and "During handling" not in result.stdout


# 7 ----------------------------------------------------------------- damaged cache, cache dir a file


@pytest.mark.parametrize("damaged", ["entry", "kind folder"])
def test_7_a_file_where_the_cache_has_a_folder_is_damage_removed_and_rebuilt(tmp_path: Path,
                                                                             damaged: str) -> None:
    store = CacheStore(tmp_path)
    key = cache_key({"x": 1})
    target = tmp_path / "metrics" / key if damaged == "entry" else tmp_path / "metrics"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("left by something else")
    found = store.lookup("metrics", key)
    if damaged == "entry":
        problem = f"metrics entry {key[:12]} is not a folder; removed and rebuilt"
        assert (found.status, found.problem) == ("rebuilt", problem)
    else:
        assert (found.status, found.problem) == ("miss", None)
    assert store.store("metrics", key, {"x": 1}, empty_outcome) is None
    assert store.lookup("metrics", key).status == "hit"


def test_7_a_cache_dir_that_is_a_file_is_refused_before_any_cell(pytester: pytest.Pytester,
                                                                 tmp_path: Path) -> None:
    file = tmp_path / "cache"
    file.write_text("not a folder")
    output = usage_error(collect(pytester, tmp_path, "--cache-dir", str(file)))  # checked when any run starts
    assert f"--cache-dir {file}: {file} is a file" in output
    assert file.read_text() == "not a folder"


def test_7_a_cell_keeps_its_measurement_when_the_cache_cannot_store_it(ws: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a-file").write_text("")
    (cache / "metrics").symlink_to(cache / "a-file" / "metrics")  # no entry can be written (even by root)
    result = run_bench(ws, "--methods", "fp16", "--tracks", "A", "--cache-dir", str(cache),
                       "--run-id", "unstored", "--update-baselines")
    assert result.returncode == 0, result.stdout[-3000:]
    record = records_of(ws, "unstored")["tiny-llama-fp16-A-tiny"]
    assert record["metrics"]["ppl"]["wikitext2"] > 1
    assert any(f.startswith("cache: metrics entry ") and "not stored (NotADirectoryError" in f
               for f in record["fallbacks"]), record["fallbacks"]


# 8 --------------------------------------------------------------------------------- --compare


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{\"rows\": [", "not JSON (Expecting value at line 1, column 11)"),
    ("{\"rows\": {}}", "not a leaderboard.json"),
    ("{\"rows\": [{\"cell\": \"x\", \"ppl_wikitext2\": \"28.8\"}]}", "rows[0] is"),
], ids=["missing", "malformed", "no-rows", "wrong-type"])
def test_8_compare_file_is_read_and_checked_before_any_cell(pytester: pytest.Pytester, tmp_path: Path,
                                                            content: str | None, message: str) -> None:
    previous = tmp_path / "leaderboard.json"
    if content is not None:
        previous.write_text(content)
    output = usage_error(collect(pytester, tmp_path, "--compare", str(previous)))  # checked as any run starts
    assert f"--compare {previous}: {message}" in output


# 9 --------------------------------------------------------------------------------------- -k


@pytest.mark.parametrize("target", ["tests/test_progress.py", "bench"])
def test_9_a_malformed_keyword_expression_is_a_usage_error_also_under_xdist(ws: Path, target: str) -> None:
    command = [sys.executable, "-m", "pytest", target, "-p", "no:cacheprovider", "-n", "2", "-k", "(",
               "--reports-dir", str(ws / "reports")]
    result = subprocess.run(command, cwd=ROOT, env=bench_env(ws), capture_output=True, text=True, timeout=300)
    output = usage_error(result)
    assert "-k '(' is not a valid expression" in output


# 10 -------------------------------------------------------------------------- merge over damage


@pytest.mark.parametrize(("damage", "message"), [
    (b"{\"schema_version\": 3, ", "JSONDecodeError"),
    (b"[1, 2]", "a record is a JSON object, not a list"),
    (json.dumps({"cell_id": "x"}).encode(), "record keys differ from the schema"),
    (b"\xff\xfe", "UnicodeDecodeError"),
], ids=["cut-json", "not-an-object", "other-schema", "not-utf8"])
def test_10_merge_over_a_damaged_record_names_it_and_exits_non_zero(tmp_path: Path, damage: bytes,
                                                                    message: str) -> None:
    folder = tmp_path / "runs" / "shard-1"
    write_record(make_record(), folder)
    damaged = folder / "damaged.json"
    damaged.write_bytes(damage)
    result = subprocess.run([sys.executable, "-m", "ptq.report", "merge", str(folder), "--reports-dir",
                             str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"merge: {damaged} is not a readable cell record" in result.stderr and message in result.stderr
    assert not (tmp_path / "merged").exists()  # nothing half written


def test_10_merge_of_folders_without_records_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"merge: no records \(<cell id>.json\) in .*empty"):
        report_main(["merge", str(tmp_path / "empty"), "--reports-dir", str(tmp_path / "merged")])


# 11 ------------------------------------------------------------------------------ empty shard


def test_11_a_shard_without_cells_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    output = usage_error(collect(pytester, tmp_path, "--shard", "11/11"))  # the default matrix has 10 cells
    assert ("--shard 11/11: this shard has no cells: the selection has 10 cell(s), so use at most 10 shards"
            in output)


# 12 ----------------------------------------------------------------------------- interruption

# Loaded into the run with -p: after its first cell, each process says so and waits, so the run
# is interrupted in the middle of its cells, at a known point (under xdist each worker may have
# finished one cell: with one model and two workers, cells go to both).
# Short sleeps: a signal the kernel hands to another thread (torch's) only sets a flag, which the
# main thread acts on when it next runs Python; one long sleep would hold the interrupt back.
PAUSE_PLUGIN = '''
import os, time
def pytest_runtest_teardown(item):
    open(os.environ["PTQ_TEST_READY"], "a").close()
    for _ in range(1200):
        time.sleep(0.1)
'''


def _signals_as_from_a_terminal() -> None:
    """In the child before exec: SIGINT and SIGTERM unblocked and at their default disposition (a
    blocked or ignored signal is inherited, and a full test session's worker may carry one)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    for sent in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sent, signal.SIG_DFL)


@pytest.mark.parametrize(("sent", "workers", "by"), [
    (signal.SIGTERM, 0, "SIGTERM"), (signal.SIGINT, 0, "Ctrl-C"), (signal.SIGTERM, 2, "SIGTERM")],
    ids=["sigterm", "ctrl-c", "sigterm-to-every-xdist-process"])
def test_12_an_interrupted_run_writes_the_finished_cells_marked_as_interrupted(
        ws: Path, tmp_path: Path, sent: signal.Signals, workers: int, by: str) -> None:
    (tmp_path / "pause_plugin.py").write_text(PAUSE_PLUGIN)
    ready = tmp_path / "ready"
    env = bench_env(ws, PTQ_TEST_READY=str(ready), PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    reports = tmp_path / "reports"
    command = bench_command(ws, "-p", "pause_plugin", "-n", str(workers), "--reports-dir", str(reports),
                            "--run-id", "stopped", "--no-cache")
    # its own process group: the signal goes to the run (and, as Slurm does, to all its processes);
    # with the signal state of a terminal, not whatever the xdist worker running this test inherited
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True, preexec_fn=_signals_as_from_a_terminal)
    deadline = time.monotonic() + 300
    while not ready.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), run.communicate()[0][-3000:]
    time.sleep(3)  # the first cell's record reaches the controller (under xdist, from its worker)
    if workers:
        os.killpg(run.pid, sent)
    else:
        run.send_signal(sent)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == pytest.ExitCode.INTERRUPTED, stdout[-3000:] + stderr[-3000:]
    assert "INTERNALERROR" not in stdout + stderr
    finished = sorted(p.stem for p in (reports / "runs" / "stopped").glob("*.json"))
    assert 1 <= len(finished) <= max(1, workers) and set(finished) <= set(TINY_CELLS)
    payload = json.loads((reports / "leaderboard.json").read_text())
    assert sorted(row["cell"] for row in payload["rows"]) == finished
    assert payload["interrupted"]["by"] == by and payload["interrupted"]["finished_cells"] == len(finished)
    markdown = (reports / "leaderboard.md").read_text().splitlines()
    assert markdown[2].startswith(f"**Interrupted ({by}): this run stopped after {len(finished)} finished cell(s)")
    assert f"Interrupted ({by})" in stdout  # and the terminal says so above the leaderboard


# 13 ---------------------------------------------------------------------- offline, missing data


def test_13_an_offline_hub_model_fails_at_once_and_is_tried_once(ws: Path, tmp_path: Path) -> None:
    result = run_bench(ws, "--models", "hub-missing", "--tracks", "A", "--run-id", "offline", "--progress",
                       HF_HUB_CACHE=str(tmp_path / "hub-cache"), **UNREACHABLE_HUB)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout[-3000:]
    assert "Retrying" not in result.stdout + result.stderr  # no retries, no screen of warnings
    assert len(re.findall(r"loading hub-missing$", result.stderr, re.M)) == 1  # not once per cell
    reasons = [record["reason"] for record in records_of(ws, "offline").values()]
    assert len(reasons) == 2
    # rtn-A runs first and fails to load the model; the FP baseline fails with the same error, not tried again
    unavailable = ("ModelUnavailable: cannot load ptq-bench/no-such-model from its local cache "
                   "(the hub is not used: http://127.0.0.1:9 is unreachable")
    baseline_failed = "BaselineFailed: the FP baseline of hub-missing failed: "
    assert sorted(reasons)[0].startswith(baseline_failed + unavailable)
    assert sorted(reasons)[1].startswith(unavailable)


def test_13_a_missing_calibration_file_is_a_usage_error_before_any_model_loads(ws: Path) -> None:
    output = usage_error(run_bench(ws, "--methods", "gptq", "--tracks", "A", **UNREACHABLE_HUB))
    expected = ws / "data" / "c4" / "c4_calibration.jsonl.gz"
    assert f"c4/calibration is not available: expected the file {expected}" in output
    assert "the hub is not used: http://127.0.0.1:9 is unreachable" in output
