"""Reliability: each fault of the Dodo API, Segment, the process and the operator, injected over
HTTP against the sandbox, with the end state checked against the simulator's truth.

Invariants after the clean run that follows every fault: the raw tables hold exactly the
simulator's objects (once each, latest status); every event the models derive
(analytics.track_outbox) reached the collector unless deliberately rejected; repeats carry the
same messageId and content; the ledger never marks what the collector did not receive.
`make soak` runs the kill test with DODO_SEGMENT_SOAK_KILLS=200.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from pipelines import job
from pipelines.dodo_contract import PRIMARY_KEYS, RESOURCES, STATUS_FIELDS
from pipelines.job import RunOptions, RunReport, run_job
from pipelines.sandbox.faults import drop_field, huge_metadata, set_field, shift_page
from tests.conftest import Sandbox, make_sandbox, run_cli

pytestmark = pytest.mark.slow  # heavy: every scenario drives several job runs (3-10 s each)

SINCE = datetime(2000, 1, 1, tzinfo=UTC)
EVERYTHING = ["--events-since", "2000-01-01"]
"""Send the whole history, so 'received' == 'derived' with no skipped backlog in between."""

FIGURES: Counter[str] = Counter()
"""Totals for the closing note (faults injected, kill points, events lost, ...)."""


@pytest.fixture(scope="module", autouse=True)
def _report_figures() -> Iterator[None]:
    yield
    if FIGURES:
        print(f"\nreliability figures: {dict(sorted(FIGURES.items()))}", file=sys.stderr)


# --- end-state checks (also used by tests/test_security.py) ---------------------------------


def remove_item(sandbox: Sandbox, resource_name: str, item_id: str) -> dict[str, Any]:
    """Make an object disappear from the simulator (deleted upstream between two runs)."""
    business = sandbox.business
    with business.lock:
        table = business.tables[resource_name]
        at = next(i for i, item in enumerate(table.items) if item[table.pk] == item_id)
        item = table.items.pop(at)
        table.keys.pop(at)
        if table.by_id is not None:
            table.by_id.pop(item_id, None)
        business.touch()
    return item


def assert_raw_matches_truth(sandbox: Sandbox, vanished: Iterable[str] = ()) -> None:
    """Every raw table holds exactly the simulator's objects, once each, in their latest status.

    `vanished` ids were deleted upstream after an earlier run: the warehouse keeps them.
    """
    kept = set(vanished)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        for name in RESOURCES:
            key, status = PRIMARY_KEYS[name], STATUS_FIELDS.get(name)
            columns = f'"{key}", ' + (f'"{status}"' if status else "null")
            rows = con.execute(f'select {columns} from dodo_raw."{name}"').fetchall()
            ids = [r[0] for r in rows]
            assert len(ids) == len(set(ids)), f"duplicate rows in dodo_raw.{name}"
            truth = {
                item[key]: (item.get(status) if status else None)
                for item in sandbox.business.tables[name].items
            }
            loaded = dict(rows)
            assert set(loaded) - kept == set(truth), name
            stale = sorted(k for k, v in truth.items() if loaded[k] != v)
            assert not stale, f"{name}: stale status for {stale[:5]}"


@dataclass
class Delivery:
    """What the collector received, against the models' outbox and the ledger."""

    outbox: set[str]
    lifecycle: set[str]
    ledger: dict[str, str]
    rejected: set[str]
    received: dict[str, list[dict[str, Any]]]
    lost: set[str] = field(default_factory=set)
    phantom: set[str] = field(default_factory=set)
    dup_different_ids: int = 0


