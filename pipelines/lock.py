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
from typing import Any

ACQUIRE_GRACE_SECONDS = 1.0
"""How long a run retries a busy lock before skipping: `status` and `doctor` probe the lock
for microseconds, and a cron run that meets a probe must not be skipped for it."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds the lock, since when and at which step (read from the lock file, best effort)."""

    pid: int | None
    started_at: float | None
    command: str | None
    step: str | None = None
    run_id: str | None = None
    typical_seconds: float | None = None
    """Median duration of the last successful runs, written by the job once it knows it."""

    @property
    def held_seconds(self) -> float | None:
        """How long the current holder has held the lock."""
        return None if self.started_at is None else max(0.0, time.time() - self.started_at)


class LockBusy(Exception):
    """Another run holds the lock."""

    def __init__(self, holder: LockHolder) -> None:
        super().__init__("another run is in progress")
        self.holder = holder


LONG_RUN_SECONDS = 2 * 3600
"""Without run history, a lock held longer than this is flagged (cron runs take minutes)."""
LONG_RUN_FACTOR = 5
LONG_RUN_FLOOR_SECONDS = 15 * 60
"""With history, a lock held LONG_RUN_FACTOR times the typical run (but at least the floor)
is flagged: a hung run, or a backfill worth knowing about."""


def long_run_threshold(holder: LockHolder) -> float:
    """Seconds after which a lock holder counts as unusually long."""
    if holder.typical_seconds:
        return max(LONG_RUN_FLOOR_SECONDS, LONG_RUN_FACTOR * holder.typical_seconds)
    return LONG_RUN_SECONDS


def lock_path(warehouse_path: str) -> Path:
    """The lock file of a warehouse."""
    if warehouse_path.startswith("md:"):
        return Path(".dodo_segment_motherduck.lock").resolve()
    return (
        Path(warehouse_path).expanduser().resolve().with_name(Path(warehouse_path).name + ".lock")
    )


def _read(path: Path) -> dict[str, Any]:
    # The holder rewrites the file in place; a reader may catch it half-written, so retry.
    for _ in range(5):
        try:
            data = json.loads(path.read_text() or "{}")
        except OSError:
            return {}
        except ValueError:
            time.sleep(0.01)
            continue
        return data if isinstance(data, dict) else {}
    return {}


def read_holder(path: Path) -> LockHolder:
    """Describe the current holder from the lock file's content."""
    data = _read(path)
    return LockHolder(
        data.get("pid"),
        data.get("started_at"),
        data.get("command"),
        data.get("step"),
        data.get("run_id"),
        data.get("typical_seconds"),
    )


def is_locked(warehouse_path: str) -> LockHolder | None:
    """The holder if a run holds the warehouse's lock now, else None. Changes nothing."""
    path = lock_path(warehouse_path)
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            # A shared probe: it never blocks a holder, and a starting run retries past it.
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(path)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def annotate(warehouse_path: str, **fields: Any) -> None:
    """Add facts about the run in progress (step, run_id, ...) to the lock file, for `status`.

    Only the holder calls this. The file is rewritten in place, never replaced: the flock
    belongs to its inode.
    """
    path = lock_path(warehouse_path)
    try:
        with open(path, "r+") as handle:
            data = _read(path)
            data.update(fields)
            text = json.dumps(data)
            handle.seek(0)
            handle.write(text)
            handle.truncate(len(text))
    except OSError:
        pass  # the lock file is a courtesy for status; the run goes on without it


@contextmanager
def run_lock(warehouse_path: str, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the warehouse's run lock; raise LockBusy (after a short grace) unless wait is set."""
    path = lock_path(warehouse_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        deadline = time.monotonic() + ACQUIRE_GRACE_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(read_holder(path)) from None
                time.sleep(0.05)
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"pid": os.getpid(), "started_at": time.time(), "command": command})
        )
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock
