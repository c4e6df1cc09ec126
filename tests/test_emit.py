"""The emitter over real HTTP to the sandbox collector, with a real DuckDB file."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from pipelines.emit import EmitSettings, emit, iter_identify_rows, preview, recompute_traits, resend
from pipelines.sandbox.collector import SegmentCollector

KEY = "wk_test_9f8e7d6c5b4a"
ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def collector() -> Iterator[SegmentCollector]:
    with SegmentCollector(KEY) as c:
        yield c


@pytest.fixture
def settings(collector: SegmentCollector) -> EmitSettings:
    return EmitSettings(
        write_key=KEY,
        host=collector.base_url,
        upload_size=50,
        upload_interval=0.02,
        max_retries=2,
        timeout=2,
        max_backoff_seconds=3,
        max_rate_limit_seconds=5,
        checkpoint_every_messages=100,
        threads=2,
    )


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("CREATE SCHEMA analytics")
    connection.execute(
        "CREATE TABLE analytics.track_outbox(event_id VARCHAR, user_id VARCHAR, event VARCHAR,"
        " occurred_at TIMESTAMPTZ, properties JSON)"
    )
    connection.execute(
        "CREATE TABLE analytics.identify_outbox(user_id VARCHAR, traits JSON, traits_hash VARCHAR)"
    )
    yield connection
    connection.close()


def add_events(con: duckdb.DuckDBPyConnection, n: int, start: int = 0, day0: datetime = T0):
    """Events evt_{i}, one per hour from day0, for 10 customers."""
    con.execute(
        """INSERT INTO analytics.track_outbox
           SELECT 'evt_' || i, 'cus_' || (i % 10), 'Order Completed',
                  $day0::TIMESTAMPTZ + to_hours(i - $start),
                  json_object('order_id', 'pay_' || i, 'total', i * 1.5, 'currency', 'USD',
                              'customer_email', 'c' || i || '@example.com')
           FROM range($start, $start + $n) t(i)""",
        {"start": start, "n": n, "day0": day0},
    )


def set_customers(con: duckdb.DuckDBPyConnection, n: int = 10, plan: str = "pro") -> None:
    con.execute("DELETE FROM analytics.identify_outbox")
    con.execute(
        """INSERT INTO analytics.identify_outbox
           SELECT 'cus_' || i, json_object('name', 'Customer ' || i, 'plan', $plan,
                                           'email', 'c' || i || '@example.com', 'phone', '+1555' || i),
                  md5(i::VARCHAR || $plan)
           FROM range($n) t(i)""",
        {"n": n, "plan": plan},
    )


def ledger(con: duckdb.DuckDBPyConnection, status: str = "delivered") -> set[str]:
    rows = con.execute(
        "SELECT event_id FROM segment_sync.delivered_events WHERE status = ?", [status]
    ).fetchall()
    return {r[0] for r in rows}


def track_ids(c: SegmentCollector) -> list[str]:
    return [m["messageId"] for m in c.tracks()]


def all_events(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT event_id FROM analytics.track_outbox").fetchall()}


def assert_exactly_once_in_effect(con: duckdb.DuckDBPyConnection, c: SegmentCollector) -> None:
    """Every event received, any repeat identical (same messageId, same content), all in ledger."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for m in c.tracks():
        by_id.setdefault(m["messageId"], []).append(m)
    assert set(by_id) == all_events(con) == ledger(con)
    for copies in by_id.values():
        assert all(
            (m["event"], m["properties"], m["timestamp"])
            == (copies[0]["event"], copies[0]["properties"], copies[0]["timestamp"])
            for m in copies
        )


# --- history policy and change detection -------------------------------------------------------


def test_first_sync_sends_every_identify_and_no_backlog(con, collector, settings) -> None:
    add_events(con, 40)
    set_customers(con)
    result = emit(con, settings, "run-1")
    assert (result.identifies_sent, result.tracks_sent, result.skipped_backlog) == (10, 0, 40)
    assert len(collector.identifies()) == 10 and collector.tracks() == []
    assert ledger(con, "skipped") == all_events(con)
    # Events appearing later are always sent, however old their occurred_at.
    add_events(con, 5, start=1000, day0=datetime(2020, 1, 1, tzinfo=UTC))
    result = emit(con, settings, "run-2")
    assert result.tracks_sent == 5 and result.identifies_sent == 0
    assert sorted(track_ids(collector)) == [f"evt_{i}" for i in range(1000, 1005)]


