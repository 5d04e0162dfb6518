"""Cell records: one JSON and one Markdown file per cell, written atomically.

A record holds everything needed to reproduce and judge a cell: the fully resolved
config, the metrics, the gates and their outcome, and the environment (code version,
packages, device, data and model checksums, command line).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptq.errors import ConfigError

# 2: a cell's method variant, and how the cache served it; 3: pipelines (config.method.stages,
# metrics.stage_seconds, data.quantized: what was quantized where, bits per weight as run) and
# the experiment's sweep entry (`setting`)
SCHEMA_VERSION = 3
PACKAGES = ("ptq-bench", "torch", "transformers", "accelerate", "datasets", "lm_eval", "gguf", "numpy")
STATUSES = ("passed", "failed", "skipped")
REPORT_PROPERTY = "ptq_record"  # name under which a record travels in a test report's user_properties

# The exact top-level layout of a record: key -> type(s) of its value.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "run_id": str,
    "cell_id": str,
    "model": str,
    "method": str,
    "variant": (str, type(None)),
    "setting": (str, type(None)),
    "track": str,
    "experiment": (str, type(None)),
    "status": str,
    "reason": (str, type(None)),
    "config": dict,
    "config_fingerprint": (str, type(None)),
    "metrics": dict,
    "gates": list,
    "notes": list,
    "fallbacks": list,
    "model_source": (dict, type(None)),
    "data": dict,
    "cache": dict,  # per stage (metrics, weights, fp_baseline): hit, miss, rebuilt, off, none or skipped
    "environment": dict,
    "started": str,
    "wall_seconds": float,
}


@dataclass
class CellRecord:
    """One cell's record, filled in as the cell runs: started when the cell starts, measured by
    ptq.session (metrics, gates, what was quantized), finished with the test's outcome."""

    run_id: str
    cell_id: str
    model: str
    method: str
    variant: str | None
    setting: str | None  # the experiment's sweep entry
    track: str
    experiment: str | None
    config: dict[str, Any]
    config_fingerprint: str | None
    status: str = "failed"  # until the test's outcome says otherwise
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    model_source: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                         .isoformat(timespec="seconds"))
    wall_seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def finish(self, status: str, reason: str | None, environment: dict[str, Any], wall_seconds: float) -> None:
        self.status, self.reason, self.environment, self.wall_seconds = status, reason, environment, wall_seconds

    def to_dict(self) -> dict[str, Any]:
        """The record as written, checked against the schema."""
        record = dataclasses.asdict(self)
        validate_record(record)
        return record


def validate_record(record: dict[str, Any]) -> None:
    """Raise ValueError unless `record` has exactly the schema's keys, with the right types."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not a {type(record).__name__}")
    keys, expected = set(record), set(RECORD_FIELDS)
    if keys != expected:
        raise ValueError(f"record keys differ from the schema: missing {sorted(expected - keys)}, "
                         f"unexpected {sorted(keys - expected)}")
    for key, kind in RECORD_FIELDS.items():
        if not isinstance(record[key], kind):
            raise ValueError(f"record[{key!r}] is {type(record[key]).__name__}, expected {kind}")
    if record["status"] not in STATUSES:
        raise ValueError(f"record status {record['status']!r} is not one of {STATUSES}")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(repo: Path, device: torch.device, command_line: list[str]) -> dict[str, Any]:
    """Where and with what a cell ran."""
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=repo)
    cuda = device.type == "cuda"
    return {
        "git_commit": _git("rev-parse", "HEAD", cwd=repo),
        "git_dirty": bool(status) if status is not None else None,
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "cuda_version": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "xdist_worker": os.environ.get("PYTEST_XDIST_WORKER"),
        "command_line": command_line,
    }


# A run id names the folder reports/runs/<run id>: one safe file-name component.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> None:
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"--run-id {run_id!r}: a run id names the folder of its records (reports/runs/"
                          "<run id>): 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or "
                          "a digit")


def check_folder(path: Path, option: str) -> None:
    """`path` is a folder this process can write into, or can be made one (its first existing
    ancestor is a writable folder)."""
    path = path.expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file; {option} needs a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable by this user")


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    binary = isinstance(text, bytes)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; reports are for everyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def render_markdown(record: dict[str, Any]) -> str:
    lines = [f"# {record['cell_id']}: {record['status']}", ""]
    if record["reason"]:
        lines += [f"**Reason:** {record['reason']}", ""]
    lines += ["## Metrics", "", "```json", json.dumps(record["metrics"], indent=2), "```", ""]
    if record["gates"]:
        lines += ["## Gates", "", "| gate | measured | limit | baseline | passed |", "|---|---|---|---|---|"]
        for gate in record["gates"]:
            lines.append(f"| {gate['name']} | {gate.get('measured')} | {gate.get('limit')} | "
                         f"{gate.get('baseline')} | {gate['passed']} |")
        lines.append("")
    for title, key in (("Notes", "notes"), ("Fallbacks", "fallbacks")):
        if record[key]:
            lines += [f"## {title}", ""] + [f"- {item}" for item in record[key]] + [""]
    for title, key in (("Configuration", "config"), ("Model source", "model_source"), ("Data", "data"),
                       ("Cache", "cache"), ("Environment", "environment")):
        lines += [f"## {title}", "", "```json", json.dumps(record[key], indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_record(record: dict[str, Any], run_dir: Path) -> Path:
    """Validate and write `<cell_id>.json` and `<cell_id>.md` under `run_dir`; return the JSON path."""
    validate_record(record)
    json_path = run_dir / f"{record['cell_id']}.json"
    atomic_write(json_path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write(run_dir / f"{record['cell_id']}.md", render_markdown(record))
    return json_path