def delivery(sandbox: Sandbox) -> Delivery:
    """Compare the collector's track calls with analytics.track_outbox and segment_sync."""
    with duckdb.connect(sandbox.db, read_only=True) as con:

        def ids(sql: str) -> set[str]:
            return {r[0] for r in con.execute(sql).fetchall()}

        outbox = ids("select event_id from analytics.track_outbox")
        lifecycle = ids("select event_id from analytics.lifecycle_events")
        ledger = dict(
            con.execute("select event_id, status from segment_sync.delivered_events").fetchall()
        )
        rejected = ids("select message_id from segment_sync.rejected_messages where kind = 'track'")
    received: dict[str, list[dict[str, Any]]] = {}
    for message in sandbox.collector.tracks():
        received.setdefault(message["messageId"], []).append(message)
    skipped = {e for e, s in ledger.items() if s == "skipped"}
    result = Delivery(outbox, lifecycle, ledger, rejected, received)
    result.lost = outbox - set(received) - skipped - rejected
    result.phantom = set(received) - outbox
    by_content: dict[bytes, set[str]] = {}
    for message_id, copies in received.items():
        m = copies[0]
        key = orjson.dumps(
            [m["userId"], m["event"], m["timestamp"], m.get("properties")],
            option=orjson.OPT_SORT_KEYS,
        )
        by_content.setdefault(key, set()).add(message_id)
    result.dup_different_ids = sum(len(ids) - 1 for ids in by_content.values())
    return result


def assert_nothing_lost(
    sandbox: Sandbox, rejected: Iterable[str] = (), excluded: Iterable[str] = ()
) -> Delivery:
    """After a clean run: every derived event received (or deliberately rejected), none twice
    under different messageIds, repeats identical, the ledger equal to what was received."""
    d = delivery(sandbox)
    FIGURES["events_checked"] += len(d.outbox)
    FIGURES["events_lost"] += len(d.lost)
    FIGURES["duplicates_with_different_message_ids"] += d.dup_different_ids + len(d.phantom)
    FIGURES["repeats_with_same_message_id"] += sum(len(c) - 1 for c in d.received.values())
    assert d.outbox and d.outbox <= d.lifecycle
    assert not d.lost, f"{len(d.lost)} events lost, e.g. {sorted(d.lost)[:3]}"
    assert not d.phantom, f"received ids the models do not derive: {sorted(d.phantom)[:3]}"
    assert d.dup_different_ids == 0
    assert d.rejected == set(rejected)
    delivered = {e for e, s in d.ledger.items() if s == "delivered"}
    assert delivered == set(d.received), "the ledger and the collector disagree"
    for message_id, copies in d.received.items():
        first = copies[0]
        for m in copies[1:]:
            differing = {
                key: (first.get(key), m.get(key))
                for key in ("userId", "event", "properties", "timestamp")
                if m.get(key) != first.get(key)
            }
            if differing.get("properties"):
                old, new = differing["properties"]
                differing["properties"] = {
                    k: (old.get(k), new.get(k)) for k in old.keys() | new.keys()
                    if old.get(k) != new.get(k)
                }  # fmt: skip
            # a repeat goes as it went the first time (segment_sync.tracks_in_flight), even when
            # the object moved on since: a renewal's next_billing, a dispute's status
            assert not differing, f"{message_id} sent again with other content: {differing}"
    assert_identifies_current(sandbox, excluded)
    return d


def assert_identifies_current(sandbox: Sandbox, excluded: Iterable[str] = ()) -> None:
    """The last identify Segment received for each customer carries the outbox's traits."""
    skip = set(excluded)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        rows = con.execute("select user_id, traits::varchar from analytics.identify_outbox")
        outbox = {user: orjson.loads(traits) for user, traits in rows.fetchall()}
    last: dict[str, dict[str, Any]] = {}
    for message in sandbox.collector.identifies():
        last[message["userId"]] = message["traits"]
    assert set(last) == set(outbox), "customers never identified"
    stale = [
        user
        for user, traits in outbox.items()
        if last[user] != {k: v for k, v in traits.items() if k not in skip}
    ]
    assert not stale, f"stale traits in Segment for {stale[:3]}"


