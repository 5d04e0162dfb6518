"""Wires the benchmark into pytest: options (checked before any cell runs: a mistake is a usage
error), the cell matrix, `-k` on cell names, SIGTERM taken as Ctrl-C, and the leaderboard
written from all cells' records (also under xdist; marked as such when the run was interrupted).

The fixtures themselves live in fixtures/ (devices, models, recording).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ptq import progress
from ptq.cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR, CacheStore, cache_dir
from ptq.errors import PtqError
from ptq.gates import BaselineStore
from ptq.matrix import DEFAULT_EXPERIMENT, Catalog, Cell, cell_of, compile_keyword
from ptq.report.audit import AuditConfig, AuditRow, render_audit, write_audit
from ptq.report.compare import Comparison, compare_rows, load_rows, nothing_compared
from ptq.report.leaderboard import leaderboard_rows, render_comparison
from ptq.report.markdown import render_terminal
from ptq.report.records import REPORT_PROPERTY, check_folder, check_run_id
from ptq.report.write import interrupted_note, write_reports
from ptq.session import Request, plan

pytest_plugins = ["fixtures.devices", "fixtures.models", "fixtures.recording"]

ROOT = Path(__file__).parent
CELLS = pytest.StashKey[list[Cell]]()
SIGTERM_HANDLER = pytest.StashKey[Any]()  # the handler ours replaced, restored at the end


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ptq-bench", "post-training quantization benchmark")
    group.addoption("--models", nargs="+", help="model names (bench/models/*.yaml); default: all, or the experiment's")
    group.addoption("--methods", nargs="+", help="methods (bench/methods/*.yaml), or pipelines of them joined by "
                    "+ (awq+gptq: run in order on one block walk); default: all")
    group.addoption("--tracks", nargs="+", help="tracks A B C; default: all")
    group.addoption("--experiment", nargs="+",
                    help="experiments: names in bench/experiments/ or YAML paths (default: default, plus the "
                         "experiments whose markers -m selects, e.g. -m audit); cells of experiments other than "
                         "'default' carry its name in their id")
    group.addoption("--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="set any config key last (repeatable), e.g. --override weight.bits=3")
    group.addoption("--update-baselines", action="store_true",
                    help="write the measured metrics into bench/baselines.json instead of checking them")
    group.addoption("--bench-dir", default=str(ROOT / "bench"), help="folder of the benchmark YAMLs")
    group.addoption("--reports-dir", default=str(ROOT / "reports"), help="where records and the leaderboard go")
    group.addoption("--run-id", help="name of this run's records folder (default: time and a random suffix)")
    group.addoption("--compare", metavar="OLD_LEADERBOARD.json",
                    help="mark every cell better/worse than a previous leaderboard; a PPL worse by more than "
                         "--compare-tol fails the session")
    group.addoption("--compare-tol", type=float, default=0.01, help="relative PPL tolerance of --compare")
    group.addoption("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="a line per cell stage on the terminal (loading, calibrating block i/N, evaluating "
                         "window j/M), at most one per stage every few seconds, prefixed by worker and cell")
    group.addoption("--shard", metavar="I/N", help="run only the I-th of N deterministic slices of the cells "
                    "(merge the shards' records with `python -m ptq.report merge`)")
    group.addoption("--cache-dir", help=f"where quantized weights and measured metrics are cached "
                    f"(default: ${CACHE_DIR_ENV}, else {DEFAULT_CACHE_DIR}); pytest's --cache-clear empties it first")
    group.addoption("--no-cache", action="store_true", help="neither read nor write the cache: measure every cell")


PERF = (ROOT / "bench" / "perf").resolve()  # micro benchmarks: run only when named, never with the matrix


def _paths(config: pytest.Config) -> list[Path]:
    return [Path(arg.split("::")[0]).resolve() for arg in config.args] or [Path(config.rootpath)]


def _wants_matrix(config: pytest.Config) -> bool:
    """Build the matrix only when the benchmark module is among the collected paths."""
    bench = (ROOT / "bench").resolve()
    return any((path.is_relative_to(bench) and not path.is_relative_to(PERF)) or bench.is_relative_to(path)
               for path in _paths(config))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """bench/perf is collected only when a path inside it is given (`pytest bench/perf`), so neither
    `pytest bench` nor `pytest tests bench` runs the micro benchmarks."""
    if collection_path.resolve().is_relative_to(PERF) and not any(p.is_relative_to(PERF) for p in _paths(config)):
        return True
    return None


def _usage_error(message: str, catalog: Catalog | None) -> pytest.UsageError:
    if catalog is not None:
        message += (f"\n  models: {' '.join(catalog.models)}\n  methods: {' '.join(catalog.methods)} (join them "
                    f"with + for a pipeline, e.g. awq+gptq)\n  tracks: {' '.join(catalog.tracks)}"
                    f"\n  experiments: {' '.join(catalog.experiments)}")
    return pytest.UsageError(message)


@pytest.hookimpl(tryfirst=True)  # conftest hooks run before xdist's own tryfirst one, which reads -n
def pytest_cmdline_main(config: pytest.Config) -> None:
    """pytest.ini's `--dist loadgroup` without `-n` starts no worker, but other plugins read it as a
    distributed run (pytest-benchmark then disables itself): without workers, say so."""
    if not config.getoption("numprocesses", None) and not config.getoption("tx", None):
        config.option.dist = "no"


def _sigterm_as_interrupt(config: pytest.Config) -> None:
    """SIGTERM (how Slurm and `kill` stop a job) ends a process at once by default: no leaderboard.
    Taken as Ctrl-C instead, pytest finishes the session: the leaderboard of the cells that
    finished, marked as interrupted. Later SIGTERMs are ignored while it is written."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    config.stash[SIGTERM_HANDLER] = signal.signal(signal.SIGTERM, interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    if SIGTERM_HANDLER in config.stash:
        signal.signal(signal.SIGTERM, config.stash[SIGTERM_HANDLER])


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    controller = not hasattr(config, "workerinput")
    option = config.getoption
    if controller:
        run_id = option("run_id") or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        config.ptq_run = {"run_id": run_id,
                          "command_line": [sys.executable, "-m", "pytest", *config.invocation_params.args]}
    else:
        config.ptq_run = json.loads(config.workerinput["ptq_run"])
    _sigterm_as_interrupt(config)
    if controller:
        collector = LeaderboardCollector(config)
        config.pluginmanager.register(collector, "ptq-leaderboard")
    config.stash[CELLS] = []
    catalog = None
    try:
        # -k is checked here, before xdist starts workers: an error where they collect is an internal one
        if config.option.keyword.strip():
            compile_keyword(config.option.keyword.lstrip())
        if not _wants_matrix(config):
            return
        if controller:  # where records, the leaderboard and the cache go, before any cell runs
            check_run_id(config.ptq_run["run_id"])
            check_folder(Path(option("reports_dir")), "--reports-dir")
            if not option("no_cache"):
                check_folder(cache_dir(option("cache_dir")), "--cache-dir")
            collector.previous = load_rows(Path(option("compare"))) if option("compare") else None
            audit_file = Path(option("bench_dir")) / "audit.yaml"
            collector.audit_config = AuditConfig.load(audit_file) if audit_file.is_file() else None
        catalog = Catalog(Path(option("bench_dir")))
        experiments = option("experiment") or [DEFAULT_EXPERIMENT, *catalog.marked_experiments(config.option.markexpr)]
        request = Request(option("models") and tuple(option("models")), option("methods") and tuple(option("methods")),
                          option("tracks") and tuple(option("tracks")), tuple(experiments),
                          tuple(option("override")), option("shard"))
        # missing data is a usage error, before any model loads
        config.stash[CELLS] = plan(catalog, request, config.ptq_device.type, check_data=not config.option.collectonly)
    except PtqError as exc:
        raise _usage_error(f"ptq-bench: {exc}", catalog) from None
    config.ptq_catalog = catalog
    # pytest's own --cache-clear (absent with -p no:cacheprovider) also empties ours, once the run is
    # known to be valid, and never for a run that only lists the cells
    if controller and option("cacheclear", False) and not config.option.collectonly:
        CacheStore(cache_dir(option("cache_dir"))).clear()


