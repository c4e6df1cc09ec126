"""A full disk in every step: one clear line, exit 1, nothing half-written, nothing lost.

Real when the test can mount a small tmpfs (as root): the disk is filled up for real while the
run is in the step. Elsewhere the same write error is injected at the OS boundary: the run's
RLIMIT_FSIZE is lowered to 0 from outside (prlimit), so every write that grows a file fails
with EFBIG, as it would with ENOSPC. The project's own code is never patched.
DODO_SEGMENT_TEST_INJECT_ONLY=1 takes the injected path even where a mount is possible.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from pipelines.emit import Checkpoint, read_checkpoint, write_checkpoint
from tests.conftest import Sandbox, make_sandbox, run_cli
from tests.test_reliability import assert_raw_matches_truth

pytestmark = pytest.mark.slow

DISK_BYTES = 64 * 1024 * 1024


@dataclass
class SmallDisk:
    """A folder on a small filesystem that a test can fill up and free again."""

    root: Path
    real: bool
    """A tmpfs of DISK_BYTES; False: no mount possible, the write error is injected instead."""
    ballast: list[Path] = field(default_factory=list)

    def fill(self, pid: int | None = None, leave: int = 0) -> None:
        """No room left (or `leave` bytes): for real, or for process `pid` by its file-size limit."""
        if not self.real:
            if pid is not None:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            return
        path = self.root / f"ballast.{len(self.ballast)}"
        self.ballast.append(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (1 << 20, 1 << 12):
                chunk = b"\0" * size
                try:
                    while True:
                        os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        if leave:
            os.truncate(path, max(path.stat().st_size - leave, 0))

    def free(self) -> None:
        """Give the space back."""
        for path in self.ballast:
            path.unlink(missing_ok=True)
        self.ballast.clear()


def _mount_tmpfs(path: Path) -> bool:
    if (
        os.environ.get("DODO_SEGMENT_TEST_INJECT_ONLY")
        or os.geteuid() != 0
        or not shutil.which("mount")
        or not sys.platform.startswith("linux")
    ):
        return False
    command = ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(path)]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


@pytest.fixture()
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    root = tmp_path / "small-disk"
    root.mkdir(mode=0o700)
    real = _mount_tmpfs(root)
    try:
        yield SmallDisk(root, real)
    finally:
        if real:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, check=False)


@pytest.fixture()
def sandbox(tmp_path: Path, disk: SmallDisk) -> Iterator[Sandbox]:
    for box in make_sandbox(tmp_path, customers=60):
        box.db = str(disk.root / "warehouse.duckdb")
        yield box


def one_clear_line(result: subprocess.CompletedProcess) -> str:
    """Exit 1, no traceback, and exactly one `dodo-segment:` line saying the disk is full."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("dodo-segment:")]
    assert len(lines) == 1, output[-3000:]
    assert "disk is full" in lines[0], lines[0]
    return lines[0]


def received(sandbox: Sandbox) -> Counter[str]:
    return Counter(m["messageId"] for m in sandbox.collector.tracks())


def assert_delivered_once(sandbox: Sandbox) -> None:
    """Every outbox event received (or skipped), the ledger equal to what was received, and a
    repeat only under the same messageId (a batch acknowledged as the disk filled up)."""
    with duckdb.connect(sandbox.db, read_only=True) as con:
        outbox = {
            r[0] for r in con.execute("select event_id from analytics.track_outbox").fetchall()
        }
        ledger = dict(
            con.execute("select event_id, status from segment_sync.delivered_events").fetchall()
        )
    counts = received(sandbox)
    skipped = {e for e, s in ledger.items() if s == "skipped"}
    lost = outbox - set(counts) - skipped
    assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:3]}"
    assert {e for e, s in ledger.items() if s == "delivered"} == set(counts)
    assert max(counts.values(), default=0) <= 2