# --- running the job ------------------------------------------------------------------------


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 100 with short backoff caps (as tests/test_emit.py), so faults hit one batch."""
    original = job.emit_settings

    def shrunk(config: Any) -> Any:
        return replace(
            original(config),
            upload_size=100,
            upload_interval=0.02,
            max_backoff_seconds=3,
            max_rate_limit_seconds=5,
            checkpoint_every_messages=100,
            threads=2,
        )

    monkeypatch.setattr(job, "emit_settings", shrunk)


def run(sandbox: Sandbox, events_since: datetime | None = SINCE, **flags: Any) -> RunReport:
    """One `run` in process (extract over HTTP -> load -> models -> emit over HTTP)."""
    return run_job(sandbox.config(**flags), RunOptions(events_since=events_since))


def fault(sandbox: Sandbox, **kwargs: Any) -> None:
    """Inject a Dodo API fault and count it."""
    sandbox.simulator.inject_fault(**kwargs)
    FIGURES["faults_injected"] += 1


def cli_ok(result: subprocess.CompletedProcess, code: int = 0) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single `dodo-segment: ...` line of a failed CLI call (and no traceback)."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("dodo-segment:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- Dodo API faults: transient, the run must end equal to the truth ----------------------------

TRANSIENT = {
    "429_burst_with_retry_after": [dict(status=429, retry_after=0.05, times=6)],
    "429_burst_without_retry_after": [dict(path="/customers", status=429, times=2)],
    "500_502_503": [
        dict(path="/subscriptions", status=500),
        dict(path="/refunds", status=502),
        dict(path="/balances/ledger", status=503, times=2),
    ],
    "timeout": [dict(path="/payments", kind="timeout", delay=1.5, times=2)],
    "reset_mid_body": [dict(path="/payments", kind="reset", times=2)],
    "malformed_json_page": [dict(path="/balances/ledger", kind="malformed_json", times=2)],
}


@pytest.mark.parametrize("faults", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_dodo_faults_end_equal_to_the_truth(
    sandbox: Sandbox, faults: list[dict[str, Any]]
) -> None:
    for spec in faults:
        fault(sandbox, **spec)
    report = run(sandbox, **{"sources.dodo.timeout_seconds": 1, "sources.dodo.max_retries": 8})
    assert (report.outcome, report.exit_code) == ("success", 0), report.error
    assert all(f.hits == f.times for f in sandbox.simulator.faults), "a fault was never served"
    assert sum(report.extract.api_retries.values()) >= sum(
        f.times for f in sandbox.simulator.faults
    )
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


# --- Dodo API bad input: data, never a crash ----------------------------------------------------


def first_item_only(mutator: Any) -> Any:
    """Apply a page mutator to the first non-empty page served, once."""
    done: list[bool] = []

    def hook(items: list, ctx: Any) -> list:
        if items and not done:
            done.append(True)
            return mutator(items, ctx)
        return items

    return hook


def test_item_missing_required_fields_is_set_aside_or_loaded_not_fatal(sandbox: Sandbox) -> None:
    def drop_created_at_of_first(items: list, _ctx: object) -> list:
        if items:
            items[0].pop("created_at")
        return items

    # created_at is what the extract needs: the item is set aside; a missing currency/customer
    # is data the models handle (quarantined by a warn test if unusable).
    fault(sandbox, path="/subscriptions", mutate=drop_created_at_of_first, times=10_000)
    fault(sandbox, path="/payments", mutate=first_item_only(drop_field("currency")), times=10_000)
    report = run(sandbox)
    assert report.exit_code == 3 and report.outcome == "finished_with_rejections", report.error
    with duckdb.connect(sandbox.db, read_only=True) as con:
        reasons = con.execute(
            "select distinct resource, reason from dodo_raw.rejected_records"
        ).fetchall()
        subs = con.execute("select count(*) from dodo_raw.subscriptions").fetchone()[0]
        no_currency = con.execute(
            "select count(*) from dodo_raw.payments where currency is null"
        ).fetchone()[0]
    assert reasons == [("subscriptions", "missing created_at")]
    assert subs + report.extract.rejected_records == len(sandbox.business.subscriptions)
    assert no_currency > 0
    # The upstream fixes its data: the next run reads every object whole.
    sandbox.simulator.clear_faults()
    report = run(sandbox, **{"sources.dodo.subscriptions_full_sweep_hours": 0})
    assert report.exit_code in (0, 3), report.error
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


def test_unknown_enum_and_new_field_flow_through_models_and_emit(sandbox: Sandbox) -> None:
    new_field = set_field("loyalty_tier", {"tier": "gold", "since": 2021})
    new_status = set_field("status", "past_due", first_only=True)
    fault(
        sandbox,
        path="/subscriptions",
        mutate=lambda i, c: new_status(new_field(i, c), c),
        times=10_000,
    )
    fault(sandbox, path="/payments", mutate=set_field("charge_type", "renewal_v9"), times=10_000)
    report = run(sandbox)
    assert report.exit_code in (0, 3), report.error  # an unknown status may be quarantined
    with duckdb.connect(sandbox.db, read_only=True) as con:
        tier = con.execute(
            "select distinct loyalty_tier from dodo_raw.subscriptions where loyalty_tier is not null"
        ).fetchall()
        past_due = con.execute(
            "select count(*) from dodo_raw.subscriptions where status = 'past_due'"
        ).fetchone()[0]
    assert [orjson.loads(t[0]) for t in tier] == [{"tier": "gold", "since": 2021}]
    assert past_due > 0
    # Once the API serves the real values again, the warehouse converges on the truth.
    sandbox.simulator.clear_faults()
    run(sandbox, **{"sources.dodo.subscriptions_full_sweep_hours": 0})
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


def test_40kb_metadata_round_trips(sandbox: Sandbox) -> None:
    blob_maker = huge_metadata(40)
    served: dict[str, Any] = {}

    def big(items: list, ctx: Any) -> list:
        if items and not served:
            items = blob_maker(items, ctx)
            served[items[0]["customer_id"]] = items[0]["metadata"]
        return items

    fault(sandbox, path="/customers", mutate=big, times=10_000)
    report = run(sandbox)
    assert report.exit_code in (0, 3), report.error
    ((customer_id, blob),) = served.items()
    assert len(orjson.dumps(blob)) > 40_000
    with duckdb.connect(sandbox.db, read_only=True) as con:
        stored = con.execute(
            "select metadata::varchar from dodo_raw.customers where customer_id = ?", [customer_id]
        ).fetchone()
    assert stored is not None and orjson.loads(stored[0]) == blob
    assert_nothing_lost(sandbox, rejected=())


HOSTILE_NAMES = [
    "Zoë Ångström 名前 🚀",
    "tab\tnewline\nreturn\r bell\x07 esc\x1b del\x7f",
    "rtl \u202eevil\u202c zero\u200bwidth",
    "nul\x00byte",
]


def test_unicode_and_control_characters_in_names_round_trip(sandbox: Sandbox) -> None:
    business = sandbox.business
    renamed: dict[str, str] = {}
    with business.lock:
        for customer, name in zip(business.customers, HOSTILE_NAMES, strict=False):
            customer["name"] = name
            business.buyers[customer["customer_id"]].ref["name"] = name
            renamed[customer["customer_id"]] = name
        business.touch()
    FIGURES["faults_injected"] += 1
    report = run(sandbox)
    assert report.exit_code in (0, 3), report.error
    with duckdb.connect(sandbox.db, read_only=True) as con:
        for customer_id, name in renamed.items():
            stored = con.execute(
                "select name from dodo_raw.customers where customer_id = ?", [customer_id]
            ).fetchone()
            assert stored == (name,), customer_id
            embedded = con.execute(
                "select distinct customer__name from dodo_raw.payments where customer__customer_id = ?",
                [customer_id],
            ).fetchall()
            assert embedded in ([], [(name,)])
    traits = {m["userId"]: m["traits"] for m in sandbox.collector.identifies()}
    for customer_id, name in renamed.items():
        assert traits[customer_id]["name"] == name
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


def shifted_second_page(sandbox: Sandbox) -> None:
    """Rows inserted while paging: page 1 repeats the tail of page 0 and pushes 3 items out."""
    fault(
        sandbox,
        path="/balances/ledger",
        mutate=shift_page(3),
        match=lambda q: q.get("page_number") == "1",
        times=1,
    )


def test_same_item_on_two_pages_is_loaded_once(sandbox: Sandbox) -> None:
    shifted_second_page(sandbox)
    report = run(sandbox)
    assert report.exit_code == 0, report.error
    assert sandbox.simulator.faults[0].hits == 1
    with duckdb.connect(sandbox.db, read_only=True) as con:
        dup = con.execute(
            "select count(*) - count(distinct id) from dodo_raw.balance_ledger"
        ).fetchone()[0]
    assert dup == 0
    assert_nothing_lost(sandbox)


def test_items_pushed_off_a_shifted_page_are_not_lost(sandbox: Sandbox) -> None:
    shifted_second_page(sandbox)
    run(sandbox)
    run(sandbox)  # a later run does not repair it either: the rows are older than the lookback
    assert_raw_matches_truth(sandbox)


def test_object_that_disappears_between_runs_is_kept_not_fatal(sandbox: Sandbox) -> None:
    run(sandbox)
    assert_raw_matches_truth(sandbox)
    sent = len(sandbox.collector.messages)
    customer = sandbox.business.customers[5]["customer_id"]
    product = sandbox.business.products[0]["product_id"]
    refund = sandbox.business.refunds[-1]["refund_id"]
    for name, item_id in (("customers", customer), ("products", product), ("refunds", refund)):
        remove_item(sandbox, name, item_id)
        FIGURES["faults_injected"] += 1
    report = run(sandbox, **{"sources.dodo.customers_full_refresh_hours": 0})
    assert report.exit_code in (0, 3), report.error
    assert_raw_matches_truth(sandbox, vanished={customer, product, refund})
    # History is not retracted and nothing is sent again because an object vanished.
    assert len(sandbox.collector.tracks()) == len(
        {m["messageId"] for m in sandbox.collector.tracks()}
    )
    assert len(sandbox.collector.messages) - sent == report.identifies_sent + report.tracks_sent
    assert_nothing_lost(sandbox)


@pytest.mark.slow
def test_key_revoked_between_runs_fails_clearly_and_loses_nothing(sandbox: Sandbox) -> None:
    cli_ok(run_cli("run", *EVERYTHING, env=sandbox.env()))
    before = {name: _count(sandbox.db, name) for name in RESOURCES}
    sandbox.business.advance_time(days=1)
    sandbox.simulator.api_key = "rotated_key_after_revocation"
    FIGURES["faults_injected"] += 1
    started = time.monotonic()
    result = run_cli("run", *EVERYTHING, env=sandbox.env())
    assert result.returncode == 1
    line = one_line_error(result)
    assert "401" in line and "DODO_PAYMENTS_API_KEY" in line
    assert time.monotonic() - started < 30  # a 401 is not retried
    assert {name: _count(sandbox.db, name) for name in RESOURCES} == before
    status = run_cli("status", "--json", env=sandbox.env())
    last = orjson.loads(status.stdout)["runs"][0]
    assert (last["outcome"], last["exit_code"]) == ("failed", 1) and "401" in last["error"]
    # The operator installs the new key: the next run catches up with nothing lost.
    result = run_cli(
        "run", *EVERYTHING, env=sandbox.env(DODO_PAYMENTS_API_KEY=sandbox.simulator.api_key)
    )
    cli_ok(result)
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


def _count(db: str, table: str) -> int:
    with duckdb.connect(db, read_only=True) as con:
        return con.execute(f'select count(*) from dodo_raw."{table}"').fetchone()[0]


# --- Segment faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(lambda c: c.inject(500, times=3), id="500s"),
        pytest.param(lambda c: c.inject(429, times=2, retry_after=1), id="429_retry_after"),
        pytest.param(lambda c: c.drop_after_receive(times=3), id="dropped_after_receive"),
    ],
)
def test_segment_faults_are_retried_without_loss(sandbox: Sandbox, small_batches, inject) -> None:
    inject(sandbox.collector)
    FIGURES["faults_injected"] += 1
    report = run(sandbox)
    assert (report.outcome, report.pending) == ("success", 0), report.error
    assert report.tracks_sent == len(delivery(sandbox).outbox) > 1000
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


def test_segment_timeouts_resend_with_the_same_message_ids(sandbox: Sandbox, small_batches) -> None:
    # The collector stores each batch, then answers after the client gave up: delivered, not
    # acknowledged. Slow only for the first 1.5 s of sending.
    collector = sandbox.collector
    collector.latency_ms = 1500

    def recover() -> None:
        while not collector.messages:
            time.sleep(0.01)
        time.sleep(1.5)
        collector.latency_ms = 0

    FIGURES["faults_injected"] += 1
    threading.Thread(target=recover, daemon=True).start()
    report = run(sandbox, **{"segment.timeout_seconds": 1})
    if report.outcome != "success":  # every retry of a batch timed out: the next run catches up
        report = run(sandbox)
    assert report.outcome == "success", report.error
    assert_nothing_lost(sandbox)
    repeats = Counter(collector.message_ids())
    assert max(repeats.values()) > 1  # timed-out batches were sent again, with the same ids


def test_a_400_for_one_batch_rejects_only_its_culprit(sandbox: Sandbox, small_batches) -> None:
    report = run_job(sandbox.config(), RunOptions(skip_emit=True))
    assert report.exit_code == 0, report.error
    with duckdb.connect(sandbox.db, read_only=True) as con:
        culprit = con.execute(
            "select event_id from analytics.track_outbox order by occurred_at limit 1 offset 500"
        ).fetchone()[0]
    sandbox.collector.reject_message_ids = {culprit}
    FIGURES["faults_injected"] += 1
    report = run(sandbox)
    assert (report.exit_code, report.rejected, report.pending) == (3, 1, 0), report.error
    assert_nothing_lost(sandbox, rejected={culprit})
    # Not retried automatically: a later run sends nothing more and reports no new rejection.
    before = len(sandbox.collector.messages)
    again = run(sandbox)
    assert (again.exit_code, len(sandbox.collector.messages)) == (0, before), again.error


def test_multi_hour_segment_outage_spanning_several_runs(sandbox: Sandbox, small_batches) -> None:
    collector = sandbox.collector
    collector.outage(True)
    FIGURES["faults_injected"] += 1
    pending = []
    for _ in range(2):  # cron runs three simulated hours apart, all during the outage
        started = time.monotonic()
        report = run(sandbox)
        assert time.monotonic() - started < 30  # bounded: minutes, not the outage's hours
        assert (report.outcome, report.exit_code) == ("failed", 1)
        assert report.tracks_sent == 0 and report.error
        pending.append(report.pending)
        sandbox.business.advance_time(days=3 / 24)
    assert collector.messages == [] and pending[0] > 1000
    with duckdb.connect(sandbox.db, read_only=True) as con:
        marked = con.execute("select count(*) from segment_sync.delivered_events").fetchone()[0]
    assert marked == 0  # nothing marked delivered while nothing was received
    collector.outage(False)
    report = run(sandbox)
    assert (report.outcome, report.pending) == ("success", 0), report.error
    assert report.tracks_sent + report.identifies_sent >= pending[-1]  # pending counts both
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


# --- process: SIGKILL at random points of `dodo-segment run` --------------------------------------

KILLS = int(os.environ.get("DODO_SEGMENT_SOAK_KILLS", "9"))  # 3 per step; make soak: 200
SOAK_SEED = int(os.environ.get("DODO_SEGMENT_SOAK_SEED", "20261123"))
PHASES = ("start", "extract/load", "models", "emit", "finish")


def _phase(lines: list[str]) -> str:
    """Which step a run was in, from the log lines it had printed so far."""
    text = "".join(lines)
    if "emit:" in text or "run {" in text:
        return "finish"
    if "models:" in text:
        return "emit"
    if "extract: loaded" in text:
        return "models"
    if "extract:" in text:
        return "extract/load"
    return "start"


def _watched_run(
    env: dict[str, str], target: str | None = None, delay: float = 0.0
) -> tuple[dict[str, float], str, int]:
    """Run the CLI; with a target phase, SIGKILL it `delay` s after it enters that phase.

    Returns when each phase began (s from the process start), the phase at the kill
    ("completed" when the run ended first) and the exit code.
    """
    exe = Path(sys.executable).with_name("dodo-segment")
    proc = subprocess.Popen(
        [str(exe), "run", *EVERYTHING], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = time.monotonic()
    lines: list[str] = []
    marks: dict[str, float] = {}
    entered = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            marks.setdefault(_phase(lines), time.monotonic() - started)
            if target in marks:
                entered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed_in = "completed"
    if target is not None:
        while not entered.wait(0.005) and proc.poll() is None:
            pass
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            killed_in = _phase(list(lines))
            os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=180)
    reader.join(timeout=5)
    marks["end"] = time.monotonic() - started
    return marks, killed_in, rc


@pytest.mark.slow
def test_kill_at_random_points_then_a_clean_run_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL during extract/load, models and emit (seeded), then one clean run."""
    rng = random.Random(SOAK_SEED)
    for sandbox in make_sandbox(tmp_path, customers=60):
        sandbox.collector.latency_ms = 20  # sending lasts long enough to be interrupted
        extra = {"SOURCES__DODO__ROWS_PER_LOAD": "600"}  # several loads: kills land between them
        # The first kill interrupts the initial backfill; its duration calibrates the others.
        marks, killed_in, _ = _watched_run(sandbox.env(**extra), "extract/load", rng.uniform(0, 2))
        kills: Counter[str] = Counter({killed_in: 1})
        calibration, _, rc = _watched_run(sandbox.env(**extra))
        assert rc == 0
        spans = {
            "extract/load": calibration["models"] - calibration["extract/load"],
            "models": calibration["emit"] - calibration["models"],
            "emit": calibration["finish"] - calibration["emit"],
        }
        for i in range(1, KILLS):
            # New payments, renewals and cancellations: every run has fresh events to send.
            sandbox.business.advance_time(days=rng.uniform(0.1, 1.0))
            target = ("extract/load", "models", "emit")[i % 3]
            # A delay drawn over that step's duration, measured on a real run.
            delay = rng.uniform(0, spans[target] * 1.2)
            _, killed_in, _ = _watched_run(sandbox.env(**extra), target, delay)
            kills[killed_in] += 1
            with duckdb.connect(sandbox.db, read_only=True) as con:  # opens after every kill
                con.execute("select count(*) from segment_sync.runs").fetchone()
        sandbox.collector.latency_ms = 0
        _, _, rc = _watched_run(sandbox.env())
        assert rc == 0
        FIGURES["kill_points"] += sum(v for k, v in kills.items() if k != "completed")
        for name, count in kills.items():
            FIGURES[f"kills_during_{name}"] += count
        print(f"kills by phase (seed {SOAK_SEED}): {dict(kills)}", file=sys.stderr)
        if KILLS >= 6:
            assert {"extract/load", "models", "emit"} <= set(kills)
        assert_raw_matches_truth(sandbox)
        assert_nothing_lost(sandbox)