def pytest_configure_node(node) -> None:  # xdist controller: hand the run id to each worker
    node.workerinput["ptq_run"] = json.dumps(node.config.ptq_run)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under `--dist loadgroup` (the default here), all cells of one model go to one worker, so
    each model loads once, when there are at least as many models as workers. With fewer (the
    default experiment has one model), cells are scheduled one by one: every worker loads the
    model once and no core idles (on CPU each worker has cores / workers torch threads).

    Cells are grouped by the controller's own cell list rather than by xdist_group marks,
    which xdist 3.8 fails to apply on pytest 9.2 (it renames `item._nodeid`, which pytest
    no longer reads). Other tests are scheduled one by one.
    """
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    cells = config.stash[CELLS]
    workers = config.getoption("numprocesses", None)
    by_model = not isinstance(workers, int) or len({cell.model for cell in cells}) >= workers
    model_of = {f"test_cell[{cell.id}]": cell.model for cell in cells} if by_model else {}

    class ModelGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            model = model_of.get(nodeid.rsplit("::", 1)[-1])
            return f"model:{model}" if model else super()._split_scope(nodeid)

    return ModelGroupScheduling(config, log)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" not in metafunc.fixturenames:
        return
    params = []
    for cell in metafunc.config.stash[CELLS]:
        model = cell.config.model
        marks = [getattr(pytest.mark, model.size), *(getattr(pytest.mark, name) for name in cell.markers)]
        if model.needs_gpu:
            marks.append(pytest.mark.gpu)
        if model.size != "small":
            marks.append(pytest.mark.slow)
        params.append(pytest.param(cell, id=cell.id, marks=marks))
    metafunc.parametrize("cell", params)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Track the progress of a benchmark cell while its test runs (see ptq.progress)."""
    cell = cell_of(item)
    if cell is None or not item.config.getoption("progress"):
        return (yield)
    capture = item.config.pluginmanager.getplugin("capturemanager")  # None under -p no:capture

    def write(line: str) -> None:  # around pytest's output capture, which holds fd 2 during a test
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            progress.terminal_write(line)

    with progress.tracking(cell.id, write):
        return (yield)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`-k` on cells matches whole names (see ptq.matrix.Cell.matches); other tests keep pytest's matching."""
    longest_first(items)
    expression = config.option.keyword.lstrip()
    if not expression:
        return
    from _pytest.mark import KeywordMatcher

    compiled = compile_keyword(expression)  # valid: checked at configure time
    kept, dropped = [], []
    for item in items:
        cell = cell_of(item)
        matches = cell.matches(compiled) if cell else compiled.evaluate(KeywordMatcher.from_item(item))
        (kept if matches else dropped).append(item)
    config.option.keyword = ""  # done here; pytest's pass would re-match substrings
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def longest_first(items: list[pytest.Item]) -> None:
    """Cells by their likely cost, longest first, in the places cells hold: cells whose pipelines
    calibrate, then cells with KV probes (passkey, decoding), then the others; in each, FP baselines
    last (the cells before them have usually measured them). Under xdist the long cells start at
    once on separate workers, and the short ones come last: a worker is handed its next cell one
    ahead, so whatever is left at the end runs on one worker while the other may idle. Within each
    group, one sweep setting after another (in their order): cells of one method at W4A16 and W4A8
    share their weights, so the second, run later, reads them from the cache instead of quantizing
    beside the first."""
    cells = [(index, item, cell) for index, item in enumerate(items) if (cell := cell_of(item)) is not None]
    ranks: dict[str | None, int] = {}
    for _, _, cell in cells:
        ranks.setdefault(cell.setting, len(ranks))

    def cost(entry: tuple[int, pytest.Item, Cell]) -> tuple[bool, bool, bool, int]:
        cell = entry[2]
        return (not cell.pipeline.calibrated, cell.config.kv_eval is None, cell.pipeline.baseline,
                ranks[cell.setting])

    ordered = sorted(cells, key=cost)
    for (index, _, _), (_, item, _) in zip(cells, ordered):
        items[index] = item