def test_clean_run_with_events_since_sends_the_backlog_after_identifies(
    con, collector, settings
) -> None:
    add_events(con, 300)
    set_customers(con)
    result = emit(con, settings, "run-1", events_since=date(2000, 1, 1))
    assert (result.identifies_sent, result.tracks_sent, result.pending, result.failed) == (
        10, 300, 0, False,
    )  # fmt: skip
    types = [m["type"] for m in collector.messages]
    assert types.index("track") > max(i for i, t in enumerate(types) if t == "identify")
    assert_exactly_once_in_effect(con, collector)
    assert Counter(track_ids(collector)).most_common(1)[0][1] == 1
    sample = collector.tracks()[0]
    assert sample["userId"].startswith("cus_") and sample["timestamp"].endswith("+00:00")
    assert max(collector.batch_sizes) <= settings.upload_size
    # A rerun with nothing changed makes no call at all.
    requests_before = collector.requests
    again = emit(con, settings, "run-2")
    assert (again.identifies_sent, again.tracks_sent, collector.requests) == (0, 0, requests_before)


def test_events_since_on_a_later_run_sends_skipped_backlog_from_date(
    con, collector, settings
) -> None:
    add_events(con, 48)  # two days, hourly
    set_customers(con)
    emit(con, settings, "run-1")
    result = emit(con, settings, "run-2", events_since=T0 + timedelta(days=1))
    assert result.tracks_sent == 24
    assert sorted(track_ids(collector)) == sorted(f"evt_{i}" for i in range(24, 48))
    assert ledger(con) == {f"evt_{i}" for i in range(24, 48)}
    assert ledger(con, "skipped") == {f"evt_{i}" for i in range(24)}


def test_trait_change_sends_exactly_one_identify(con, collector, settings) -> None:
    set_customers(con)
    emit(con, settings, "run-1")
    con.execute(
        """UPDATE analytics.identify_outbox SET traits = json_object('name', 'Renamed', 'plan', 'pro')
           WHERE user_id = 'cus_3'"""
    )
    emit(con, settings, "run-2")
    identifies = collector.identifies()[10:]
    assert [m["userId"] for m in identifies] == ["cus_3"]
    # A dropped trait is absent from the call (never null): Segment keeps the old value.
    assert identifies[0]["traits"] == {"name": "Renamed", "plan": "pro"}
    state = con.execute(
        "SELECT run_id FROM segment_sync.identify_state WHERE user_id = 'cus_3'"
    ).fetchone()
    assert state == ("run-2",)


def test_unchanged_customers_are_left_out_in_sql(con, collector, settings) -> None:
    set_customers(con)
    emit(con, settings, "run-1")
    assert list(iter_identify_rows(con, skip_unchanged_for=settings.excluded_fields)) == []
    con.execute(
        """UPDATE analytics.identify_outbox SET traits = json_object('name', 'Renamed', 'plan', 'pro')
           WHERE user_id = 'cus_3'"""
    )
    changed = list(iter_identify_rows(con, skip_unchanged_for=settings.excluded_fields))
    assert [user_id for user_id, _, _ in changed] == ["cus_3"]
    # other excluded fields send other traits: every customer is looked at again
    assert len(list(iter_identify_rows(con, skip_unchanged_for=("phone",)))) == 10
    assert len(list(iter_identify_rows(con))) == 10  # without the filter: everyone
    emit(con, settings, "run-2")
    assert [m["userId"] for m in collector.identifies()[10:]] == ["cus_3"]
    # new exclusions: the 9 customers with a phone are identified again without it; cus_3 (no
    # phone since its rename) sends the same traits, so it is read again but not sent
    emit(con, replace(settings, excluded_fields=("phone",)), "run-3")
    assert len(collector.identifies()) == 20
    again = iter_identify_rows(con, skip_unchanged_for=("phone",))
    assert [user_id for user_id, _, _ in again] == ["cus_3"]


