"""Recovery from the hard failures: a lost warehouse (the delivery checkpoint), a backup and its
restore, and a full disk. Driven through the real CLI against the sandbox; what Segment received
is checked at the collector, by messageId.
"""

from __future__ import annotations

import json
import shutil
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines import lock
from tests.conftest import Sandbox, make_sandbox, run_cli
from tests.test_reliability import assert_raw_matches_truth

pytestmark = pytest.mark.slow


def ok(result: Any, code: int = 0) -> str:
    """The CLI's stderr, after checking its exit code and that no traceback was printed."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return result.stderr


def ledger(db: str) -> dict[str, str]:
    with duckdb.connect(db, read_only=True) as con:
        return dict(
            con.execute("select event_id, status from segment_sync.delivered_events").fetchall()
        )


def outbox(db: str) -> set[str]:
    with duckdb.connect(db, read_only=True) as con:
        return {r[0] for r in con.execute("select event_id from analytics.track_outbox").fetchall()}


def received(sandbox: Sandbox) -> Counter[str]:
    """How many times the collector received each track's messageId."""
    return Counter(m["messageId"] for m in sandbox.collector.tracks())


def remove_warehouse(db: str) -> None:
    for path in (db, f"{db}.wal"):
        Path(path).unlink(missing_ok=True)


def checkpoint(db: str) -> dict[str, Any]:
    path = Path(f"{db}.checkpoint.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return json.loads(path.read_text())


@pytest.fixture()
def sandbox(tmp_path: Path):
    yield from make_sandbox(tmp_path, customers=60)


def test_a_lost_warehouse_loses_nothing_and_resends_nothing(sandbox: Sandbox) -> None:
    db = sandbox.db
    ok(run_cli("run", env=sandbox.env()))  # first sync: the history is skipped, as documented
    skipped_first = {e for e, s in ledger(db).items() if s == "skipped"}
    first = checkpoint(db)
    assert first["counts"]["skipped"] == len(skipped_first) > 0
    sandbox.business.advance_time(days=2)
    ok(run_cli("run", env=sandbox.env()))  # two days of business delivered
    sandbox.business.advance_time(days=2)
    sandbox.collector.outage(True)  # Segment down: two more days stay pending
    ok(run_cli("run", env=sandbox.env()), code=1)
    before = checkpoint(db)
    assert before["counts"]["pending"] > 0
    sandbox.collector.outage(False)
    sandbox.business.advance_time(days=1)  # and events happen while the warehouse is gone
    remove_warehouse(db)
    doctor = run_cli("doctor", env=sandbox.env())
    assert "FAIL checkpoint" in doctor.stdout and "missing" in doctor.stdout, doctor.stdout

    log = ok(run_cli("run", env=sandbox.env()))
    assert "checkpoint of run" in log and "instead of skipping the backlog" in log
    assert_raw_matches_truth(sandbox)  # the new warehouse read everything again
    counts = received(sandbox)
    events = outbox(db)
    lost = events - set(counts) - skipped_first
    assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:3]}"
    # (Events the old warehouse derived from what it observed between runs, such as a status it
    # saw change, cannot be derived again from a fresh extract: they were delivered, not lost.)
    twice = {m for m, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} events sent twice, e.g. {sorted(twice)[:3]}"
    after = checkpoint(db)
    assert after["restored"]["checkpoint_run_id"] == before["run_id"]
    assert after["counts"]["pending"] == 0
    status = run_cli("status", env=sandbox.env())
    assert "continued from the checkpoint" in status.stdout, status.stdout
    # A run later on is an ordinary one: nothing more to send.
    sent = sum(counts.values())
    ok(run_cli("run", env=sandbox.env()))
    assert sum(received(sandbox).values()) == sent


def test_a_lost_warehouse_with_deliveries_waiting_is_synced_from_the_api_first(
    tmp_path: Path,
) -> None:
    """Deliveries stored while the warehouse was gone: merged first, they made the new file look
    synced (dlt kept its old cursors, the run failed on a table it had not made, and customers
    stayed unread until a deep pass). The first sync now reads the API, then merges them; a
    webhook-only run (the listener's) before it leaves them waiting: merged alone into an empty
    warehouse, they would be each customer's whole history."""
    from pipelines.job import RunOptions, run_job
    from pipelines.sandbox.webhooks import changes_since, snapshot
    from pipelines.webhook_store import WebhookStore, store_folder

    for sandbox in make_sandbox(tmp_path, customers=40):
        assert run_job(sandbox.config(), RunOptions()).exit_code == 0
        store = WebhookStore(store_folder(sandbox.db)).ensure()
        before = snapshot(sandbox.business)
        sandbox.business.advance_time(days=1, seed=1)
        stored = sum(store.store(f"msg_{n}", p) for n, p in enumerate(changes_since(before, sandbox.business)))  # fmt: skip
        assert stored > 0
        remove_warehouse(sandbox.db)
        # the listener's webhook-only run comes first: it leaves the deliveries waiting
        sent = len(sandbox.collector.message_ids())
        report = run_job(sandbox.config(), RunOptions(webhook_only=True))
        assert report.exit_code == 0 and report.webhooks is None, report.error
        assert store.pending_count() == stored and len(sandbox.collector.message_ids()) == sent
        report = run_job(sandbox.config(), RunOptions())
        assert report.exit_code == 0, report.error
        assert_raw_matches_truth(sandbox)
        assert store.pending_count() == 0  # the deliveries were merged after the sync


