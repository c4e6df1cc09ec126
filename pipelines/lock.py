"""One run at a time per warehouse: an flock on a lock file beside it, released by the kernel."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LockHolder:
    """Who holds the lock and since when (read from the lock file, best effort)."""

    pid: int | None
    started_at: float | None
    command: str | None

    @property
    def held_seconds(self) -> float | None:
        """How long the current holder has held the lock."""
        return None if self.started_at is None else max(0.0, time.time() - self.started_at)


class LockBusy(Exception):
    """Another run holds the lock."""

    def __init__(self, holder: LockHolder) -> None:
        super().__init__("another run is in progress")
        self.holder = holder


def lock_path(warehouse_path: str) -> Path:
    """The lock file of a warehouse."""
    if warehouse_path.startswith("md:"):
        return Path(".dodo_segment_motherduck.lock").resolve()
    return (
        Path(warehouse_path).expanduser().resolve().with_name(Path(warehouse_path).name + ".lock")
    )


def read_holder(path: Path) -> LockHolder:
    """Describe the current holder from the lock file's content."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        data = {}
    return LockHolder(data.get("pid"), data.get("started_at"), data.get("command"))


def is_locked(warehouse_path: str) -> LockHolder | None:
    """The holder if a run holds the warehouse's lock now, else None. Changes nothing."""
    path = lock_path(warehouse_path)
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(path)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextmanager
def run_lock(warehouse_path: str, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the warehouse's run lock; raise LockBusy at once unless wait is set."""
    path = lock_path(warehouse_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockBusy(read_holder(path)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"pid": os.getpid(), "started_at": time.time(), "command": command})
        )
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock
