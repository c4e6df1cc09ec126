"""A delta build equals a full build: randomized changes through the sandbox, every analytics
table compared with a full build of a copy after every run (EXCEPT ALL both ways, 0 rows)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from pipelines import dodo_contract
from pipelines.commands import erasure
from pipelines.commands.forget import forget_customers
from pipelines.config import IdentityConfig
from pipelines.extract import lookback, merge_webhooks, run_extract
from pipelines.transform import TransformResult, delta, run_models, runner, touched
from pipelines.transform.verify import verify_against_full_build
from pipelines.webhook_store import WebhookStore, store_folder
from tests.conftest import Sandbox, make_sandbox, run_cli

CUSTOM_TRAITS = """\
-- no grain: a user model is rebuilt in full, and the customers whose rows moved are touched
select customer_id, count(*) as custom_payment_count
from analytics.stg_payments
where customer_id is not null
group by customer_id
"""

CUSTOM_TRAITS_VIEW = """\
-- materialized: view
select customer_id, count(*) as custom_payment_count,
    (select count(*) from analytics.stg_payments) as all_payments
from analytics.stg_payments
where customer_id is not null
group by customer_id
"""

CUSTOM_EVENTS = """\
-- grain: customer
select
    analytics.event_id('big_payment', payment_id) as event_id,
    'Big Payment' as event,
    customer_id,
    created_at as occurred_at,
    json_object('payment_id', payment_id, 'amount', amount) as properties
from analytics.stg_payments
where status = 'succeeded' and amount_minor > 5000
"""

TRACK_OUTBOX_TESTS = """\
-- test: big_payments_on_their_way
-- severity: warn
-- It finds rows in every build, so a delta build counts the touched customers' offending rows
-- as the last build left them: the track outbox over the previous state.
select event_id from analytics.track_outbox where event = 'Big Payment'
"""


@pytest.fixture()
def business(tmp_path: Path) -> Iterator[tuple[Sandbox, Path]]:
    """A small sandbox business with two user models (one global, one per customer) and a
    user's data test of the track outbox that always finds rows."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "custom_traits.sql").write_text(CUSTOM_TRAITS)
    (models / "custom_events.sql").write_text(CUSTOM_EVENTS)
    (models / "track_outbox.tests.sql").write_text(TRACK_OUTBOX_TESTS)
    for sandbox in make_sandbox(tmp_path, customers=40):
        yield sandbox, models


def _snapshot_drift(db: str) -> dict[str, tuple[int, int]]:
    """Per snapshot table, the rows it holds that the raw data does not give now and the
    reverse: a delta build updates only the entities it reached, and a stale row would let a
    later run miss a customer it touches."""
    drift = {}
    with duckdb.connect(db, read_only=True) as con:
        for table, query in touched.snapshot_sql(con).items():
            row = con.execute(
                f"select (select count(*) from (select * from {table} except all ({query}))), "
                f"(select count(*) from (({query}) except all select * from {table}))"
            ).fetchone()
            drift[table] = (int(row[0]), int(row[1])) if row else (-1, -1)
    return drift


def _succeeded(sandbox: Sandbox, rng: random.Random) -> dict:
    paid = [p for p in sandbox.business.payments if p["status"] == "succeeded"]
    return rng.choice(paid)