def test_recompute_and_resend(con, collector, settings) -> None:
    add_events(con, 30)
    set_customers(con)
    emit(con, settings, "run-1", events_since=T0)
    first_ids = track_ids(collector)
    result = recompute_traits(con, settings, "run-2", customer_ids=["cus_1", "cus_2"])
    assert result.identifies_sent == 2
    assert sorted(m["userId"] for m in collector.identifies()[10:]) == ["cus_1", "cus_2"]
    again = resend(con, settings, "run-3", since=T0 + timedelta(hours=20))
    assert again.tracks_sent == 10
    resent = track_ids(collector)[len(first_ids) :]
    assert sorted(resent) == sorted(f"evt_{i}" for i in range(20, 30))
    assert set(resent) <= set(first_ids)  # original messageIds
    only_one = resend(con, settings, "run-4", since=T0, event="Refund Issued")
    assert only_one.tracks_sent == 0


def test_preview_and_dry_run_send_nothing(con, collector, settings) -> None:
    add_events(con, 20)
    set_customers(con)
    plan = preview(con, settings, events_since=T0 + timedelta(hours=15), sample=2)
    assert (plan.identifies, plan.tracks, plan.skipped_backlog, plan.first_sync) == (
        10,
        5,
        15,
        True,
    )
    assert plan.track_samples[0]["messageId"] == "evt_15"
    assert "customer_email" in plan.track_samples[0]["properties"]
    assert plan.identify_samples[0]["type"] == "identify"
    dry = emit(con, settings, "run-dry", dry_run=True)
    assert (dry.dry_run, dry.identifies_sent, dry.tracks_sent, dry.skipped_backlog) == (
        True, 10, 0, 20,
    )  # fmt: skip
    assert collector.requests == 0
    assert con.execute("SELECT count(*) FROM segment_sync.delivered_events").fetchone() == (0,)


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 429, "retry_after": 1}])
def test_failed_first_batches_are_retried(con, collector, settings, fault) -> None:
    add_events(con, 200)
    collector.inject(times=3, **fault)
    result = emit(con, settings, "run-1", events_since=T0)
    assert (result.tracks_sent, result.pending, result.failed) == (200, 0, False)
    assert_exactly_once_in_effect(con, collector)


def test_delivered_but_unacknowledged_batch_is_resent_with_same_ids(
    con, collector, settings
) -> None:
    add_events(con, 100)
    collector.drop_after_receive(times=2)
    result = emit(con, settings, "run-1", events_since=T0)
    assert result.tracks_sent == 100
    assert len(track_ids(collector)) > 100  # repeats, all with their original messageId
    assert_exactly_once_in_effect(con, collector)


def test_a_track_handed_out_before_a_stop_goes_again_as_it_went_then(
    con, collector, settings
) -> None:
    """Segment took the batches and never answered, so the run ended with them pending. By the
    next run their outbox rows changed (an object's later state: a dispute's status, a next
    billing date). They go again under the same messageId with the content of the first copy."""
    add_events(con, 100)
    collector.drop_after_receive(times=1_000)  # every batch, every retry
    first = emit(con, settings, "run-1", events_since=T0)
    assert first.tracks_sent == 0 and first.pending == 100 and first.failed
    held = set(track_ids(collector))
    assert held  # Segment holds what it was handed
    collector.stop_dropping()
    con.execute(
        "UPDATE analytics.track_outbox SET properties = json_merge_patch(properties, "
        """'{"dispute_status": "dispute_won"}')"""
    )
    second = emit(con, settings, "run-2", events_since=T0)
    assert (second.tracks_sent, second.pending, second.failed) == (100, 0, False)
    assert_exactly_once_in_effect(con, collector)  # every repeat identical to its first copy
    assert len(track_ids(collector)) >= 100 + len(held)  # those it held came again
    assert not any("dispute_status" in m["properties"] for m in collector.tracks())
    left = con.execute("SELECT count(*) FROM segment_sync.tracks_in_flight").fetchone()
    assert left == (0,)
    # a later change of a delivered event is not sent at all (the ledger has it)
    third = emit(con, settings, "run-3", events_since=T0)
    assert third.tracks_sent == 0


