"""The environments library backends run in, built on demand and cached.

A backend whose packages are not part of the core install (their pins conflict with it, or
they are too heavy to impose) runs in an environment of its own: a venv built with `uv` from a
lock file (`locks/<name>.txt`, every package pinned, compiled from `locks/<name>.in` by
`python -m ptq.backends lock <name>`), cached under `$PTQ_ENVS_DIR` (default
~/.cache/ptq-bench-envs) in a folder keyed by the lock's content and the Python version. `core`
is the running interpreter (hqq and optimum-quanto are core dependencies).

Torch: each lock pins the core's CPU build (`torch==2.13.0+cpu`). uv does not read pip's
configuration, which on this kind of machine points `find-links` at a folder holding that
wheel; we hand uv the same find-links, so it takes the wheel from disk and never resolves a
CUDA build (an exact local version has no other candidate). Files are hard-linked from uv's
cache, so a second environment costs little disk beyond its own packages.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ptq.errors import BackendUnavailable

CORE = "core"
LOCKS = Path(__file__).parent / "locks"
ENVS_DIR_ENV = "PTQ_ENVS_DIR"
DEFAULT_ENVS_DIR = Path.home() / ".cache" / "ptq-bench-envs"
COMPLETE = ".complete"  # written last: a folder without it is a failed or interrupted build
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)")


def envs_dir() -> Path:
    return Path(os.environ.get(ENVS_DIR_ENV) or DEFAULT_ENVS_DIR)


def lock_file(name: str) -> Path:
    return LOCKS / f"{name}.txt"


def locked_packages(name: str) -> dict[str, str]:
    """Every package the lock pins, name -> version."""
    pins = {}
    for line in lock_file(name).read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def env_key(name: str) -> str:
    """The lock's content and the interpreter's version: what the environment is built from."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return hashlib.sha256(lock_file(name).read_bytes() + python.encode()).hexdigest()[:16]


def describe(name: str) -> dict[str, Any]:
    """What a result computed in the environment depends on (a cache-key input): the lock."""
    return {"env": name, "lock_sha256": hashlib.sha256(lock_file(name).read_bytes()).hexdigest(),
            "packages": locked_packages(name)}


def install_command(name: str) -> str:
    """What a user runs to build the environment by hand (the cell does the same on demand)."""
    return f"pip install uv && python -m ptq.backends build {name}"


def _uv() -> str:
    beside = Path(sys.executable).parent / "uv"  # `pip install uv` into the core venv puts it here
    found = str(beside) if beside.is_file() else shutil.which("uv")
    if found is None:
        raise BackendUnavailable("uv is not installed (library backends build their environments with it); "
                                 "install it with: pip install uv")
    return found


def pip_find_links() -> list[str]:
    """The find-links locations pip is configured with (files and environment), for uv."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found = []
    for line in listing.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            found += [part for part in value.strip().strip("'\"").split() if part not in found]
    return found


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per environment (xdist workers may ask for it together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def folder_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the files under `folder` (each inode once), and of those not hard-linked elsewhere:
    uv links files from its cache, which environments share, so the second is what this one adds."""
    seen, total, own = set(), 0, 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
                own += stat.st_size if stat.st_nlink == 1 else 0
    return total, own


def ensure(name: str) -> Path:
    """The interpreter of environment `name`, built first if needed (with the time and disk it
    took written beside it); BackendUnavailable, with the reason and the command, if it cannot be."""
    if name == CORE:
        return Path(sys.executable)
    if not lock_file(name).is_file():
        raise BackendUnavailable(f"no lock file {lock_file(name)} for environment {name}")
    folder = envs_dir() / f"{name}-{env_key(name)}"
    python = folder / "bin" / "python"
    with _locked(envs_dir() / f"{name}.lock"):
        if (folder / COMPLETE).is_file():
            return python
        shutil.rmtree(folder, ignore_errors=True)
        uv = _uv()
        start = time.perf_counter()
        links = [arg for location in pip_find_links() for arg in ("--find-links", location)]
        for command in ([uv, "venv", "--quiet", "--python", sys.executable, str(folder)],
                        [uv, "pip", "install", "--quiet", "--python", str(python), "-r", str(lock_file(name)),
                         *links]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(folder, ignore_errors=True)
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
                raise BackendUnavailable(f"environment {name} could not be installed ({' '.join(command[:3])} "
                                         f"failed: {tail}); the command: {install_command(name)}")
        total, own = folder_bytes(folder)
        built = {"seconds": round(time.perf_counter() - start, 1), "bytes": total, "unshared_bytes": own,
                 "lock_sha256": describe(name)["lock_sha256"], "find_links": pip_find_links()}
        (folder / COMPLETE).write_text(json.dumps(built, indent=2))
    return python


def build_info(name: str) -> dict[str, Any] | None:
    """How long the environment took to build and its size on disk (own files), if built."""
    marker = envs_dir() / f"{name}-{env_key(name)}" / COMPLETE
    return json.loads(marker.read_text()) if marker.is_file() else None


def compile_lock(name: str) -> Path:
    """Resolve `locks/<name>.in` into the pinned `locks/<name>.txt` (uv pip compile, pip's find-links)."""
    links = [arg for location in pip_find_links() for arg in ("--find-links", location)]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([_uv(), "pip", "compile", "--quiet", "--python-version", python, "--no-header",
                    "--output-file", str(lock_file(name)), str(LOCKS / f"{name}.in"), *links], check=True)
    return lock_file(name)