# --- operator -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_concurrent_runs_one_proceeds_one_skips_quietly(sandbox: Sandbox) -> None:
    sandbox.collector.latency_ms = 300  # the first run holds the lock for a while
    exe = Path(sys.executable).with_name("dodo-segment")
    env = sandbox.env()
    first = subprocess.Popen(
        [str(exe), "run", *EVERYTHING], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not Path(sandbox.db + ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    second = run_cli("run", *EVERYTHING, env=env, timeout=30)
    waiting = subprocess.Popen(
        [str(exe), "run", "--wait", *EVERYTHING], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 0 and "another run is in progress" in second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert waiting.wait(timeout=120) == 0  # --wait queues behind it, then finds nothing new
    sandbox.collector.latency_ms = 0
    assert_raw_matches_truth(sandbox)
    d = assert_nothing_lost(sandbox)
    assert max(len(c) for c in d.received.values()) == 1  # the overlap sent nothing twice


@pytest.mark.slow
def test_warehouse_from_a_newer_schema_version_is_refused_untouched(sandbox: Sandbox) -> None:
    cli_ok(run_cli("run", "--skip-emit", env=sandbox.env()))
    with duckdb.connect(sandbox.db) as con:
        con.execute(
            "insert into segment_sync.warehouse_meta values (99, 'dodo-segment 9.0', now())"
        )
        con.execute("checkpoint")
    digest = file_digest(sandbox.db)
    result = run_cli("run", *EVERYTHING, env=sandbox.env())
    assert result.returncode == 1
    line = one_line_error(result)
    assert "newer" in line and "upgrade" in line
    assert file_digest(sandbox.db) == digest and not Path(sandbox.db + ".wal").exists()
    assert sandbox.collector.messages == []


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_warehouse_gives_a_clear_error_and_is_not_overwritten(
    sandbox: Sandbox, damage: str
) -> None:
    path = Path(sandbox.db)
    if damage == "garbage":
        path.write_bytes(random.Random(1).randbytes(300_000))
    else:
        cli_ok(run_cli("run", "--skip-emit", env=sandbox.env()))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    FIGURES["faults_injected"] += 1
    digest = file_digest(path)
    for args in (["run", *EVERYTHING], ["status"], ["doctor"]):
        result = run_cli(*args, env=sandbox.env(), timeout=60)
        assert result.returncode != 0 or args[0] == "status", (args, result.stderr[-2000:])
        assert result.returncode in (0, 1, 2), (args, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stdout + result.stderr, args
        assert file_digest(path) == digest, f"{args[0]} changed the damaged file"
        if args[0] == "run":
            assert "dodo-segment:" in result.stderr
    assert sandbox.collector.messages == []


def _chattr_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.mkdir()
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return False
        try:
            (probe / "x").touch()
            return False  # not enforced on this filesystem
        except OSError:
            return True
    except FileNotFoundError:
        return False
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        probe.rmdir()


@pytest.mark.slow
def test_read_only_warehouse_directory_fails_clearly(sandbox: Sandbox, tmp_path: Path) -> None:
    # Tests run as root, for whom chmod does not stop writes: an immutable directory does.
    if not _chattr_works(tmp_path):
        pytest.skip("chattr +i is not available or not enforced here")
    cli_ok(run_cli("run", *EVERYTHING, env=sandbox.env()))
    sandbox.business.advance_time(days=1)
    folder = Path(sandbox.db).parent
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    FIGURES["faults_injected"] += 1
    try:
        result = run_cli("run", *EVERYTHING, env=sandbox.env(), timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert result.returncode == 1, result.stderr[-2000:]
    cli_ok(run_cli("run", *EVERYTHING, env=sandbox.env()))
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)
    one_line_error(result)  # the expected failure explained in one line, without a traceback


@pytest.mark.slow
def test_warehouse_path_under_a_file_fails_clearly(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("not a directory")
    db = tmp_path / "plainfile" / "w.duckdb"
    FIGURES["faults_injected"] += 1
    result = run_cli("run", *EVERYTHING, env=sandbox.env(DODO_SEGMENT_DB=str(db)), timeout=60)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "plainfile" in one_line_error(result)
    assert (tmp_path / "plainfile").read_text() == "not a directory"
    assert sandbox.collector.messages == []


@pytest.mark.slow
def test_warehouse_path_in_a_missing_directory_is_created_owner_only(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    db = tmp_path / "no" / "such" / "dir" / "w.duckdb"
    sandbox.db = str(db)
    cli_ok(run_cli("run", *EVERYTHING, env=sandbox.env()))
    assert (db.parent.stat().st_mode & 0o777) == 0o700
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)


def _file_size_limit(limit: int) -> Any:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_full_disk_fails_clearly_and_the_next_run_catches_up(sandbox: Sandbox) -> None:
    # A full disk, simulated per process: writes past RLIMIT_FSIZE fail with EFBIG.
    cli_ok(run_cli("run", *EVERYTHING, env=sandbox.env()))
    sandbox.business.advance_time(days=3)
    exe = Path(sys.executable).with_name("dodo-segment")
    limit = 64 * 1024  # the WAL and the new pages cannot be written
    FIGURES["faults_injected"] += 1
    result = subprocess.run(
        [str(exe), "run", *EVERYTHING], env=sandbox.env(), capture_output=True, text=True,
        timeout=120, preexec_fn=_file_size_limit(limit),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "dodo-segment: failed" in result.stderr  # its wording: see LOAD_FAILURE_TRACEBACK
    cli_ok(run_cli("run", *EVERYTHING, env=sandbox.env()))
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)