def test_outage_fails_in_bounded_time_then_next_run_delivers(con, collector, settings) -> None:
    add_events(con, 400)
    collector.outage(True)
    started = time.monotonic()
    result = emit(con, settings, "run-1", events_since=T0)
    assert time.monotonic() - started < 15
    assert result.failed and result.tracks_sent == 0 and result.pending == 400
    assert result.error and KEY not in result.error
    assert ledger(con) <= set(track_ids(collector)) == set()
    collector.outage(False)
    result = emit(con, settings, "run-2", events_since=T0)
    assert (result.tracks_sent, result.failed, result.pending) == (400, False, 0)
    assert_exactly_once_in_effect(con, collector)


def test_outage_midway_marks_only_what_was_received(con, collector, settings) -> None:
    add_events(con, 1000)
    collector.latency_ms = 5
    started = time.monotonic()

    def flip() -> None:
        while collector.requests < 4 and time.monotonic() - started < 10:
            time.sleep(0.005)
        collector.outage(True)

    flipper = threading.Thread(target=flip)
    flipper.start()
    result = emit(con, settings, "run-1", events_since=T0)
    flipper.join()
    assert result.failed and 0 < result.tracks_sent < 1000
    assert result.pending == 1000 - result.tracks_sent
    assert ledger(con) <= set(track_ids(collector))
    collector.outage(False)
    emit(con, settings, "run-2")
    assert_exactly_once_in_effect(con, collector)


@pytest.mark.slow
def test_sigkill_mid_send_then_rerun_loses_nothing(tmp_path, con, collector, settings) -> None:
    add_events(con, 3000)
    set_customers(con)
    con.close()
    collector.latency_ms = 30
    script = textwrap.dedent(
        """
        import sys, duckdb
        from datetime import datetime, UTC
        from pipelines.emit import EmitSettings, emit
        con = duckdb.connect(sys.argv[1])
        settings = EmitSettings(write_key=sys.argv[3], host=sys.argv[2], upload_size=50,
                                upload_interval=0.02, checkpoint_every_messages=100, threads=2)
        emit(con, settings, "run-killed", events_since=datetime(2000, 1, 1, tzinfo=UTC))
        """
    )
    path = str(tmp_path / "warehouse.duckdb")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, path, collector.base_url, KEY],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while len(collector.tracks()) < 800 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    received_before_rerun = len(set(track_ids(collector)))
    assert 0 < received_before_rerun < 3000
    collector.latency_ms = 0
    rerun = duckdb.connect(path)
    try:
        marked = ledger(rerun)
        assert marked and marked <= set(track_ids(collector))  # only acknowledged ids marked
        result = emit(rerun, settings, "run-after-kill", events_since=date(2000, 1, 1))
        assert result.tracks_sent == 3000 - len(marked)
        assert_exactly_once_in_effect(rerun, collector)
    finally:
        rerun.close()


# --- rejects --------------------------------------------------------------------------------


def test_oversized_message_is_rejected_alone(con, collector, settings) -> None:
    add_events(con, 60)
    con.execute(
        """UPDATE analytics.track_outbox SET properties = json_object('blob', repeat('x', 40000))
           WHERE event_id = 'evt_7'"""
    )
    result = emit(con, settings, "run-1", events_since=T0)
    assert (result.tracks_sent, result.rejected, result.pending) == (59, 1, 0)
    rows = con.execute(
        "SELECT message_id, kind, user_id, reason, run_id FROM segment_sync.rejected_messages"
    ).fetchall()
    assert rows == [("evt_7", "track", "cus_7", rows[0][3], "run-1")]
    assert "32 KB" in rows[0][3]
    assert "evt_7" not in track_ids(collector)
    # Not retried automatically.
    assert emit(con, settings, "run-2").tracks_sent == 0


def test_batch_answered_400_is_split_until_the_culprit_is_alone(con, collector, settings) -> None:
    add_events(con, 200)
    collector.reject_message_ids = {"evt_77"}
    result = emit(con, settings, "run-1", events_since=T0)
    assert (result.tracks_sent, result.rejected, result.pending) == (199, 1, 0)
    rejected = con.execute(
        "SELECT message_id, reason, payload->>'messageId' FROM segment_sync.rejected_messages"
    ).fetchall()
    assert rejected == [("evt_77", "Segment answered 400: invalid message evt_77", "evt_77")]
    assert set(track_ids(collector)) == all_events(con) - {"evt_77"} == ledger(con)
    # resend retries rejected ones too (here the collector still refuses it).
    assert resend(con, settings, "run-2", since=T0, event="Order Completed").rejected == 1