def _changes(sandbox: Sandbox, rng: random.Random) -> dict[str, Callable[[], None]]:
    """Each kind of change the business can go through between two runs."""
    biz = sandbox.business

    def new_payments() -> None:
        biz.add_payments(rng.randint(1, 3))

    def status_flip() -> None:
        open_ = [p for p in biz.payments if p["status"] not in ("succeeded", "failed")]
        if open_:
            biz.set_payment_status(
                rng.choice(open_)["payment_id"], rng.choice(["succeeded", "failed"])
            )
        else:
            biz.add_payments(1, status="processing")

    def refund_old() -> None:
        refund = biz.add_refund(
            _succeeded(sandbox, rng)["payment_id"], "succeeded", rng.random() < 0.5
        )
        if not refund["is_partial"] and rng.random() < 0.5:
            # as the API may send it: revenue_daily then takes the refunded payment's currency
            # and amount, a payment of another day than the refund's
            refund["amount"] = refund["currency"] = None
            biz.touch()

    def dispute_old() -> None:
        opened = [d for d in biz.disputes if d["dispute_status"] == "dispute_opened"]
        if opened and rng.random() < 0.5:
            biz.set_dispute_status(
                rng.choice(opened)["dispute_id"], rng.choice(["dispute_won", "dispute_lost"])
            )
        else:
            biz.add_dispute(_succeeded(sandbox, rng)["payment_id"])

    def subscription_flip() -> None:
        live = [s for s in biz.subscriptions if s["status"] in ("active", "on_hold")]
        if not live:
            return
        sub = rng.choice(live)
        if sub["status"] == "on_hold":
            biz.set_subscription_status(sub["subscription_id"], "active")
        elif rng.random() < 0.5:
            biz.set_subscription_status(sub["subscription_id"], rng.choice(["on_hold", "paused"]))
        else:
            biz.cancel_subscription(sub["subscription_id"], at_period_end=rng.random() < 0.5)

    def late_visible() -> None:
        biz.add_payments(1, at=biz.now - timedelta(days=rng.randint(3, 40)))

    def payment_moves() -> None:
        payment = _succeeded(sandbox, rng)
        other = rng.choice([c for c in biz.buyers if c != payment["customer"]["customer_id"]])
        payment["customer"] = dict(biz.buyers[other].ref)
        biz.touch()

    def time_passes() -> None:  # renewals, trials ending, and now and then a month beginning
        biz.advance_time(days=rng.uniform(0.2, 4), seed=rng.randint(0, 10**6))

    return {
        "new_payments": new_payments,
        "status_flip": status_flip,
        "refund_old": refund_old,
        "dispute_old": dispute_old,
        "subscription_flip": subscription_flip,
        "late_visible": late_visible,
        "payment_moves": payment_moves,
        "time_passes": time_passes,
    }


def _webhook(sandbox: Sandbox, rng: random.Random) -> None:
    """A new payment arrives as a stored webhook (merged without an API read)."""
    payment = sandbox.business.add_payments(1)[0]
    delivery = {
        "business_id": "bus_sandbox",
        "type": "payment.succeeded",
        "timestamp": sandbox.business.now.isoformat(),
        "data": dict(payment),
    }
    store = WebhookStore(store_folder(sandbox.db)).ensure()
    assert store.store(f"msg_{rng.randint(0, 10**9)}", delivery)
    merge_webhooks(sandbox.config())


def _stale_key_hashes(db: str) -> dict[tuple[str, str], int]:
    """Per hashed raw key: the rows whose hash (`touched.hash_raw_keys`) is not their key's
    (a row without one is a look-up candidate, never hidden)."""
    wrong = {}
    with duckdb.connect(db, read_only=True) as con:
        for table, column in dodo_contract.HASHED_RAW_KEYS:
            hashed = dodo_contract.key_hash_column(column)
            count = con.execute(
                f'select count(*) from dodo_raw."{table}" where "{hashed}" is not null '
                f'and "{hashed}" is distinct from hash(cast("{column}" as varchar))'
            ).fetchone()[0]
            if count:
                wrong[(table, column)] = count
    return wrong


def _copy_raw_row(
    con: duckdb.DuckDBPyConnection, table: str, where: str, replace: str, seconds: int
) -> None:
    """Write a copy of the first raw row of `table` matching `where`, with the columns
    `replace` gives, as written `seconds` after the last sync (a write the next run reads)."""
    con.execute(
        f"insert into dodo_raw.{table} by name select * replace ({replace}, "
        f"(select max(as_of) from dodo_raw.lookback_passes) + interval {seconds} second "
        f"as _synced_at) from dodo_raw.{table} where {where} order by all limit 1"
    )


