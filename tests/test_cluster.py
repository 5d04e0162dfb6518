"""bench/cluster/slurm_submitit.py builds the right commands, without Slurm or submitit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("slurm_submitit", ROOT / "bench" / "cluster" / "slurm_submitit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing it needs no submitit
    return module


def test_one_shard_command_per_task_and_a_merge_over_their_records(script, tmp_path: Path) -> None:
    out = tmp_path / "exp1"
    shards = [script.shard_command(i, 3, out, ["--experiment", "track-a"], python="py") for i in (1, 2, 3)]
    assert shards[1] == ["py", "-m", "pytest", str(ROOT / "bench"), "--shard", "2/3",
                         "--reports-dir", str(out / "shard-2"), "--run-id", "shard-2", "-p", "no:cacheprovider",
                         "--experiment", "track-a"]
    merge = script.merge_command(3, out, python="py")
    # the folders merged are where fixtures/recording.py puts each shard's records: REPORTS_DIR/runs/RUN_ID
    folders = [Path(cmd[cmd.index("--reports-dir") + 1]) / "runs" / cmd[cmd.index("--run-id") + 1] for cmd in shards]
    assert merge == ["py", "-m", "ptq.report", "merge", *map(str, folders), "--reports-dir", str(out),
                     "--run-id", "exp1"]


def test_dry_run_prints_the_commands(script, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert script.main(["--shards", "2", "--out", str(tmp_path), "--dry-run", "--", "-m", "not slow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("--shard 1/2 --reports-dir " f"{tmp_path}/shard-1 --run-id shard-1 -p no:cacheprovider "
                             "-m 'not slow'")
    assert " -m ptq.report merge " in lines[2]


def test_without_submitit_the_message_says_how_to_install_it(script, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[cluster\]'"):
        script.main(["--shards", "2", "--out", str(tmp_path)])


def test_submit_runs_the_shards_then_the_merge(script, tmp_path: Path) -> None:
    """With submitit installed and no Slurm, AutoExecutor runs the jobs as local subprocesses."""
    pytest.importorskip("submitit")
    args, _ = script.parse_args(["--shards", "2", "--out", str(tmp_path), "--cpus", "1", "--mem-gb", "1"])
    shards = [[sys.executable, "-c", f"open({str(tmp_path / f'shard-{i}')!r}, 'w').write('done')"] for i in (1, 2)]
    merge = [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(tmp_path)!r}); "
             "(p / 'merged').write_text(str(sorted(f.name for f in p.glob('shard-*'))))"]
    script.submit(args, shards, merge).result()
    assert (tmp_path / "merged").read_text() == "['shard-1', 'shard-2']"  # the merge ran after both shards