def test_non_finite_properties_are_rejected_with_a_reason(con, collector, settings) -> None:
    add_events(con, 10)
    con.execute(
        """UPDATE analytics.track_outbox SET properties = '{"total": NaN}'::JSON
           WHERE event_id = 'evt_3'"""
    )
    result = emit(con, settings, "run-1", events_since=T0)
    assert (result.tracks_sent, result.rejected) == (9, 1)
    reason = con.execute("SELECT reason FROM segment_sync.rejected_messages").fetchone()
    assert reason is not None and "NaN" in reason[0]


def test_each_invalid_row_is_rejected_with_the_first_reason_that_applies(
    con, collector, settings
) -> None:
    add_events(con, 5)
    long_id = "evt_" + "x" * 97  # 101 characters
    con.execute(
        """INSERT INTO analytics.track_outbox VALUES
           ($long_id, 'cus_1', 'Order Completed', $t, '[1, 2]'),
           ('evt_no_user', NULL, 'Order Completed', $t, '{}'),
           ('evt_no_name', 'cus_1', '', $t, '{}'),
           ('evt_no_time', 'cus_1', 'Order Completed', NULL, '{}'),
           ('evt_array', 'cus_1', 'Order Completed', $t, '[1, 2]'),
           ('evt_no_properties', 'cus_1', 'Order Completed', $t, NULL)""",
        {"long_id": long_id, "t": T0},
    )
    result = emit(con, settings, "run-1", events_since=T0)
    assert (result.tracks_sent, result.rejected, result.pending) == (6, 5, 0)
    reasons = dict(
        con.execute(
            "SELECT message_id, reason FROM segment_sync.rejected_messages WHERE kind = 'track'"
        ).fetchall()
    )
    assert reasons == {
        long_id: "event_id longer than 100 characters",
        "evt_no_user": "missing user_id",
        "evt_no_name": "missing event name",
        "evt_no_time": "missing occurred_at",
        "evt_array": "properties must be a JSON object",
    }
    payload = con.execute(
        "SELECT payload->>'properties' FROM segment_sync.rejected_messages"
        " WHERE message_id = 'evt_array'"
    ).fetchone()
    assert payload == ("[1, 2]",)  # the row as read, for whoever fixes it upstream
    sent = {m["messageId"]: m for m in collector.tracks()}
    assert set(sent) == {f"evt_{i}" for i in range(5)} | {"evt_no_properties"}
    assert sent["evt_no_properties"]["properties"] == {}


def test_identify_with_invalid_traits_is_rejected_and_not_pending(con, collector, settings) -> None:
    set_customers(con)
    con.execute("UPDATE analytics.identify_outbox SET traits = '[1, 2]' WHERE user_id = 'cus_3'")
    result = emit(con, settings, "run-1")
    assert (result.identifies_sent, result.rejected, result.pending) == (9, 1, 0)
    assert "cus_3" not in {m["userId"] for m in collector.identifies()}


# --- privacy and secrets --------------------------------------------------------------------


def test_excluded_fields_never_reach_segment(con, collector, settings) -> None:
    add_events(con, 20)
    set_customers(con)
    private = replace(settings, excluded_fields=("customer_email", "email", "phone"))
    emit(con, private, "run-1", events_since=T0)
    for m in collector.tracks():
        assert "customer_email" not in m["properties"]
    for m in collector.identifies():
        assert set(m["traits"]) == {"name", "plan"}
    assert b"@example.com" not in orjson.dumps(collector.messages)
    # A change in an excluded field alone sends nothing.
    con.execute(
        'UPDATE analytics.identify_outbox SET traits = json_merge_patch(traits, \'{"phone": "+1999"}\')'
    )
    assert emit(con, private, "run-2").identifies_sent == 0


def test_write_key_never_in_warehouse_or_logs(tmp_path, con, collector, settings, caplog) -> None:
    add_events(con, 50)
    set_customers(con)
    collector.reject_message_ids = {"evt_5"}
    logging.getLogger("segment").setLevel(logging.DEBUG)  # the library logs request bodies
    try:
        with caplog.at_level(logging.DEBUG):
            emit(con, settings, "run-1", events_since=T0)
            collector.outage(True)
            add_events(con, 50, start=100)
            failed = emit(con, settings, "run-2")
    finally:
        logging.getLogger("segment").setLevel(logging.NOTSET)
    assert failed.failed
    assert any("making request" in r.getMessage() for r in caplog.records)
    assert KEY not in caplog.text
    assert KEY not in repr(settings) and KEY not in repr(failed)
    con.execute("CHECKPOINT")
    for file in tmp_path.iterdir():
        assert KEY.encode() not in file.read_bytes(), file


