"""Run the benchmark matrix on a Slurm cluster with submitit: a job array with one shard of the
matrix per task, then a merge job, started once every shard has ended, that builds one
leaderboard from all the shards' records.

    pip install -e '.[cluster]'
    python bench/cluster/slurm_submitit.py --shards 8 --out /shared/ptq-runs/exp1 \\
        --partition gpu --gpus 1 --timeout-min 240 -- --experiment track-a

Arguments after `--` go to every shard's pytest. Shard i writes its records to
OUT/shard-i/runs/shard-i/; the merge writes OUT/leaderboard.{md,json,html} and OUT/plots/.
OUT must be on a filesystem the compute nodes share; submitit's logs go to OUT/slurm/.
Without Slurm (no `srun` on PATH) submitit runs the same jobs as local subprocesses, one
after the other's end for the merge. `--dry-run` prints the commands and submits nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import submitit

ROOT = Path(__file__).resolve().parents[2]


def shard_dir(out: Path, index: int) -> Path:
    """Where shard `index` writes: its reports dir, and the run id of its records folder."""
    return out / f"shard-{index}"


def shard_command(index: int, count: int, out: Path, pytest_args: list[str], python: str = sys.executable) -> list[str]:
    return [python, "-m", "pytest", str(ROOT / "bench"), "--shard", f"{index}/{count}",
            "--reports-dir", str(shard_dir(out, index)), "--run-id", f"shard-{index}", "-p", "no:cacheprovider",
            *pytest_args]


def merge_command(count: int, out: Path, python: str = sys.executable) -> list[str]:
    records = [str(shard_dir(out, index) / "runs" / f"shard-{index}") for index in range(1, count + 1)]
    return [python, "-m", "ptq.report", "merge", *records, "--reports-dir", str(out), "--run-id", out.name]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, pytest_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="arguments after -- are passed to every shard's pytest")
    parser.add_argument("--shards", type=int, required=True, help="number of shards (array tasks)")
    parser.add_argument("--out", type=Path, required=True, help="shared folder for the shards' records and the merge")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per shard")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs per shard")
    parser.add_argument("--mem-gb", type=float, default=64, help="memory per shard")
    parser.add_argument("--timeout-min", type=int, default=240, help="time limit of each shard")
    parser.add_argument("--parallel", type=int, help="at most this many shards at once (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, submit nothing")
    args = parser.parse_args(ours)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    return args, pytest_args


def submit(args: argparse.Namespace, shards: list[list[str]], merge: list[str]) -> submitit.Job:
    """Submit the shards as one job array and the merge after them; return the merge job."""
    try:
        import submitit
    except ImportError:
        raise SystemExit("slurm_submitit.py needs submitit, an optional dependency: "
                         "pip install -e '.[cluster]' (or: pip install submitit)") from None
    executor = submitit.AutoExecutor(folder=args.out / "slurm" / "%j")
    executor.update_parameters(name="ptq-shard", timeout_min=args.timeout_min, cpus_per_task=args.cpus,
                               gpus_per_node=args.gpus, mem_gb=args.mem_gb, slurm_partition=args.partition,
                               slurm_array_parallelism=args.parallel or len(shards))
    with executor.batch():
        jobs = [executor.submit(submitit.helpers.CommandFunction(command, cwd=str(ROOT))) for command in shards]
    print(f"submitted {len(jobs)} shards: {' '.join(job.job_id for job in jobs)}")
    merger = submitit.AutoExecutor(folder=args.out / "slurm" / "%j")
    merger.update_parameters(name="ptq-merge", timeout_min=15, cpus_per_task=1, mem_gb=4,
                             slurm_partition=args.partition)
    if merger.cluster == "slurm":
        # afterany, not afterok: a shard with a failed cell exits non-zero but its records still count
        array = jobs[0].job_id.split("_")[0]
        merger.update_parameters(slurm_additional_parameters={"dependency": f"afterany:{array}"})
    else:  # local subprocesses: no scheduler to hold the merge back
        for job in jobs:
            job.wait()
    job = merger.submit(submitit.helpers.CommandFunction(merge, cwd=str(ROOT)))
    print(f"submitted the merge: {job.job_id}; leaderboard: {args.out / 'leaderboard.md'}")
    return job


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out = args.out.resolve()
    shards = [shard_command(index, args.shards, args.out, pytest_args) for index in range(1, args.shards + 1)]
    merge = merge_command(args.shards, args.out)
    if args.dry_run:
        print("\n".join(shlex.join(command) for command in [*shards, merge]))
        return 0
    submit(args, shards, merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
