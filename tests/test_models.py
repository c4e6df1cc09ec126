"""SQL models on the hand-worked fixture warehouse: every value checked against hand arithmetic."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from pipelines import warehouse
from pipelines.transform import ModelError, TransformResult, list_models, run_models
from tests.fixtures.hand_worked import (
    EXPECTED,
    EXPECTED_1_123,
    build_api_1_123_warehouse,
    build_hand_worked_warehouse,
)

pytestmark = pytest.mark.xdist_group("test_models")  # one worker builds the module-scoped setup

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[duckdb.DuckDBPyConnection, TransformResult]:
    path = tmp_path_factory.mktemp("hand") / "warehouse.duckdb"
    build_hand_worked_warehouse(path)
    con = duckdb.connect(str(path))
    result = run_models(con)
    yield con, result
    con.close()


@pytest.fixture
def fresh(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    path = tmp_path / "warehouse.duckdb"
    build_hand_worked_warehouse(path)
    con = duckdb.connect(str(path))
    yield con
    con.close()


def _event_ids(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], str]:
    rows = con.execute("select fact_kind, object_id, event_id from analytics.lifecycle_events")
    return {(kind, obj): event_id for kind, obj, event_id in rows.fetchall()}


def _props(con: duckdb.DuckDBPyConnection, event: str, object_id: str) -> dict:
    row = con.execute(
        "select properties from analytics.lifecycle_events where event = ? and object_id = ?",
        [event, object_id],
    ).fetchone()
    assert row is not None, (event, object_id)
    return json.loads(row[0])


# --- lifecycle events -------------------------------------------------------------------------


def test_event_counts_per_type(built) -> None:
    con, result = built
    counts = dict(
        con.execute("select event, count(*) from analytics.lifecycle_events group by 1").fetchall()
    )
    assert counts == EXPECTED["event_counts"]
    assert sum(counts.values()) == EXPECTED["events_total"] == 49
    assert not result.emission_blocked


def test_amounts_in_major_units_per_currency_exponent(built) -> None:
    con, _ = built
    # 1500 JPY minor = 1500 JPY (exponent 0); 12345 KWD fils = 12.345 (exponent 3)
    assert _props(con, "Payment Completed", "pay_jpy1")["amount"] == 1500
    kwd = _props(con, "Payment Completed", "pay_kwd1")
    assert kwd["amount"] == 12.345 and kwd["revenue"] == 12.345 and kwd["currency"] == "KWD"
    assert _props(con, "Payment Completed", "pay_m_usd")["amount"] == 120.5  # 12050 cents
    # the raw JSON text has numbers, never strings
    raw = con.execute(
        "select properties::varchar from analytics.lifecycle_events where object_id = 'pay_kwd1' "
        "and event = 'Payment Completed'"
    ).fetchone()[0]
    assert '"amount":12.345' in raw


def test_partial_refund(built) -> None:
    con, _ = built
    props = _props(con, "Payment Refunded", "ref_kwd1")
    # 2345 fils = 2.345 KWD, owned by the refunded payment's customer
    assert props == {
        "refund_id": "ref_kwd1",
        "payment_id": "pay_kwd1",
        "amount": 2.345,
        "currency": "KWD",
        "reason": "damaged",
        "is_partial": True,
    }
    owner = con.execute(
        "select customer_id from analytics.lifecycle_events where object_id = 'ref_kwd1'"
    ).fetchone()[0]
    assert owner == "cus_kwd"


def test_subscription_renewed_three_times_and_started_once(built) -> None:
    con, _ = built
    renewed = dict(
        con.execute(
            "select properties ->> 'subscription_id', count(*) from analytics.lifecycle_events "
            "where event = 'Subscription Renewed' group by 1"
        ).fetchall()
    )
    assert renewed == EXPECTED["renewed_by_subscription"]
    payments = [
        r[0]
        for r in con.execute(
            "select object_id from analytics.lifecycle_events where event = 'Subscription "
            "Renewed' and properties ->> 'subscription_id' = 'sub_renew' order by occurred_at"
        ).fetchall()
    ]
    assert payments == ["pay_r2", "pay_r3", "pay_r4"]  # pay_r1 is the first payment
    started = con.execute(
        "select count(*) from analytics.lifecycle_events "
        "where event = 'Subscription Started' and object_id = 'sub_renew'"
    ).fetchone()[0]
    assert started == 1


def test_trial_started_and_ended_converted(built) -> None:
    con, _ = built
    started = _props(con, "Trial Started", "sub_trial")
    # 2024-04-01 + 14 days = 2024-04-15
    assert started["trial_start_date"] == "2024-04-01T00:00:00.000Z"
    assert started["trial_end_date"] == "2024-04-15T00:00:00.000Z"
    assert started["trial_plan_name"] == "Pro"
    ended = _props(con, "Trial Ended", "sub_trial")
    assert ended["converted"] is True  # pay_t1 at 2024-04-15 00:00


def test_cancellation_at_period_end(built) -> None:
    con, _ = built
    rows = con.execute(
        "select event, occurred_at from analytics.lifecycle_events "
        "where object_id = 'sub_cancel' and event like 'Subscription Cancel%' order by occurred_at"
    ).fetchall()
    assert [(e, ts.isoformat()) for e, ts in rows] == [
        ("Subscription Cancellation Scheduled", "2024-06-01T00:00:00+00:00"),  # seen at S2
        ("Subscription Cancelled", "2024-06-01T12:00:00+00:00"),  # cancelled_at
    ]
    assert _props(con, "Subscription Cancelled", "sub_cancel")["cancel_at_next_billing"] is True


def test_plan_change_and_hold_then_resume_across_syncs(built) -> None:
    con, _ = built
    assert _props(con, "Subscription Plan Changed", "sub_plan") == {
        "subscription_id": "sub_plan",
        "previous_status": "active",
        "status": "active",
        "previous_product_id": "pdt_basic",
        "product_id": "pdt_pro",
        "previous_quantity": 1,
        "quantity": 2,
    }
    hold = con.execute(
        "select event, occurred_at, properties ->> 'previous_status' "
        "from analytics.lifecycle_events where object_id = 'sub_hold' "
        "and event in ('Subscription On Hold', 'Subscription Resumed') order by occurred_at"
    ).fetchall()
    assert [(e, ts.date(), prev) for e, ts, prev in hold] == [
        ("Subscription On Hold", date(2024, 6, 1), "active"),
        ("Subscription Resumed", date(2024, 6, 30), "on_hold"),
    ]


def test_dispute_opened_then_won_between_syncs(built) -> None:
    con, _ = built
    assert _props(con, "Dispute Opened", "dp_1")["amount"] == 1500  # "1500" JPY string
    won = _props(con, "Dispute Won", "dp_1")
    assert won["previous_status"] == "dispute_opened" and won["status"] == "dispute_won"


def test_unknown_customer_is_listed_and_quarantined(built) -> None:
    con, result = built
    assert result.quarantined == {"lifecycle_events_unknown_customer": 1}
    test = next(t for t in result.tests if t.name == "lifecycle_events_unknown_customer")
    assert test.failures == 1 and test.sample[0]["object_id"] == "pay_ghost"
    quarantined = con.execute(
        "select test_name, key_kind, key from analytics.quarantined_rows"
    ).fetchall()
    ghost_id = con.execute(
        "select event_id from analytics.lifecycle_events where object_id = 'pay_ghost'"
    ).fetchone()[0]
    assert quarantined == [("lifecycle_events_unknown_customer", "event_id", ghost_id)]
    outbox = con.execute("select count(*) from analytics.track_outbox").fetchone()[0]
    assert outbox == EXPECTED["track_outbox_rows"] == 48
    assert not con.execute(
        "select 1 from analytics.track_outbox where event_id = ?", [ghost_id]
    ).fetchall()


def test_track_outbox_ready_to_send(built) -> None:
    con, _ = built
    rows = con.execute("select event_id, user_id, properties from analytics.track_outbox")
    for event_id, user_id, properties in rows.fetchall():
        assert len(event_id) <= 100 and user_id
        assert None not in json.loads(properties).values()


# --- customer traits and identify outbox ------------------------------------------------------


def test_customer_traits(built) -> None:
    con, _ = built
    cursor = con.execute("select * from analytics.customer_traits")
    columns = [d[0] for d in cursor.description]
    traits = {row[0]: dict(zip(columns, row, strict=True)) for row in cursor.fetchall()}
    assert len(traits) == 10
    for customer_id, expected in EXPECTED["traits"].items():
        actual = traits[customer_id]
        for key, value in expected.items():
            got = actual[key]
            if key == "total_spent_by_currency":
                got = json.loads(got)
            elif key in ("customer_since", "last_payment_date") and got is not None:
                got = got.strftime("%Y-%m-%dT%H:%M:%S.000Z")
            assert got == value, (customer_id, key)


def test_identify_outbox_traits(built) -> None:
    con, _ = built
    rows = {
        user_id: (json.loads(traits), traits_hash)
        for user_id, traits, traits_hash in con.execute(
            "select user_id, traits, traits_hash from analytics.identify_outbox"
        ).fetchall()
    }
    # default [identity]: userId = customer_id, and the id is a trait too
    assert all(traits["dodo_customer_id"] == user_id for user_id, (traits, _) in rows.items())
    nopay, _ = rows["cus_nopay"]
    assert "customer_since" not in nopay and "currency" not in nopay  # nulls omitted
    assert nopay["createdAt"] == "2024-03-01T00:00:00.000Z"
    multi, multi_hash = rows["cus_multi"]
    assert multi["total_spent"] == 140.5 and multi["currency"] == "USD"
    assert multi["total_spent_by_currency"] == {"JPY": 3000, "USD": 120.5}
    assert len(multi_hash) == 32
    jpy, _ = rows["cus_jpy"]
    assert jpy["phone"] == "+81 3 0000 0000" and "total_spent_usd" not in jpy


# --- revenue metrics --------------------------------------------------------------------------


def test_revenue_daily(built) -> None:
    con, _ = built
    rows = {
        (str(d), cur): (gross, refunds, net, payments, gross_usd)
        for d, cur, gross, refunds, net, payments, gross_usd in con.execute(
            "select date, currency, gross, refunds, net, payments, gross_usd "
            "from analytics.revenue_daily"
        ).fetchall()
    }
    for key, expected in EXPECTED["revenue_daily"].items():
        assert rows[key] == expected, key


def test_mrr_monthly_movements(built) -> None:
    con, _ = built
    rows = {
        (customer, str(month)): (mrr, previous, movement)
        for month, customer, mrr, previous, movement in con.execute(
            "select month, customer_id, mrr_usd, previous_mrr_usd, movement "
            "from analytics.mrr_monthly"
        ).fetchall()
    }
    for key, expected in EXPECTED["mrr_monthly"].items():
        assert rows[key] == expected, key
    per_customer = dict(
        con.execute("select customer_id, count(*) from analytics.mrr_monthly group by 1").fetchall()
    )
    for customer, count in EXPECTED["mrr_monthly_rows"].items():
        assert per_customer[customer] == count, customer
    june = con.execute(
        "select round(sum(mrr_usd), 2) from analytics.mrr_monthly where month = '2024-06-01'"
    ).fetchone()[0]
    assert june == EXPECTED["mrr_total_2024_06"]  # 20 + 100 + 30.33 + 10 + 20


# --- stability of event ids -------------------------------------------------------------------


def test_rebuild_gives_byte_identical_event_ids(fresh) -> None:
    run_models(fresh)
    first = fresh.execute("select event_id from analytics.lifecycle_events order by 1").fetchall()
    run_models(fresh)
    second = fresh.execute("select event_id from analytics.lifecycle_events order by 1").fetchall()
    assert first == second and len(first) == 49


def test_mutable_fields_do_not_change_event_ids(fresh) -> None:
    run_models(fresh)
    before = _event_ids(fresh)
    fresh.execute(
        "update dodo_raw.customers set email = 'new@example.jp' where customer_id = 'cus_jpy'"
    )
    fresh.execute(
        "update dodo_raw.payments set customer__email = 'new@example.jp' where customer__customer_id = 'cus_jpy'"
    )
    fresh.execute(
        "update dodo_raw.payments set refund_status = 'partial' where payment_id = 'pay_kwd1'"
    )
    run_models(fresh)
    after = _event_ids(fresh)
    assert after == before
    email = fresh.execute(
        "select traits ->> 'email' from analytics.identify_outbox where user_id = 'cus_jpy'"
    ).fetchone()[0]
    assert email == "new@example.jp"


def test_catalog_switch_keeps_event_ids(fresh) -> None:
    run_models(fresh, event_catalog="default")
    default_ids = _event_ids(fresh)
    run_models(fresh, event_catalog="ecommerce")
    assert _event_ids(fresh) == default_ids
    order = _props(fresh, "Order Completed", "pay_r1")
    assert order == {
        "order_id": "pay_r1",
        "total": 10.0,
        "revenue": 10.0,
        "currency": "USD",
        "products": [{"product_id": "pdt_basic", "quantity": 1}],
    }
    assert "products" not in _props(fresh, "Order Completed", "pay_jpy1")  # no subscription
    refund = _props(fresh, "Order Refunded", "ref_kwd1")
    assert refund == {"order_id": "pay_kwd1", "total": 2.345, "currency": "KWD"}
    names = {r[0] for r in fresh.execute("select event from analytics.track_outbox").fetchall()}
    assert "Payment Completed" not in names and "Order Completed" in names


# --- runner -----------------------------------------------------------------------------------


def test_models_are_ordered_by_their_references() -> None:
    order = [m.name for m in list_models(SQL_DIR)]
    position = {name: i for i, name in enumerate(order)}
    for model in list_models(SQL_DIR):
        for dependency in model.depends_on:
            assert position[dependency] < position[model.name]
    assert position["lifecycle_events"] < position["track_outbox"]
    assert position["customer_traits"] < position["identify_outbox"]


def test_empty_warehouse_builds(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "empty.duckdb"))
    result = run_models(con)
    assert not result.emission_blocked
    assert con.execute("select count(*) from analytics.track_outbox").fetchone()[0] == 0


def test_broken_model_raises_model_error_naming_the_file(fresh, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    broken = sql_dir / "marts" / "revenue_daily.sql"
    broken.write_text(broken.read_text().replace("select\n    date,", "selec\n    date,", 1))
    with pytest.raises(ModelError) as excinfo:
        run_models(fresh, sql_dir=sql_dir)
    assert excinfo.value.path == broken
    assert "revenue_daily.sql" in str(excinfo.value) and "syntax" in str(excinfo.value).lower()


def test_failing_error_test_blocks_emission(fresh, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    tests_file = sql_dir / "marts" / "customer_traits.tests.sql"
    tests_file.write_text(
        tests_file.read_text()
        + "\n-- test: customer_traits_always_fails\n-- severity: error\n"
        + "select customer_id from analytics.customer_traits where customer_id = 'cus_jpy'\n"
    )
    result = run_models(fresh, sql_dir=sql_dir)
    assert result.emission_blocked
    assert [e.name for e in result.errors] == ["customer_traits_always_fails"]
    status = fresh.execute(
        "select status from analytics.data_test_results where test_name = ?",
        ["customer_traits_always_fails"],
    ).fetchone()[0]
    assert status == "fail"


# --- keeping an unchanged build ---------------------------------------------------------------

MODEL_OUTPUTS = (
    "int_as_of", "lifecycle_events", "customer_traits", "revenue_daily", "mrr_monthly",
    "identify_outbox", "track_outbox", "quarantined_rows",
)  # fmt: skip


def _outputs(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    outputs = {}
    for name in MODEL_OUTPUTS:
        columns = "test_name, key_kind, key" if name == "quarantined_rows" else "*"
        outputs[name] = con.execute(
            f"select {columns} from analytics.{name} order by all"
        ).fetchall()
    return outputs


def _observed_again_at(con: duckdb.DuckDBPyConnection, at: datetime) -> None:
    """A re-read that found every payment unchanged: only `_synced_at` (so as_of) moves."""
    con.execute("update dodo_raw.payments set _synced_at = ?", [at])


def _july_mrr(con: duckdb.DuckDBPyConnection) -> float | None:
    return con.execute(
        "select round(sum(mrr_usd), 2) from analytics.mrr_monthly where month = '2024-07-01'"
    ).fetchone()[0]


def test_unchanged_build_is_kept_until_time_changes_a_result(fresh) -> None:
    first = run_models(fresh, skip_unchanged=True)
    assert not first.skipped and first.quarantined == {"lifecycle_events_unknown_customer": 1}
    valid_until = fresh.execute("select valid_until from analytics.int_results_valid_until")
    # as_of is 2024-06-30; July begins before the first paid period ends (July 2, 12:00)
    assert valid_until.fetchone()[0] == datetime(2024, 7, 1, tzinfo=UTC)

    just_before = datetime(2024, 6, 30, 23, 59, 59, tzinfo=UTC)
    _observed_again_at(fresh, just_before)
    kept = run_models(fresh, skip_unchanged=True)
    assert kept.skipped and not kept.models and kept.quarantined == first.quarantined
    assert fresh.execute("select as_of from analytics.int_as_of").fetchone()[0] == just_before
    outputs = _outputs(fresh)
    run_models(fresh)  # a full rebuild from the same raw data gives the same tables
    assert _outputs(fresh) == outputs

    _observed_again_at(fresh, datetime(2024, 7, 1, tzinfo=UTC))  # a month began
    due = run_models(fresh, skip_unchanged=True)
    assert not due.skipped and _july_mrr(fresh) == EXPECTED["mrr_total_2024_06"]
    valid_until = fresh.execute("select valid_until from analytics.int_results_valid_until")
    period_end = valid_until.fetchone()[0]
    assert period_end == datetime(2024, 7, 2, 12, tzinfo=UTC)  # the first paid period ends

    _observed_again_at(fresh, period_end)  # still covered at its last instant
    assert not run_models(fresh, skip_unchanged=True).skipped  # as_of reached valid_until
    _observed_again_at(fresh, period_end + timedelta(hours=1))
    assert not run_models(fresh, skip_unchanged=True).skipped
    assert _july_mrr(fresh) < EXPECTED["mrr_total_2024_06"]  # that period no longer counts


def test_unchanged_build_is_rebuilt_for_new_data_sql_or_catalog(fresh, tmp_path: Path) -> None:
    assert not run_models(fresh, skip_unchanged=True).skipped
    assert run_models(fresh, skip_unchanged=True).skipped
    fresh.execute("update dodo_raw.payments set total_amount = 999 where payment_id = 'pay_r1'")
    assert not run_models(fresh, skip_unchanged=True).skipped  # a changed raw value
    assert run_models(fresh, skip_unchanged=True).skipped
    assert not run_models(fresh, event_catalog="ecommerce", skip_unchanged=True).skipped
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    model = sql_dir / "marts" / "revenue_daily.sql"
    model.write_text(model.read_text() + "\n-- a changed definition\n")
    changed = run_models(fresh, event_catalog="ecommerce", sql_dir=sql_dir, skip_unchanged=True)
    assert not changed.skipped


def test_models_build_the_same_tables_under_the_job_memory_limit(fresh, tmp_path: Path) -> None:
    run_models(fresh)
    unlimited = fresh.execute("select * from analytics.track_outbox order by event_id").fetchall()
    path = tmp_path / "limited.duckdb"
    build_hand_worked_warehouse(path)
    with warehouse.connect(str(path), memory_limit="64MB") as con:
        limit = con.execute("select current_setting('memory_limit')").fetchone()[0]
        assert limit == "61.0 MiB"  # DuckDB's own rendering of 64 MB
        run_models(con)
        limited = con.execute("select * from analytics.track_outbox order by event_id").fetchall()
    assert limited == unlimited and len(limited) == EXPECTED["track_outbox_rows"]


def test_a_delta_build_runs_under_its_own_memory_limit_and_restores_the_configured_one(
    fresh,
) -> None:
    fresh.execute("set memory_limit = '1GB'")
    restored = ("953.6 MiB", "953.5 MiB")  # restored as DuckDB renders it, to 0.1 MiB
    assert run_models(fresh, incremental=True, delta_memory_limit="64MB").build == "full"
    assert fresh.execute("select current_setting('memory_limit')").fetchone()[0] in restored
    fresh.execute(
        "update dodo_raw.payments set total_amount = 999, "
        "_synced_at = _synced_at + interval 1 hour where payment_id = 'pay_r1'"
    )
    seen: set[str] = set()
    observer = fresh.cursor()  # the limit is the database's, whichever connection reads it

    def limit(*_: object) -> None:
        seen.add(observer.execute("select current_setting('memory_limit')").fetchone()[0])

    result = run_models(
        fresh, incremental=True, crossover=1.0, delta_memory_limit="64MB", on_model=limit
    )
    assert result.build == "delta" and seen == {"61.0 MiB"}
    assert fresh.execute("select current_setting('memory_limit')").fetchone()[0] in restored


def test_a_delta_build_out_of_its_memory_is_built_again_under_the_configured_limit(
    tmp_path: Path,
) -> None:
    from pipelines.transform.verify import verify_against_full_build

    path = tmp_path / "warehouse.duckdb"
    build_hand_worked_warehouse(path)
    with duckdb.connect(str(path)) as con:
        assert run_models(con, incremental=True).build == "full"
        con.execute(
            "update dodo_raw.payments set total_amount = 999, "
            "_synced_at = _synced_at + interval 1 hour where payment_id = 'pay_r1'"
        )
    with duckdb.connect(str(path)) as con:
        con.execute("set memory_limit = '1GB'")
        # 4MB is too little for a delta build: rolled back, then built again under the 1GB
        result = run_models(con, incremental=True, crossover=1.0, delta_memory_limit="4MB")
        assert result.build == "delta", result.build_reason
        assert "out of memory under 4MB" in result.build_reason
        assert con.execute("select current_setting('memory_limit')").fetchone()[0] in (
            "953.6 MiB", "953.5 MiB",
        )  # fmt: skip
    assert verify_against_full_build(path, lambda con: run_models(con)) == []


def test_a_delta_build_tests_staging_over_the_touched_rows_while_they_found_nothing(
    fresh,
) -> None:
    assert run_models(fresh, incremental=True).build == "full"
    changed = "_synced_at = _synced_at + interval 1 hour"
    fresh.execute(f"update dodo_raw.payments set total_amount = -5, {changed} where payment_id = 'pay_r1'")  # fmt: skip
    first = run_models(fresh, incremental=True, crossover=1.0)
    assert first.build == "delta"
    tests = {t.name: t for t in first.tests}
    negative = tests["stg_payments_amount_non_negative"]
    assert negative.touched_only and negative.failures == 1
    assert [row["payment_id"] for row in negative.sample] == ["pay_r1"]
    assert tests["stg_payments_payment_id_unique"].touched_only
    # it found a row: the next delta build reads the whole table for it (pay_r1 is untouched)
    fresh.execute(f"update dodo_raw.payments set total_amount = 1000, {changed} where payment_id = 'pay_r2'")  # fmt: skip
    second = run_models(fresh, incremental=True, crossover=1.0)
    assert second.build == "delta"
    negative = next(t for t in second.tests if t.name == "stg_payments_amount_non_negative")
    assert not negative.touched_only and negative.failures == 1
    full = run_models(fresh)
    assert {t.name: t.failures for t in second.tests} == {t.name: t.failures for t in full.tests}


def test_a_users_staging_test_reads_whole_tables_in_a_delta_build(fresh, tmp_path: Path) -> None:
    # a user's test may compare customers (one email each): touched rows alone cannot tell
    models = tmp_path / "models"
    models.mkdir()
    (models / "stg_customers.tests.sql").write_text(
        "-- test: customer_email_unique\n-- severity: warn\n"
        "select email, count(*) as rows from analytics.stg_customers group by email "
        "having count(*) > 1\n"
    )
    assert run_models(fresh, incremental=True, user_paths=[models]).build == "full"
    fresh.execute(
        "update dodo_raw.customers set email = 'rita@example.com', "
        "_synced_at = _synced_at + interval 1 hour where customer_id = 'cus_trial'"
    )
    result = run_models(fresh, incremental=True, crossover=1.0, user_paths=[models])
    assert result.build == "delta"
    emails = next(t for t in result.tests if t.name == "customer_email_unique")
    assert emails.failures == 1 and not emails.touched_only  # cus_renew has it too, untouched


def test_a_raw_row_without_an_id_is_tested_over_whole_tables_in_a_delta_build(fresh) -> None:
    assert run_models(fresh, incremental=True).build == "full"
    fresh.execute(
        "insert into dodo_raw.customers select * replace (null as customer_id, "
        "_synced_at + interval 1 hour as _synced_at) from dodo_raw.customers "
        "where customer_id = 'cus_trial'"
    )  # nobody owns it: touching its owner touches no one
    result = run_models(fresh, incremental=True, crossover=1.0)
    unique = next(t for t in result.tests if t.name == "stg_customers_customer_id_unique")
    assert (result.build, unique.failures, unique.touched_only) == ("delta", 1, False)


# --- Dodo API 1.123 (issue 13): the second hand-worked warehouse --------------------------------


@pytest.fixture(scope="module")
def built_1_123(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    path = tmp_path_factory.mktemp("hand_1_123") / "warehouse.duckdb"
    build_api_1_123_warehouse(path)
    con = duckdb.connect(str(path))
    result = run_models(con)
    assert not result.emission_blocked, [str(e) for e in result.errors]
    yield con
    con.close()


def test_api_1_123_event_counts(built_1_123) -> None:
    counts = dict(
        built_1_123.execute(
            "select event, count(*) from analytics.lifecycle_events group by 1"
        ).fetchall()
    )
    assert counts == EXPECTED_1_123["event_counts"]


def test_renewals_follow_charge_type_and_service_periods(built_1_123) -> None:
    con = built_1_123
    rows = con.execute(
        "select object_id, properties ->> 'subscription_id', event_id from analytics.lifecycle_events "
        "where event = 'Subscription Renewed'"
    ).fetchall()
    found = {(payment, sub): event_id for payment, sub, event_id in rows}
    expected = EXPECTED_1_123["renewed"]
    assert set(found) == set(expected)
    for key, fact_key in expected.items():
        # a payment naming one subscription keeps the event_id of earlier releases
        assert found[key] == hashlib.md5(f"subscription_renewed:{fact_key}".encode()).hexdigest()
    multi = json.loads(
        con.execute(
            "select properties from analytics.lifecycle_events where event = 'Subscription "
            "Renewed' and object_id = 'pay_mc2' and properties ->> 'subscription_id' = 'sub_mc_b'"
        ).fetchone()[0]
    )
    # the whole payment's amount (the API gives no per-subscription amount), its service period
    assert multi == {
        "subscription_id": "sub_mc_b",
        "payment_id": "pay_mc2",
        "amount": 30.0,
        "currency": "USD",
        "period_start": "2024-05-01T00:00:00.000Z",
        "period_end": "2024-06-01T00:00:00.000Z",
    }
    old = _props(con, "Subscription Renewed", "pay_old2")
    assert "period_start" not in old and old["amount"] == 9.0  # no service period on old rows


def test_payment_recovered_and_dunning_properties(built_1_123) -> None:
    con = built_1_123
    assert _props(con, "Payment Recovered", "pay_dun4") == {
        "payment_id": "pay_dun4",
        "subscription_id": "sub_dun",
        "amount": 15.0,
        "currency": "USD",
        "retry_attempt": 2,
    }
    failed = _props(con, "Payment Failed", "pay_dun3")
    assert failed["charge_type"] == "renewal" and failed["retry_attempt"] == 1
    completed = _props(con, "Payment Completed", "pay_up2")
    assert completed["charge_type"] == "plan_change" and completed["retry_attempt"] == 0
    legacy = _props(con, "Payment Completed", "pay_old1")
    assert "charge_type" not in legacy and "retry_attempt" not in legacy  # omitted when NULL
    multi = _props(con, "Payment Completed", "pay_mc1")
    assert "subscription_id" not in multi and multi["charge_type"] == "new"
    # a zero-amount payment (a trial's card saved): completed at 0, renews nothing
    zero = _props(con, "Payment Completed", "pay_fr1")
    assert zero["amount"] == 0 and zero["charge_type"] == "new"


def test_past_due_transitions_and_cancelled_by(built_1_123) -> None:
    con = built_1_123
    rows = con.execute(
        "select object_id, event, occurred_at, properties ->> 'previous_status' "
        "from analytics.lifecycle_events where event in ('Subscription Past Due', "
        "'Subscription Resumed', 'Subscription On Hold') order by object_id, occurred_at"
    ).fetchall()
    assert [(r[0], r[1], r[2].date().isoformat(), r[3]) for r in rows] == [
        ("sub_dun", "Subscription Past Due", "2024-05-23", "active"),
        ("sub_dun", "Subscription Resumed", "2024-06-01", "past_due"),
        ("sub_gr", "Subscription Past Due", "2024-06-30", "active"),
        ("sub_la", "Subscription Past Due", "2024-06-06", "active"),
        ("sub_la", "Subscription On Hold", "2024-06-13", "past_due"),
    ]
    assert _props(con, "Subscription Cancelled", "sub_me")["cancelled_by"] == "merchant_user"
    assert _props(con, "Subscription Cancelled", "sub_mc_b")["cancelled_by"] == "customer"
    assert "cancelled_by" not in _props(con, "Subscription Cancelled", "sub_old")  # system


def test_payment_subscription_bridge(built_1_123) -> None:
    con = built_1_123
    rows = con.execute(
        "select payment_id, subscription_id, subscription_position, charge_type, "
        "cast(proration_factor as varchar), has_service_period "
        "from analytics.stg_payment_subscriptions "
        "where payment_id in ('pay_mc1', 'pay_up2', 'pay_me3', 'pay_old1') order by 1, 3"
    ).fetchall()
    assert rows == [
        ("pay_mc1", "sub_mc_a", 1, "new", "1.000000", True),
        ("pay_mc1", "sub_mc_b", 2, "new", "1.000000", True),
        ("pay_me3", "sub_me", 1, "renewal", None, False),  # usage only
        ("pay_old1", "sub_old", 1, None, None, False),  # subscription_id fallback
        ("pay_up2", "sub_up", 1, "plan_change", "0.290323", True),
    ]


def test_api_1_123_traits(built_1_123) -> None:
    con = built_1_123
    for customer, expected in EXPECTED_1_123["traits"].items():
        row = con.execute(
            "select traits from analytics.identify_outbox where user_id = ?", [customer]
        ).fetchone()
        traits = json.loads(row[0])
        for name, value in expected.items():
            assert traits[name] == value, (customer, name, traits.get(name))


def test_mrr_monthly_from_service_periods_and_plan_amounts(built_1_123) -> None:
    rows = built_1_123.execute(
        "select customer_id, cast(month as varchar), mrr_usd, previous_mrr_usd, movement "
        "from analytics.mrr_monthly"
    ).fetchall()
    found = {(c, m): (mrr, prev, movement) for c, m, mrr, prev, movement in rows}
    for key, expected in EXPECTED_1_123["mrr_monthly"].items():
        assert found[key] == expected, key