def test_events_since_wins_over_the_checkpoint(sandbox: Sandbox) -> None:
    db = sandbox.db
    ok(run_cli("run", env=sandbox.env()))
    sandbox.business.advance_time(days=1)
    ok(run_cli("run", env=sandbox.env()))
    sent = sum(received(sandbox).values())
    remove_warehouse(db)
    log = ok(run_cli("run", "--events-since", "2000-01-01", env=sandbox.env()))
    assert "checkpoint of run" not in log
    # The whole history again, as asked: the old deliveries repeat under their messageIds.
    assert outbox(db) <= set(received(sandbox))
    assert sum(received(sandbox).values()) > sent


def test_backup_is_consistent_and_a_restore_from_it_resends_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    db, copy = sandbox.db, str(tmp_path / "backups" / "warehouse-copy.duckdb")

    # A deep pass of half a day: the backup below is older than the window a run re-reads
    # behind its cursors, and younger than the three days of settled events the checkpoint names.
    def env() -> dict[str, str]:  # on the sandbox's clock of the moment
        return sandbox.env(SOURCES__DODO__LOOKBACK_DAYS="0.5")

    ok(run_cli("run", env=env()))
    skipped_first = {e for e, s in ledger(db).items() if s == "skipped"}
    sandbox.business.advance_time(days=1)
    ok(run_cli("run", env=env()))
    with lock.run_lock(db, "test"):  # a run in progress: no backup, one line, exit 1
        busy = run_cli("backup", copy, env=env())
    assert busy.returncode == 1 and "a run is in progress" in busy.stderr
    assert not Path(copy).exists()
    result = run_cli("backup", copy, env=env())
    ok(result)
    assert "backup:" in result.stdout and "rows read back" in result.stdout
    assert stat.S_IMODE(Path(copy).stat().st_mode) == 0o600
    assert ledger(copy) == ledger(db)
    sandbox.business.advance_time(days=2)
    ok(run_cli("run", env=env()))  # delivered after the backup was taken
    # Restore: the backup copied over the warehouse (as the README says). The pipeline folder
    # beside it keeps the newer extract state: its cursors are past what the copy holds.
    remove_warehouse(db)
    shutil.copyfile(copy, db)
    doctor = run_cli("doctor", env=env())
    assert "older than the delivery checkpoint" in doctor.stdout, doctor.stdout
    sandbox.business.advance_time(days=1)
    log = ok(run_cli("run", env=env()))
    assert "older than the checkpoint" in log
    assert "restored from an older copy" in log
    # the rows of the days between the backup and the newer cursors were read again
    assert_raw_matches_truth(sandbox)
    counts = received(sandbox)
    lost = outbox(db) - set(counts) - skipped_first
    assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:3]}"
    twice = {m for m, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} events sent twice, e.g. {sorted(twice)[:3]}"
    assert "FAIL checkpoint" not in run_cli("doctor", env=sandbox.env()).stdout


def test_bookkeeping_of_runs_that_changed_nothing_is_folded_away(sandbox: Sandbox) -> None:
    from pipelines import bookkeeping, metrics
    from pipelines.config import pipeline_dir

    ok(run_cli("run", env=sandbox.env()))  # the first sync sends identifies: a run kept
    for _ in range(4):  # runs with nothing new to send
        ok(run_cli("run", env=sandbox.env()))
    steps_of = "select count(distinct run_id) from segment_sync.run_steps"
    with duckdb.connect(sandbox.db) as con:
        first = con.execute(
            "select run_id from segment_sync.runs order by started_at limit 1"
        ).fetchone()[0]
        before = metrics.figures(con)
        runs_before = con.execute("select count(*) from segment_sync.runs").fetchone()[0]
        assert con.execute(steps_of).fetchone()[0] == runs_before
        removed = bookkeeping.prune(con, keep_runs=2, keep_state_versions=1)
        after = metrics.figures(con)
        runs_after = con.execute("select count(*) from segment_sync.runs").fetchone()[0]
        # the run that sent stays; its step durations are folded like a pruned run's
        assert (
            con.execute(
                "select count(*) from segment_sync.runs where run_id = ?", [first]
            ).fetchone()[0]
            == 1
        )
        assert con.execute(steps_of).fetchone()[0] == 2
    assert removed["segment_sync.runs"] == runs_before - runs_after >= 2
    assert removed["segment_sync.run_steps"] >= 4 * (runs_before - 2)
    assert removed.get("dodo_raw._dlt_pipeline_state", 0) >= 1
    # The Prometheus counters do not go down: the pruned runs are folded, not forgotten.
    for key in ("runs", "rows_loaded", "api_requests", "tracks_sent"):
        assert after[key] == before[key], key
    assert [s for s, _ in after["steps_total"]] == [s for s, _ in before["steps_total"]]
    for (_, was), (_, now) in zip(before["steps_total"], after["steps_total"], strict=True):
        assert now == pytest.approx(was)
    # dlt restores its state from the pruned warehouse (a lost pipeline folder), and goes on.
    shutil.rmtree(pipeline_dir(sandbox.db))
    sandbox.business.advance_time(days=1)
    ok(run_cli("run", env=sandbox.env()))
    assert_raw_matches_truth(sandbox)