def watched_run(sandbox: Sandbox, disk: SmallDisk, step: str) -> subprocess.CompletedProcess:
    """`dodo-segment run`, with the disk filled up as soon as the run enters `step`."""
    exe = Path(sys.executable).with_name("dodo-segment")
    process = subprocess.Popen(
        [str(exe), "run"], env=sandbox.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lock_file = Path(f"{sandbox.db}.lock")
    deadline = time.monotonic() + 120
    filled = False
    while process.poll() is None and time.monotonic() < deadline and not filled:
        try:
            current = json.loads(lock_file.read_text() or "{}").get("step")
        except (OSError, ValueError):
            current = None
        if current == step:
            disk.fill(pid=process.pid)
            filled = True
        time.sleep(0.005)
    stdout, stderr = process.communicate(timeout=180)
    assert filled, f"the run never entered {step}: {stderr[-2000:]}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


HOLD = {
    "extract": lambda s: s.simulator.inject_fault(path="/payments", kind="timeout", delay=1.0),
    "models": lambda s: None,
    "emit": lambda s: s.collector.inject(status=429, retry_after=1.0),
}
"""Keep the run in the step a moment, so the disk fills up while it is there."""


@pytest.mark.parametrize("step", HOLD)
def test_disk_full_in_a_step_fails_cleanly_and_the_next_run_catches_up(
    sandbox: Sandbox, disk: SmallDisk, step: str
) -> None:
    first = run_cli("run", "--events-since", "2000-01-01", env=sandbox.env())
    assert first.returncode == 0, first.stderr[-3000:]
    sandbox.business.advance_time(days=3)
    HOLD[step](sandbox)
    line = one_clear_line(watched_run(sandbox, disk, step))
    print(f"\n{step} ({'tmpfs' if disk.real else 'prlimit'}): {line}")
    assert step in line or step == "extract" and "extract" in line, line
    disk.free()
    with duckdb.connect(sandbox.db, read_only=True) as con:  # whole: every table reads back
        con.execute("select count(*) from segment_sync.delivered_events").fetchone()
    again = run_cli("run", env=sandbox.env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert_raw_matches_truth(sandbox)
    assert_delivered_once(sandbox)


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_whole(
    disk: SmallDisk, tmp_path: Path
) -> None:
    if not disk.real:
        pytest.skip("needs a small filesystem to fill (the CLI tests inject the error instead)")
    db = str(disk.root / "warehouse.duckdb")
    old = Checkpoint(
        run_id="run-1", written_at=datetime.now(UTC), delivered_up_to=datetime.now(UTC)
    )
    write_checkpoint(db, old)
    disk.fill()
    big = Checkpoint(
        run_id="run-2", written_at=datetime.now(UTC), delivered_up_to=datetime.now(UTC),
        settled={f"event-{i}": "delivered" for i in range(100_000)},
    )  # fmt: skip
    with pytest.raises(OSError) as raised:
        write_checkpoint(db, big)
    assert raised.value.errno == errno.ENOSPC
    found = read_checkpoint(db)
    assert found is not None and found.run_id == "run-1"
    assert [p.name for p in disk.root.iterdir() if ".tmp" in p.name] == []


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_listener_answers_503_when_it_cannot_store_and_200_once_it_can(
    disk: SmallDisk, tmp_path: Path
) -> None:
    from standardwebhooks.webhooks import Webhook

    from pipelines.commands.listen import Listener
    from pipelines.config import ListenConfig
    from pipelines.webhook_store import WebhookStore, store_folder

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    settings = ListenConfig(
        warehouse_path=str(disk.root / "warehouse.duckdb"), host="127.0.0.1", port=0,
        path="/webhooks/dodo", webhook_key=secret, debounce_seconds=3600,
        max_delay_seconds=3600, retry_seconds=3600, max_body_bytes=1 << 20,
    )  # fmt: skip
    listener = Listener(settings, run_command=[sys.executable, "-c", "pass"]).start()
    signer = Webhook(secret)

    def post(webhook_id: str) -> int:
        body = json.dumps({"type": "payment.succeeded", "data": {"payment_id": webhook_id}})
        stamp = int(time.time())
        signature = signer.sign(webhook_id, datetime.fromtimestamp(stamp, UTC), body)
        request = urllib.request.Request(
            listener.address, data=body.encode(), method="POST",
            headers={"webhook-id": webhook_id, "webhook-timestamp": str(stamp),
                     "webhook-signature": signature, "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        if disk.real:
            disk.fill()
            refused = post("msg_full")
        else:  # the write error injected at the OS boundary, for this process, briefly
            previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
            try:
                refused = post("msg_full")
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limits)
                signal.signal(signal.SIGXFSZ, previous)
        assert refused == 503
        store = WebhookStore(store_folder(settings.warehouse_path))
        assert store.pending_count() == 0
        assert list(store.tmp_dir.iterdir()) == []  # no half-written file left behind
        disk.free()
        assert post("msg_full") == 200  # Dodo's retry, once there is room
        assert store.pending_count() == 1
    finally:
        listener.stop()


def test_forget_on_a_full_disk_stops_cleanly_and_can_run_again(
    sandbox: Sandbox, disk: SmallDisk
) -> None:
    if not disk.real:
        pytest.skip("needs a small filesystem to fill part-way")
    assert run_cli("run", env=sandbox.env()).returncode == 0
    customer = sandbox.business.tables["customers"].items[0]["customer_id"]
    size = Path(sandbox.db).stat().st_size
    disk.fill(leave=size // 2)  # room for the erasure, not for the rewritten copy
    result = run_cli("forget", customer, env=sandbox.env())
    line = one_clear_line(result)
    assert line.startswith("dodo-segment: forget stopped: the disk is full"), line
    leftovers = [p.name for p in disk.root.iterdir() if ".rewrite" in p.name]
    assert leftovers == []
    with duckdb.connect(sandbox.db, read_only=True) as con:  # the old file, whole
        con.execute("select count(*) from dodo_raw.customers").fetchone()
    disk.free()
    again = run_cli("forget", customer, env=sandbox.env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rewritten" in again.stdout


def test_a_log_on_a_full_disk_fails_the_run_in_one_line_without_a_traceback(
    sandbox: Sandbox, disk: SmallDisk, tmp_path: Path
) -> None:
    if not disk.real:
        pytest.skip("needs a small filesystem to fill")
    sandbox.db = str(tmp_path / "warehouse.duckdb")  # the warehouse has room; the log has none
    log_path = disk.root / "run.log"
    log_path.touch()
    disk.fill()
    exe = Path(sys.executable).with_name("dodo-segment")
    with open(log_path, "a") as log:
        result = subprocess.run(
            [str(exe), "run"], env=sandbox.env(), stdout=subprocess.PIPE, stderr=log, text=True,
            timeout=180, check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout
    assert "log line(s) could not be written" in result.stdout
    disk.free()
    assert_delivered_once(sandbox)  # the run itself went through