class LeaderboardCollector:
    """On the controller (or a plain run): gathers every cell's record from the test
    reports, which xdist ships from workers, then writes the leaderboard and, with
    --update-baselines, the baselines of the cells that passed."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.previous: list[dict] | None = None  # the rows of --compare, read and checked at the start
        self.records: list[dict] = []
        self.regressions: list[Comparison] = []
        self.interrupted: str | None = None  # what stopped the run early (SIGTERM, Ctrl-C, -x), if anything
        self.compared_nothing: str | None = None  # why --compare compared no cell (the session fails)
        self.audit: list[AuditRow] = []
        self.audit_config: AuditConfig | None = None  # bench/audit.yaml, read and checked at the start

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == REPORT_PROPERTY:
                self.records.append(json.loads(value))

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        self.interrupted = str(excinfo.value) or "Ctrl-C"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.records:
            return
        self.interrupted = self.interrupted or session.shouldstop or session.shouldfail or None
        comparison = None
        if self.previous is not None:
            source = self.config.getoption("compare")
            comparisons = compare_rows(leaderboard_rows(self.records), self.previous,
                                       self.config.getoption("compare_tol"))
            comparison = (source, comparisons)
            self.regressions = [c for c in comparisons if c.verdict == "worse"]
            self.compared_nothing = nothing_compared(comparisons)
            if self.regressions or self.compared_nothing:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        write_reports(self.records, Path(self.config.getoption("reports_dir")), self.config.ptq_run["run_id"],
                      comparison, self.interrupted)
        if self.audit_config is not None:  # backend cells next to our implementations (pytest bench -m audit)
            self.audit = write_audit(self.records, self.audit_config, Path(self.config.getoption("reports_dir")),
                                     self.config.ptq_run["run_id"])
            if any(row.failed for row in self.audit):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.config.getoption("update_baselines"):
            store = BaselineStore(Path(self.config.getoption("bench_dir")) / "baselines.json")
            store.update_passed(self.records)
            store.save()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.records:
            return
        terminalreporter.write_sep("=", "ptq-bench leaderboard")
        if self.interrupted:
            terminalreporter.write_line(interrupted_note(self.interrupted, self.records), red=True)
        terminalreporter.write_line(render_terminal(self.records, self.config.ptq_run["run_id"]))
        reports = Path(self.config.getoption("reports_dir"))
        terminalreporter.write_line(f"written: {reports / 'leaderboard.md'} (and .json, .html, plots/), records in "
                                    f"{reports / 'runs' / self.config.ptq_run['run_id']}")
        if self.audit:
            failed = [row for row in self.audit if row.failed]
            terminalreporter.write_sep("=", "ptq-bench fidelity audit" + (f": {len(failed)} failed" if failed else ""),
                                       red=bool(failed))
            assert self.audit_config is not None
            table = render_audit(self.audit, self.audit_config, self.config.ptq_run["run_id"]).split("\n\n")[2]
            terminalreporter.write_line(table)
            terminalreporter.write_line(f"written: {reports / 'audit.md'} (and audit.json)")
        if self.regressions:
            terminalreporter.write_sep("=", f"regressions against {self.config.getoption('compare')}", red=True)
            terminalreporter.write_line(render_comparison(self.regressions, self.config.getoption("compare")))
        if self.compared_nothing:
            terminalreporter.write_sep("=", f"--compare {self.config.getoption('compare')}", red=True)
            terminalreporter.write_line(self.compared_nothing)
