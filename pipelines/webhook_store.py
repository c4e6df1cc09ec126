"""Dodo webhook deliveries kept on disk, outside the warehouse, until a run has merged them.

The listener writes a delivery here and answers 2xx only once it is fsync'd, so a crash after
the answer loses nothing; a run reads the pending ones, merges them into the raw tables, and only
then marks them merged. A merged delivery keeps an empty marker named after its `webhook-id`
(for de-duplication of Dodo's retries) and nothing of its payload.

    <warehouse>.webhooks/
        pending/<sha256(webhook-id)>.json   {"webhook_id", "received_at", "payload"}
        merged/<sha256(webhook-id)>         empty markers, removed after MERGED_MARKER_DAYS
        tmp/                                half-written files (ignored)
        listener.json                       the listener's counters, for `status`
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from pipelines.durable import fsync_folder

MERGED_MARKER_DAYS = 7
"""Dodo (Standard Webhooks) retries a delivery for about 3 days; markers outlive that."""

MARKING_THREADS = 4
"""Threads making the merged markers (a marker and an unlink cost ~0.7 ms a delivery on this
box's ext4; four threads marked 5,000 deliveries in 2.1 s instead of 3.4 s)."""

MARKING_CHUNK = 256
"""Deliveries one marking thread takes at a time."""


@dataclass(frozen=True)
class StoredDelivery:
    """One verified delivery waiting to be merged."""

    webhook_id: str
    received_at: datetime
    payload: dict[str, Any]
    path: Path


def store_folder(warehouse_path: str) -> Path:
    """Where the deliveries of this warehouse are kept: `<warehouse>.webhooks/` beside it."""
    return Path(f"{warehouse_path}.webhooks")


class GroupSync:
    """fsync of one folder, shared by concurrent callers (group commit).

    A caller's entry is durable once a folder fsync *started after* its link has ended. Under a
    flood, the callers that arrive while one fsync runs all wait for the next one, so N
    concurrent deliveries cost about two folder fsyncs, not N. An error reaches every caller
    whose entry that fsync was to cover (they answer 503, Dodo retries).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        """Tickets up to this one were covered by a finished fsync (successful or not)."""
        self._synced = 0
        """Tickets up to this one are on disk (a successful fsync started after them)."""
        self._running = False
        self._error: OSError | None = None

    def sync(self) -> None:
        """Return once the folder's entries made before this call are on disk; else raise."""
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while True:
                if ticket <= self._synced:
                    return
                if ticket <= self._done and self._error is not None:
                    raise self._error
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covered = self._requested
                self._cond.release()
                error: OSError | None = None
                try:
                    fsync_folder(self.folder)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = max(self._done, covered)
                    if error is None:
                        self._synced = max(self._synced, covered)
                    else:
                        self._error = error
                    self._cond.notify_all()


class WebhookStore:
    """The pending and merged deliveries of one warehouse (owner-only: they hold personal data)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pending_dir = folder / "pending"
        self.merged_dir = folder / "merged"
        self.tmp_dir = folder / "tmp"
        self._pending_sync = GroupSync(self.pending_dir)

    def ensure(self) -> WebhookStore:
        """Create the folders (mode 0700)."""
        for path in (self.folder, self.pending_dir, self.merged_dir, self.tmp_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self

    @staticmethod
    def file_name(webhook_id: str) -> str:
        """A file name for any webhook-id (ids are the sender's text)."""
        return hashlib.sha256(webhook_id.encode()).hexdigest()

    def store(self, webhook_id: str, payload: dict[str, Any]) -> bool:
        """Keep a delivery durably; False if this webhook-id was already stored (a retry)."""
        name = self.file_name(webhook_id)
        if (self.merged_dir / name).exists():
            return False
        record = {
            "webhook_id": webhook_id,
            "received_at": datetime.now(UTC).isoformat(),
            "payload": payload,
        }
        tmp = self._write_durably(name, record)
        try:
            os.link(tmp, self.pending_dir / f"{name}.json")  # atomic: a second copy fails here
            fresh = True
        except FileExistsError:
            fresh = False
        finally:
            tmp.unlink(missing_ok=True)
        # Grouped with concurrent deliveries. A retry (or a concurrent copy) of an entry whose
        # fsync failed finds it linked and waits for a fsync of its own before its 2xx.
        self._pending_sync.sync()
        return fresh

    def _write_durably(self, name: str, record: dict[str, Any]) -> Path:
        """A new owner-only file in tmp/ holding the record, fsync'd; the caller moves it."""
        tmp = self.tmp_dir / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(orjson.dumps(record))
            while view:  # a short write is possible on a nearly full disk
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
            raise
        os.close(fd)
        return tmp

    def pending(self) -> list[StoredDelivery]:
        """The deliveries not merged yet, oldest received first; unreadable files are skipped."""
        return [delivery for batch in self.pending_batches() for delivery in batch]

    def pending_batches(self, size: int | None = None) -> Iterator[list[StoredDelivery]]:
        """The deliveries not merged yet, oldest stored first, `size` at a time (all at once
        without a size): a backlog of any length is read a bounded batch at a time."""
        if not self.pending_dir.exists():
            return
        stored = []
        with os.scandir(self.pending_dir) as entries:
            for entry in entries:
                if not entry.name.endswith(".json"):
                    continue
                try:
                    stored.append((entry.stat().st_mtime_ns, entry.name))
                except OSError:
                    continue  # merged and removed meanwhile
        stored.sort()
        step = size or max(1, len(stored))
        for start in range(0, len(stored), step):
            batch = [
                self._read(self.pending_dir / name) for _, name in stored[start : start + step]
            ]
            found = [delivery for delivery in batch if delivery is not None]
            if found:
                yield sorted(found, key=lambda d: d.received_at)

    @staticmethod
    def _read(path: Path) -> StoredDelivery | None:
        """One stored delivery, or None when its file is being replaced or damaged (such a file
        is never merged, never deleted here)."""
        try:
            record = orjson.loads(path.read_bytes())
            return StoredDelivery(
                webhook_id=record["webhook_id"],
                received_at=datetime.fromisoformat(record["received_at"]),
                payload=record["payload"],
                path=path,
            )
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def rewrite_pending(self, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
        """Replace the payloads `rewrite` changes (atomically, fsync'd); returns how many changed.

        For erasure requests: a pending delivery must not keep a forgotten customer's data."""
        changed = 0
        for delivery in self.pending():
            payload = rewrite(delivery.payload)
            if payload == delivery.payload:
                continue
            record = {"webhook_id": delivery.webhook_id,
                      "received_at": delivery.received_at.isoformat(), "payload": payload}  # fmt: skip
            os.replace(self._write_durably(delivery.path.stem, record), delivery.path)
            changed += 1
        if changed:
            fsync_folder(self.pending_dir)
        return changed

    def mark_merged(self, deliveries: Iterable[StoredDelivery]) -> int:
        """Replace merged deliveries by empty markers (their payload is in the warehouse now).

        Each delivery's marker is made before its file is removed, so a crash in between leaves
        both (merged again, which changes nothing) and never neither; a few threads share the
        file-system calls, the slow part of a large backlog."""
        names = [delivery.path.stem for delivery in deliveries]
        if not names:
            return 0
        chunks = [
            names[start : start + MARKING_CHUNK] for start in range(0, len(names), MARKING_CHUNK)
        ]
        with ThreadPoolExecutor(MARKING_THREADS) as pool:
            for _done in pool.map(self._mark, chunks):  # re-raises a chunk's error (disk full)
                pass
        fsync_folder(self.merged_dir)
        fsync_folder(self.pending_dir)
        return len(names)

    def _mark(self, names: list[str]) -> None:
        merged, pending = str(self.merged_dir), str(self.pending_dir)
        for name in names:
            os.close(os.open(f"{merged}/{name}", os.O_WRONLY | os.O_CREAT, 0o600))
            try:
                os.unlink(f"{pending}/{name}.json")
            except FileNotFoundError:
                continue

    def purge_old_markers(self) -> None:
        """Remove the markers older than MERGED_MARKER_DAYS (Dodo retries no longer)."""
        cutoff = time.time() - MERGED_MARKER_DAYS * 86_400
        if not self.merged_dir.exists():
            return
        with os.scandir(self.merged_dir) as markers:
            for marker in markers:
                try:
                    if marker.stat().st_mtime < cutoff:
                        os.unlink(marker.path)
                except OSError:
                    continue

    def pending_count(self) -> int:
        """How many deliveries wait for a run."""
        return sum(1 for _ in self.pending_dir.glob("*.json")) if self.pending_dir.exists() else 0

    def write_counters(self, counters: dict[str, Any]) -> None:
        """The listener's counters, replaced atomically (read by `status`)."""
        tmp = self.tmp_dir / f"listener.{os.getpid()}"
        tmp.write_bytes(orjson.dumps(counters))
        os.replace(tmp, self.folder / "listener.json")

    def read_counters(self) -> dict[str, Any] | None:
        """The last counters a listener wrote, or None when no listener ever ran."""
        try:
            return orjson.loads((self.folder / "listener.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
