"""A content-addressed on-disk store, so a re-run of the same cells reuses their results.

An entry is a folder `<root>/<kind>/<key>/`: payload files plus `manifest.json`, which holds
the key's inputs in clear, the sha256 of every payload file and the format version. The
key is the sha256 of a canonical JSON of the inputs, so anything that determines a result
belongs in its inputs. An entry is built in a temporary folder, its manifest written last,
then renamed into place: a reader sees a whole entry or none. Reading checks the manifest
and every payload hash; an entry that fails (partial, corrupt, other format, not a folder) is
removed and reported as such, never used. An entry that cannot be written (a full disk) is
reported too, and the result it would have held is kept by the caller.

Processes sharing a store (xdist workers) build an entry once: `exclusive` holds a lock file
(under `locks`) while one of them looks it up and builds it, and the others wait, then read it.

Only what is recognisably the store's is ever removed: under each kind folder, entries named as
keys and temporary builds; under `locks`, lock files. `clear` leaves anything else, so a cache
folder pointed at a folder of other files deletes none of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from ptq.models.loading import sha256_file

FORMAT_VERSION = 1
CACHE_DIR_ENV = "PTQ_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/ptq-bench"
MANIFEST = "manifest.json"
KINDS = ("metrics", "weights", "references")  # the store's folders under its root
# An entry's folder name (its key), or that of an entry being built (see CacheStore.store).
ENTRY_NAME = re.compile(r"[0-9a-f]{64}|\.tmp-[0-9a-f]{12}-[0-9a-f]{8}")
LOCKS = "locks"  # the folder of lock files (see CacheStore.exclusive), named <kind>-<key>.lock
LOCK_NAME = re.compile(rf"({'|'.join(KINDS)})-[0-9a-f]{{64}}\.lock")

# hit: used; miss: absent, built; rebuilt: present but invalid, removed and built again;
# off: caching disabled; none: nothing to store for this stage (see ptq.cell).
Status = Literal["hit", "miss", "rebuilt", "off", "none"]


def cache_dir(option: str | None) -> Path:
    """The cache folder: as given (--cache-dir), else $PTQ_CACHE_DIR, else the default."""
    return Path(option or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def cache_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `inputs` (sorted keys, no whitespace)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version(modules: tuple[str, ...]) -> str:
    """sha256 over the source files of `modules` (dotted names): any edit changes it."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        digest.update(name.encode() + b"\0")
        digest.update(Path(inspect.getsourcefile(importlib.import_module(name)) or "").read_bytes())
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """sha256 over every file of a folder (relative names and contents), for models stored as folders."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Lookup:
    status: Status  # hit, miss, rebuilt or off
    path: Path | None  # the entry's folder on a hit
    problem: str | None = None  # why an entry found on disk was not used (status "rebuilt")


class CacheStore:
    """Entries under `root` by kind and key; `root=None` disables the store (every lookup is "off")."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _entry(self, kind: str, key: str) -> Path:
        assert self.root is not None and kind in KINDS and ENTRY_NAME.fullmatch(key), (kind, key)
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Lookup:
        if self.root is None:
            return Lookup("off", None)
        entry = self._entry(kind, key)
        if not entry.exists():
            return Lookup("miss", None)
        problem = _verify(entry, key)
        if problem is None:
            return Lookup("hit", entry)
        _remove(entry)
        return Lookup("rebuilt", None, f"{kind} entry {key[:12]} {problem}; removed and rebuilt")

    def store(self, kind: str, key: str, inputs: dict[str, Any], write: Callable[[Path], None]) -> str | None:
        """Let `write` fill a fresh folder with the payload files, then seal it with its manifest.
        Returns None, or why the entry could not be stored (the file system refused it)."""
        if self.root is None:
            return None
        entry = self._entry(kind, key)
        if entry.parent.exists() and not entry.parent.is_dir():  # a file where the kind folder belongs
            entry.parent.unlink()
        tmp = entry.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            manifest = {"format_version": FORMAT_VERSION, "kind": kind, "key": key, "inputs": inputs, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            try:
                tmp.rename(entry)
            except OSError:  # another process sealed the same entry first: identical inputs, keep theirs
                if not entry.exists():
                    raise
        except OSError as exc:
            return f"{kind} entry {key[:12]} not stored ({type(exc).__name__}: {exc})"
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return None

    @contextlib.contextmanager
    def exclusive(self, kind: str, key: str) -> Iterator[None]:
        """One process at a time builds the entry: the others wait here until it is stored, then find
        it. A no-op when the store is off. The lock is the kernel's (flock), so it ends with its process."""
        if self.root is None:
            yield
            return
        self._entry(kind, key)  # checks the name
        locks = self.root / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{kind}-{key}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def clear(self) -> None:
        """Remove every entry (and entry being built) of every kind, then the kind folders and the
        root if that leaves them empty. Files and folders the store did not make stay."""
        if self.root is None or not self.root.is_dir():
            return
        for kind in KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if ENTRY_NAME.fullmatch(entry.name):
                    _remove(entry)
            _remove_if_empty(folder)
        locks = self.root / LOCKS
        if locks.is_dir():
            for lock in locks.iterdir():
                if LOCK_NAME.fullmatch(lock.name):
                    lock.unlink()
            _remove_if_empty(locks)
        _remove_if_empty(self.root)


def _remove(entry: Path) -> None:
    """An entry is a folder; a damaged one may be anything."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _remove_if_empty(folder: Path) -> None:
    if not any(folder.iterdir()):
        folder.rmdir()


def _verify(entry: Path, key: str) -> str | None:
    """None if `entry` is whole and intact, else what is wrong with it."""
    if not entry.is_dir() or entry.is_symlink():
        return "is not a folder"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return "has no manifest (partial)"
    except (OSError, ValueError) as exc:
        return f"has an unreadable manifest ({type(exc).__name__})"
    if (not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION
            or manifest.get("key") != key or not isinstance(manifest.get("files"), dict)):
        return f"has a manifest of another format version or key (expected format {FORMAT_VERSION})"
    present = {p.name for p in entry.iterdir()} - {MANIFEST}
    if present != set(manifest["files"]):
        return f"has files {sorted(present)} where the manifest lists {sorted(manifest['files'])}"
    for name, sha in manifest["files"].items():
        if sha256_file(entry / name) != sha:
            return f"has a corrupt {name} (sha256 differs from the manifest)"
    return None