def test_bytes_are_counted_as_sent_with_and_without_gzip(con, collector, settings) -> None:
    add_events(con, 120)
    zipped = emit(con, settings, "run-1", events_since=T0)
    assert zipped.bytes == collector.bytes_received < sum(collector.accepted_body_bytes)
    collector.reset()
    plain = emit(con, replace(settings, gzip=False), "run-2", events_since=T0)
    assert plain.tracks_sent == 0  # all delivered by run-1
    resent = resend(con, replace(settings, gzip=False), "run-3", since=T0)
    assert resent.tracks_sent == 120 and set(track_ids(collector)) == all_events(con)
    assert resent.bytes == collector.bytes_received == sum(collector.accepted_body_bytes)


def test_garbage_collector_settings_are_restored(con, collector, settings) -> None:
    add_events(con, 50)
    before = gc.get_threshold()
    emit(con, settings, "run-1", events_since=T0)
    assert gc.get_threshold() == before
    collector.outage(True)
    add_events(con, 50, start=100)
    assert emit(con, settings, "run-2").failed
    assert gc.get_threshold() == before


def test_default_settings_are_sane() -> None:
    defaults = EmitSettings(write_key="k")
    assert defaults.host == "https://api.segment.io"
    assert 500 <= defaults.upload_size < 2500
    assert defaults.max_queue_size >= defaults.upload_size * defaults.threads
    assert defaults.checkpoint_every_messages <= 10_000 and defaults.checkpoint_every_seconds <= 30
    assert 1 <= defaults.max_consecutive_failed_batches <= 5
    assert 5 <= defaults.timeout <= 30 and 1 <= defaults.max_retries <= 10
    assert defaults.outage_bound_seconds() <= 30 * 60  # minutes, not hours
    assert defaults.max_events_per_second is None and defaults.excluded_fields == ()
    with pytest.raises(ValueError):
        EmitSettings(write_key="k", upload_size=3000)


# --- a run reads only what the models changed, and nothing pending is left behind -------------


def _unsettled(db: str) -> set[str]:
    """Outbox tracks neither delivered, skipped nor rejected (what the next run must send)."""
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            """SELECT event_id FROM analytics.track_outbox
               WHERE event_id NOT IN (SELECT event_id FROM segment_sync.delivered_events)
                 AND event_id NOT IN (SELECT message_id FROM segment_sync.rejected_messages
                                      WHERE kind = 'track' AND message_id IS NOT NULL)"""
        ).fetchall()
    return {r[0] for r in rows}


def _customer_tracks(db: str, customer_id: str) -> set[str]:
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            "SELECT event_id FROM analytics.track_outbox WHERE customer_id = ?", [customer_id]
        ).fetchall()
    return {r[0] for r in rows}


def test_a_closed_sender_and_its_client_are_freed(collector, settings) -> None:
    """`listen`'s worker makes a sender every run, for weeks: once closed (and its consumer
    threads ended), nothing keeps it alive, not the exit hook its client registered."""
    from pipelines.emit.segment_client import SegmentSender

    sender = SegmentSender(settings)
    sender.send([], on_acked=lambda acked: None)
    freed = weakref.ref(sender)
    sender.close()
    del sender
    deadline = time.monotonic() + 5  # the consumers end within upload_interval
    while freed() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert freed() is None, "a closed sender is still referenced"