APP_USER_IDS = IdentityConfig(
    user_id_sources=(
        "customer.metadata.app_user_id",
        "payment.metadata.app_user_id",
        "customer_id",
    ),
    group_source="tax_id",
)
"""The sandbox's app user ids (some shared by two customers) and its B2B accounts (issue 22)."""


MORE_SEEDS = [int(s) for s in os.environ.get("DODO_SEGMENT_DELTA_SEEDS", "").split(",") if s]
"""More seeds to run locally (`DODO_SEGMENT_DELTA_SEEDS=4,5,6`): odd ones with the app user
ids and accounts, even ones with the default identity."""


COLLIDING_LOOKUP_KEY = "case when {0} is not null then cast(length({0}) as uinteger) end"
"""A lookup key that every id of the same length shares: the snapshot's look-ups then find
many rows of other ids, which only the ids' own comparison sets apart."""


@pytest.mark.parametrize(
    ("seed", "identity", "colliding_keys", "events_view"),
    [(1, IdentityConfig(), False, False), (2, IdentityConfig(), True, True),
     (3, APP_USER_IDS, False, False)]
    + [(s, APP_USER_IDS if s % 2 else IdentityConfig(), False, False) for s in MORE_SEEDS],
    ids=["seed1", "seed2-colliding-lookup-keys-custom-events-a-view",
         "seed3-app-user-ids-and-accounts"]
    + [f"seed{s}" for s in MORE_SEEDS],
)  # fmt: skip
@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_a_delta_build_equals_a_full_build_after_every_run(
    business: tuple[Sandbox, Path],
    seed: int,
    identity: IdentityConfig,
    colliding_keys: bool,
    events_view: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox, models = business
    if colliding_keys:  # and the touched days read by the day of every payment
        monkeypatch.setattr(touched, "lookup_key", COLLIDING_LOOKUP_KEY.format)
        monkeypatch.setattr(delta, "_DAY_RANGES_MAX", 0)
    if events_view:  # a view keeps no rows as the last build left them
        view = CUSTOM_EVENTS.replace(
            "-- grain: customer\n", "-- grain: customer\n-- materialized: view\n"
        )
        (models / "custom_events.sql").write_text(view)
        # and one without a grain, whose rows change for every customer at each new payment
        (models / "custom_traits.sql").write_text(CUSTOM_TRAITS_VIEW)
    rng = random.Random(seed)
    changes = _changes(sandbox, rng)
    builds: list[str] = []
    reasons: list[str] = []

    def full(con: duckdb.DuckDBPyConnection) -> None:
        run_models(con, user_paths=[models], identity=identity)

    def run(label: str) -> TransformResult:
        with duckdb.connect(sandbox.db) as con:
            # every share of touched customers by delta (the crossover is a cost, not a rule)
            result = run_models(
                con, skip_unchanged=True, incremental=True, user_paths=[models], crossover=1.0,
                identity=identity,
            )  # fmt: skip
        builds.append(result.build)
        reasons.append(result.build_reason)
        changes = result.outbox_changes
        if changes is not None and changes.tracks_table is not None:
            # the rows the emitter reads instead of the outbox: exactly the touched customers'
            with duckdb.connect(sandbox.db, read_only=True) as con:
                differ = con.execute(
                    f"""select count(*) from (
                        (select * from {changes.tracks_table} except all
                         select * from analytics.track_outbox
                         where customer_id in (select unnest($ids::varchar[])))
                        union all
                        (select * from analytics.track_outbox
                         where customer_id in (select unnest($ids::varchar[]))
                         except all select * from {changes.tracks_table}))""",
                    {"ids": list(changes.customer_ids)},
                ).fetchone()[0]
            assert differ == 0, f"after {label}: the changed track rows are not the outbox's"
        drifts = verify_against_full_build(sandbox.db, full)
        assert not drifts, f"after {label} ({result.build}): {[str(d) for d in drifts]}"
        stale = {t: d for t, d in _snapshot_drift(sandbox.db).items() if d != (0, 0)}
        assert not stale, f"after {label} ({result.build}), snapshot rows (extra, missing): {stale}"
        wrong = _stale_key_hashes(sandbox.db)
        assert not wrong, f"after {label} ({result.build}), rows whose key hash is stale: {wrong}"
        return result

    run_extract(sandbox.config())
    run("first sync")
    for step in range(7):
        picked = rng.sample(sorted(changes), 2)
        for name in picked:
            changes[name]()
        if step == 3:
            _webhook(sandbox, rng)
            picked.append("webhook")
        else:
            run_extract(sandbox.config(), deep=True)
        if step == 5:
            customer = rng.choice(list(sandbox.business.buyers))
            forget_customers(sandbox.config(), [customer])
            picked.append("forget")
        run(f"step {step}: {', '.join(picked)}")
    # A payment whose refund and ledger entries are not read again moves to another customer
    # (the payment alone re-read, as a webhook or the deep pass's window gives it): its ledger
    # entries' owners move one hop down the snapshot's references, its refund's ledger
    # entries' two hops.
    with duckdb.connect(sandbox.db) as con:
        moved = con.execute(
            """select p.payment_id, (select min(customer_id) from dodo_raw.customers
                                     where customer_id <> p.customer__customer_id)
            from dodo_raw.payments as p join dodo_raw.refunds as r using (payment_id)
            where p.payment_id in (select reference_object_id from dodo_raw.balance_ledger)
              and r.refund_id in (select reference_object_id from dodo_raw.balance_ledger)
            order by p.payment_id limit 1"""
        ).fetchone()
        assert moved, "no refunded payment with ledger entries to move"
        con.execute(
            "update dodo_raw.payments set customer__customer_id = ?, _synced_at = "
            "(select max(as_of) from dodo_raw.lookback_passes) + interval 1 second "
            "where payment_id = ?",
            [moved[1], moved[0]],
        )
    run("a refunded payment moves to another customer, its refund and ledger not re-read")
    # The payment a fallback USD rate comes from (its currency's latest ledger payment) leaves
    # the ledger: the rate is the one before it, which no rebuilt ledger object holds.
    with duckdb.connect(sandbox.db) as con:
        source = con.execute(
            """select rates.rate_object_id
            from analytics.int_currency_rates as rates
            join (select payment_currency, count(*) as payments
                  from analytics.int_ledger_by_object where payment_usd_cents is not null
                  group by payment_currency) as ledger on ledger.payment_currency = rates.currency
            where ledger.payments > 1
            order by ledger.payments desc, rates.currency limit 1"""
        ).fetchone()
        assert source, "no currency with two ledger payments"
        con.execute(
            "delete from dodo_raw.balance_ledger "
            "where reference_object_id = ? and lower(event_type) = 'payment'",
            [source[0]],
        )
    run("the payment a fallback rate comes from leaves the ledger")
    # A payment of a customer the warehouse does not have yet (a webhook ahead of the customers'
    # sync): a quarantine test over staging that the last build found clean finds its events.
    unknown_customer = "lifecycle_events_unknown_customer"
    with duckdb.connect(sandbox.db) as con:
        last = con.execute(
            "select failures from analytics.data_test_results where test_name = ?",
            [unknown_customer],
        ).fetchall()
        assert last == [(0,)], last
        _copy_raw_row(
            con, "payments", "status = 'succeeded'",
            "'pay_ahead_of_its_customer' as payment_id, "
            "'cus_not_synced_yet' as customer__customer_id", seconds=2,
        )  # fmt: skip
    result = run("a payment of a customer not synced yet")
    outcome = next(t for t in result.tests if t.name == unknown_customer)
    assert outcome.touched_only and outcome.quarantined > 0, outcome  # over the touched rows
    # the customer arrives: its events leave the quarantine (the test reads whole tables: the
    # last build found rows)
    with duckdb.connect(sandbox.db) as con:
        _copy_raw_row(con, "customers", "true", "'cus_not_synced_yet' as customer_id", seconds=3)
    result = run("the customer not synced yet arrives")
    outcome = next(t for t in result.tests if t.name == unknown_customer)
    assert not outcome.touched_only and outcome.quarantined == 0, outcome
    # the user's test of the track outbox found rows in the last build too: this one counted
    # them over the touched customers' rows, now and as the last build left them (over whole
    # tables when custom_events is a view)
    ours = next(t for t in result.tests if t.name == "big_payments_on_their_way")
    assert ours.touched_only is not events_view and ours.failures > 0, ours
    assert builds[0] == "full" and builds[-1] == "delta", str(
        list(zip(builds, reasons, strict=True))
    )


# --- transform --verify and the deep pass's verification, through the real CLI -----------------


def _tamper(db: str) -> str:
    """Make the warehouse drift from a full build: one customer's traits and one event."""
    with duckdb.connect(db) as con:
        customer = con.execute("select min(customer_id) from analytics.customer_traits").fetchone()[
            0
        ]
        con.execute(
            "update analytics.customer_traits set payments_count = payments_count + 1 "
            "where customer_id = ?",
            [customer],
        )
        con.execute(
            "delete from analytics.lifecycle_events "
            "where event_id = (select min(event_id) from analytics.lifecycle_events)"
        )
    return customer


@pytest.mark.slow
def test_transform_verify_passes_on_a_delta_built_warehouse_and_shows_drift(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    env = sandbox.env(TMPDIR=str(temp))
    assert run_cli("run", "--skip-emit", env=env).returncode == 0
    sandbox.business.add_payments(3)
    assert run_cli("run", "--skip-emit", env=env).returncode in (0, 3)
    verified = run_cli("transform", "--verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "every analytics table equals a full build" in verified.stdout
    customer = _tamper(sandbox.db)
    drifted = run_cli("transform", "--verify", env=env)
    assert drifted.returncode == 7, drifted.stdout + drifted.stderr
    assert "customer_traits: 1 row(s) not in a full build, 1 row(s) missing" in drifted.stdout
    assert f"customer_id={customer}" in drifted.stdout
    assert "lifecycle_events: 0 row(s) not in a full build, 1 row(s) missing" in drifted.stdout
    # A verification stopped midway (SIGKILL while it builds its copy) leaves the copy, with
    # the customers' data, only beside the warehouse; the next run removes it.
    scratch = Path(f"{sandbox.db}.verify")
    exe = str(Path(sys.executable).with_name("dodo-segment"))
    stopped = subprocess.Popen(
        [exe, "transform", "--verify"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not (scratch / "full.duckdb").exists() and stopped.poll() is None:
        assert time.monotonic() < deadline, "the verification never made its copy"
        time.sleep(0.002)
    stopped.kill()
    assert stopped.wait() == -signal.SIGKILL, stopped.stderr.read() if stopped.stderr else ""
    assert (scratch / "full.duckdb").exists() and stat.S_IMODE(scratch.stat().st_mode) == 0o700
    assert not list(temp.glob("*verify*")), "a copy of the warehouse in the temp folder"
    after = run_cli("run", "--skip-emit", env=env)
    assert after.returncode in (0, 3), after.stderr
    assert not scratch.exists()
    assert "removed the copy of the warehouse left by a verification" in after.stderr


@pytest.mark.slow
def test_the_deep_pass_finds_drift_alerts_once_repairs_and_recovers(sandbox: Sandbox) -> None:
    from tests.test_alerts import Receiver

    hook = Receiver()
    try:
        env = sandbox.env(DODO_SEGMENT_ALERT_WEBHOOK_URL=hook.url)
        assert run_cli("run", "--skip-emit", env=env).returncode == 0
        _tamper(sandbox.db)
        run = run_cli("run", "--skip-emit", "--deep", env=env)
        assert run.returncode in (0, 3), run.stderr
        assert "models drifted from a full build" in run.stderr
        assert hook.events() == [("model_drift", "firing")]
        status = run_cli("status", env=env)
        assert "DRIFTED" in status.stdout and "repaired by a full build" in status.stdout
        metrics = run_cli("status", "--format", "prometheus", env=env)
        assert "dodo_segment_models_drifted_tables 2.0" in metrics.stdout
        # the full build repaired it: the next deep pass finds none and says so once
        assert run_cli("transform", "--verify", env=env).returncode == 0
        again = run_cli("run", "--skip-emit", "--deep", env=env)
        assert again.returncode in (0, 3), again.stderr
        assert hook.events() == [("model_drift", "firing"), ("model_drift", "recovered")]
        status = run_cli("status", env=env)
        assert "(deep pass): equal to a full build" in status.stdout
        metrics = run_cli("status", "--format", "prometheus", env=env)
        assert "dodo_segment_models_drifted_tables 0.0" in metrics.stdout
    finally:
        hook.close()


def test_staging_rows_narrow_only_the_product_views_whose_raw_keys_exist(tmp_path: Path) -> None:
    """The payments' and the ledger's scopes read their raw rows by row id: the same rows and
    columns as through the view. A view from another SQL folder, or over a raw table without
    its key column (the source macro stands in NULL for it), is read through the view."""
    con = duckdb.connect()
    run_models(con)  # the raw tables, the macros and the views, on an empty warehouse
    con.execute(
        "insert into dodo_raw.payments (payment_id, customer__customer_id, total_amount, "
        "currency) values ('pay_1', 'cus_1', 1000, 'JPY'), ('pay_2', 'cus_2', 250, 'USD'), "
        "('pay_3', null, 99, 'KWD'), ('pay_4', 'cus_1', 5, 'USD')"
    )
    con.execute("set variable wanted = ['cus_1', 'cus_9']")
    models = runner.list_models(runner.SQL_DIR)
    staging = delta.staging_sqls(con, models, runner.SQL_DIR)
    assert set(staging) == {"stg_payments", "stg_balance_ledger"}

    def wanted(key: str) -> str:
        return f"list_contains(getvariable('wanted'), {key})"

    # a statement end before trailing comments is no end inside the subquery
    ended = {**staging, "stg_payments": staging["stg_payments"] + ";\n-- the end\n"}
    keys = touched.KeyList("getvariable('wanted')")
    ended_rows = touched.staging_rows(ended, "stg_payments", "customer_id", wanted, keys=keys)
    assert "rowid" in ended_rows
    assert len(con.execute(ended_rows).fetchall()) == 2
    narrowed = touched.staging_rows(staging, "stg_payments", "customer_id", wanted, keys=keys)
    plain = touched.staging_rows({}, "stg_payments", "customer_id", wanted, keys=keys)
    assert "rowid" in narrowed and "rowid" not in plain
    columns = [d[:2] for d in con.execute(narrowed).description]
    found = sorted(con.fetchall(), key=str)
    assert columns == [d[:2] for d in con.execute(plain).description]
    assert found == sorted(con.fetchall(), key=str)
    assert [(r[0], r[4]) for r in found] == [("pay_1", 1000), ("pay_4", 0.05)]

    copy = tmp_path / "sql"
    shutil.copytree(runner.SQL_DIR, copy)
    assert delta.staging_sqls(con, runner.list_models(copy), runner.SQL_DIR) == {}
    con.execute("alter table dodo_raw.payments drop column customer__customer_id")
    assert set(delta.staging_sqls(con, models, runner.SQL_DIR)) == {"stg_balance_ledger"}


def test_raw_key_hashes_find_the_same_rows_and_hide_none() -> None:
    """The payments' scope finds its raw rows by the keys' hashes (`touched.hash_raw_keys`): the
    same rows as by the ids. A row not hashed yet (as dlt and the webhook merge write it) is
    found; a row copied under another key carries the old key's hash until it is hashed again
    as written since the snapshot. The hashes are no content: the source macros, the snapshot's
    columns, the build fingerprint, the deep pass's comparison and `forget` leave them out."""
    con = duckdb.connect()
    run_models(con)  # the raw tables, their key hash columns, the macros and the views
    con.execute(
        "insert into dodo_raw.payments (payment_id, customer__customer_id, total_amount, "
        "currency, _synced_at) values ('pay_1', 'cus_1', 1000, 'JPY', '2026-01-01'), "
        "('pay_2', 'cus_2', 250, 'USD', '2026-01-01'), ('pay_3', null, 99, 'KWD', '2026-01-01')"
    )
    touched.hash_raw_keys(con, {})
    assert con.execute(
        "select count(*) from dodo_raw.payments where _payment_id_hash = hash(payment_id) "
        "and _customer__customer_id_hash = hash(customer__customer_id)"
    ).fetchone() == (3,)
    macro = [d[0] for d in con.execute("select * from analytics.source_payments()").description]
    assert "payment_id" in macro and not [c for c in macro if c.endswith("_hash")]
    assert not [c for c in touched.raw_columns(con)["payments"] if c.endswith("_hash")]
    assert not [c for c in lookback._content_columns(con, "payments") if c.endswith("_hash")]
    hashes = dodo_contract.key_hash_columns("payments")
    assert len(hashes) == 2 and not erasure._personal_columns("dodo_raw", "payments", hashes)
    fingerprint = runner.raw_table_hashes(con, ())
    con.execute(
        "update dodo_raw.payments set _payment_id_hash = null, _customer__customer_id_hash = 7"
    )
    assert runner.raw_table_hashes(con, ()) == fingerprint
    touched.hash_raw_keys(con, {})  # every row checked
    assert con.execute(
        "select count(*) from dodo_raw.payments where _payment_id_hash = hash(payment_id) "
        "and _customer__customer_id_hash = hash(customer__customer_id)"
    ).fetchone() == (3,)

    con.execute("set variable wanted = ['cus_1', 'cus_9']")
    con.execute("set variable null_too = false")
    staging = delta.staging_sqls(con, runner.list_models(runner.SQL_DIR), runner.SQL_DIR)

    def found() -> list[str]:
        sql = touched.staging_rows(
            staging, "stg_payments", "customer_id",
            lambda key: f"(list_contains(getvariable('wanted'), {key}) "
            f"or ({key} is null and getvariable('null_too')))",
            keys=touched.KeyList("getvariable('wanted')", "getvariable('null_too')"),
        )  # fmt: skip
        assert '"_customer__customer_id_hash" in (select hash(' in sql
        return sorted(r[0] for r in con.execute(sql).fetchall())

    assert found() == ["pay_1"]
    con.execute(  # as dlt writes it: no hash
        "insert into dodo_raw.payments (payment_id, customer__customer_id, total_amount, "
        "currency, _synced_at) values ('pay_4', 'cus_1', 5, 'USD', '2026-01-02')"
    )
    assert found() == ["pay_1", "pay_4"]
    con.execute(  # a copy under another key, with the old key's hash
        "insert into dodo_raw.payments by name select * replace ('pay_5' as payment_id, "
        "'cus_9' as customer__customer_id, timestamp '2026-01-03' as _synced_at) "
        "from dodo_raw.payments where payment_id = 'pay_2'"
    )
    assert found() == ["pay_1", "pay_4"]  # what a stale hash would hide
    touched.hash_raw_keys(con, {"payments": ("_synced_at", "2026-01-01", ">")})
    assert found() == ["pay_1", "pay_4", "pay_5"]
    con.execute("set variable null_too = true")  # NULL touched: the orphan is found too
    assert found() == ["pay_1", "pay_3", "pay_4", "pay_5"]