def test_the_ledger_key_moves_with_every_write_that_changes_what_is_pending(tmp_path: Path) -> None:
    """The key a clean emit leaves (`settled.ledger_key`) moves when any ledger table gains or
    loses a row or gets a later write time, so the next emit reads every row again instead of
    only the changed customers'; reading it moves nothing."""
    from pipelines.emit import accounts, ledger, settled

    with duckdb.connect(str(tmp_path / "ledger.duckdb")) as con:
        ledger.ensure_sync_schema(con)
        accounts.ensure_account_schema(con)
        writes = [
            "insert into segment_sync.delivered_events values ('e1', 'r', 'delivered', now())",
            "update segment_sync.delivered_events set delivered_at = delivered_at + interval 1 second",
            "insert into segment_sync.identify_state values ('u1', 'h', now(), 'r', null)",
            "insert into segment_sync.rejected_messages values ('m', 'track', 'u1', 'why', '{}', now(), 'r')",
            "insert into segment_sync.tracks_in_flight values ('e2', '{}', 'r', now())",
            "insert into segment_sync.group_state values ('g1', 'h', now(), 'r')",
            "insert into segment_sync.customer_user_ids values ('c1', 'u1', now(), 'r')",
            "delete from segment_sync.identify_state",
        ]  # fmt: skip
        keys = [settled.ledger_key(con)]
        for sql in writes:
            con.execute(sql)
            keys.append(settled.ledger_key(con))
        assert len(set(keys)) == len(keys), "a write left the ledger key as it was"
        assert settled.ledger_key(con) == keys[-1]


@pytest.mark.slow  # seven job runs in process (~30 s on the 2-core box)
def test_events_left_pending_by_a_failed_emit_go_out_whatever_the_next_build_touched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run reads only the changed customers' rows after a clean emit; after an emit that
    failed, the next run reads everything: by a kept build, or by a delta build that touched
    other customers, the events left pending are sent, each once, with their identifies."""
    from pipelines.job import RunOptions, run_job
    from tests.conftest import make_sandbox

    for sandbox in make_sandbox(tmp_path, customers=40):
        collector, business = sandbox.collector, sandbox.business
        buyers = sorted(business.buyers)

        def run(label: str, sandbox: Any = sandbox) -> Any:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="dodo_segment"):
                report = run_job(sandbox.config(), RunOptions())
            scoped = "read only what the models changed" in caplog.text
            return report, scoped

        def pay(customer_id: str, sandbox: Any = sandbox) -> None:
            sandbox.business.add_payments(1, customer_id=customer_id)

        first = run_job(
            sandbox.config(), RunOptions(events_since=business.now - timedelta(days=30))
        )
        assert (first.outcome, first.pending) == ("success", 0), first.error

        # a clean run after a clean emit reads only the touched customer's rows
        pay(buyers[0])
        report, scoped = run("delta after a clean emit")
        assert (report.outcome, report.pending, scoped) == ("success", 0, True), report.error
        assert report.tracks_sent >= 1 and _unsettled(sandbox.db) == set()

        # Segment is down: the delta's events (customer 1) stay pending
        pay(buyers[1])
        collector.outage(True)
        report, _ = run("delta during an outage")
        assert report.outcome == "failed" and report.pending > 0
        left = _unsettled(sandbox.db)
        assert left and left <= _customer_tracks(sandbox.db, buyers[1])
        collector.outage(False)

        # nothing changed at Dodo: a kept build, and the pending events go out
        report, scoped = run("kept build after the outage")
        assert report.outcome == "success", report.error
        sent = {m["messageId"] for m in collector.tracks()}
        assert left <= sent and _unsettled(sandbox.db) == set()
        assert (report.pending, scoped) == (0, False)

        # down again, for customer 2's events; the next delta touches customer 3 only
        pay(buyers[2])
        collector.outage(True)
        report, _ = run("second outage")
        assert report.outcome == "failed"
        left = _unsettled(sandbox.db)
        assert left and not left & _customer_tracks(sandbox.db, buyers[3])
        collector.outage(False)
        pay(buyers[3])
        report, scoped = run("delta of another customer")
        assert report.outcome == "success", report.error
        sent = {m["messageId"] for m in collector.tracks()}
        assert left <= sent and _unsettled(sandbox.db) == set()
        assert (report.pending, scoped) == (0, False)
        identified = {m["userId"] for m in collector.identifies()[-10:]}
        assert {buyers[2], buyers[3]} <= identified

        # settled again: the next delta reads only its customer's rows
        pay(buyers[4])
        report, scoped = run("delta after recovering")
        assert (report.outcome, report.pending, scoped) == ("success", 0, True), report.error
        assert _unsettled(sandbox.db) == set()
        ids = [m["messageId"] for m in collector.tracks()]
        assert len(ids) == len(set(ids))  # each event once
