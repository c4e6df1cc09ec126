"""dodo-segment forget through the real CLI on a sandbox warehouse: erasure here and in Segment."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests

from pipelines.emit import RegulationError, file_suppress_with_delete
from tests.conftest import Sandbox, make_sandbox, run_cli

pytestmark = pytest.mark.xdist_group("test_forget")  # one worker builds the module-scoped setup

PUBLIC_API_TOKEN = "test_public_api_token_4e9a0c"


@dataclass
class Person:
    """The personal values of one customer, as the warehouse held them before the forget."""

    customer_id: str
    email: str
    name: str
    phone: str

    @property
    def values(self) -> tuple[str, str, str]:
        return (self.email, self.name, self.phone)


@dataclass
class Forgotten:
    """A sandbox warehouse where one customer was forgotten by id, and what was seen around it."""

    sandbox: Sandbox
    person: Person
    dry_run: Any
    forget: Any
    syncs: list[Any]
    before_file_sha: str
    after_dry_run_sha: str
    before_outboxes: dict[str, Any]
    after_outboxes: dict[str, Any]
    regulations: list[dict[str, Any]]
    right_after: dict[str, Any]
    """Where each personal value could be read right after the forget (before any sync)."""
    sent_after_forget: list[dict[str, Any]] = field(default_factory=list)
    planted: Path | None = None


def _query(db: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with duckdb.connect(db, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def _tables_holding(db: str, value: str) -> list[str]:
    """schema.table.column of every cell (any type, as text) that contains the value."""
    found = []
    with duckdb.connect(db, read_only=True) as con:
        columns = con.execute(
            "select schema_name, table_name, column_name from duckdb_columns() "
            "where database_name = current_database() and not internal "
            "and table_oid in (select table_oid from duckdb_tables())"
        ).fetchall()
        for schema, table, column in columns:
            hit = con.execute(
                f'select count(*) from "{schema}"."{table}" '
                f'where contains(cast("{column}" as varchar), ?)',
                [value],
            ).fetchone()
            if hit and hit[0]:
                found.append(f"{schema}.{table}.{column}")
    return found


def _outboxes(db: str, skip: str) -> dict[str, Any]:
    identify = _query(
        db,
        "select user_id, traits::varchar from analytics.identify_outbox where user_id <> ? "
        "order by 1",
        [skip],
    )
    track = _query(
        db,
        "select event_id, user_id, event, properties::varchar from analytics.track_outbox "
        "where user_id <> ? order by 1",
        [skip],
    )
    return {"identify": identify, "track": track}


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pick_person(db: str) -> Person:
    """A customer with an active subscription, a phone and a name nobody else has."""
    rows = _query(
        db,
        "select c.customer_id, c.email, c.name, c.phone_number from dodo_raw.customers c "
        "where c.phone_number is not null and c.email is not null "
        "and c.customer_id in (select customer__customer_id from dodo_raw.subscriptions "
        "  where status = 'active') "
        "and (select count(*) from dodo_raw.customers o where o.name = c.name) = 1 "
        "and c.customer_id in (select customer_id from analytics.track_outbox) "
        "order by c.customer_id limit 1",
    )
    assert rows, "the sandbox business has no suitable customer"
    return Person(*rows[0])


def _other_files(sandbox: Sandbox) -> list[Path]:
    folder = Path(sandbox.db).parent
    return [p for p in folder.rglob("*") if p.is_file() and str(p) != sandbox.db]


def _where_readable(sandbox: Sandbox, person: Person) -> dict[str, Any]:
    """Every table column, the warehouse's bytes and every other file holding a value."""
    files = {p: p.read_bytes() for p in _other_files(sandbox)}
    data = Path(sandbox.db).read_bytes()
    return {
        value: {
            "tables": _tables_holding(sandbox.db, value),
            "warehouse_bytes": value.encode() in data,
            "files": [str(p) for p, content in files.items() if value.encode() in content],
        }
        for value in person.values
    }


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forgotten]:
    """First sync, dry run, forget by id with a token, then two more syncs."""
    tmp = tmp_path_factory.mktemp("forget")
    cwd = os.getcwd()
    os.chdir(tmp)  # no .dlt/ of the developer's leaks in
    try:
        for sandbox in make_sandbox(tmp):
            sandbox.collector.public_api_token = PUBLIC_API_TOKEN
            env = sandbox.env()
            first = run_cli("run", env=env)
            assert first.returncode in (0, 3), first.stderr
            person = _pick_person(sandbox.db)
            assert sandbox.db and Path(sandbox.db).read_bytes().count(person.email.encode())
            # a track a stopped run handed out, written down with the customer's email
            with duckdb.connect(sandbox.db) as con:
                con.execute(
                    "insert into segment_sync.tracks_in_flight values (?, ?, 'run-x', now())",
                    ["evt_x", json.dumps({"message_id": "evt_x", "properties": {
                        "customer_email": person.email, "customer_name": person.name}})],
                )  # fmt: skip
            before_sha = _sha(sandbox.db)
            before = _outboxes(sandbox.db, person.customer_id)
            # what an older release left beside the warehouse: a completed load package
            planted = Path(sandbox.db + ".dlt", "dodo_segment", "load", "loaded", "1", "x.parquet")
            planted.parent.mkdir(parents=True)
            planted.write_bytes(json.dumps(person.values).encode())
            # and what a verification stopped midway leaves: a copy of the warehouse
            Path(sandbox.db + ".verify").mkdir(mode=0o700)
            shutil.copyfile(sandbox.db, sandbox.db + ".verify/full.duckdb")

            dry = run_cli("forget", person.customer_id, "--dry-run", env=env)
            after_dry_sha = _sha(sandbox.db)
            token_env = sandbox.env(
                SEGMENT_PUBLIC_API_TOKEN=PUBLIC_API_TOKEN,
                SEGMENT_PUBLIC_API_HOST=sandbox.collector.base_url,
            )
            forget = run_cli("forget", person.customer_id, env=token_env)
            after = _outboxes(sandbox.db, person.customer_id)
            regulations = sandbox.collector.regulation_requests()
            right_after = _where_readable(sandbox, person)

            sandbox.collector.reset()
            syncs = []
            subscription = _query(
                sandbox.db,
                "select subscription_id from dodo_raw.subscriptions "
                "where customer__customer_id = ? and status = 'active' limit 1",
                [person.customer_id],
            )[0][0]
            for days in (2, 3):
                sandbox.business.advance_time(days=days)
                # the customer pays again: the next sync reads them with their email
                sandbox.business.renew_subscription(
                    subscription, at=sandbox.business.now - timedelta(hours=1)
                )
                syncs.append(run_cli("run", env=sandbox.env()))
            yield Forgotten(
                sandbox, person, dry, forget, syncs, before_sha, after_dry_sha, before, after,
                regulations, right_after, sandbox.collector.messages, planted,
            )  # fmt: skip
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_dry_run_lists_what_would_be_removed_and_changes_nothing(forgotten: Forgotten) -> None:
    dry = forgotten.dry_run
    assert dry.returncode == 0, dry.stderr
    assert f"would forget {forgotten.person.customer_id}" in dry.stdout
    assert "dodo_raw.customers: email, name, phone_number" in dry.stdout
    assert "analytics.customer_traits" in dry.stdout
    assert "dlt load file(s)" in dry.stdout
    assert ".verify (a stopped verification's copy) would be deleted" in dry.stdout
    assert "nothing was changed" in dry.stdout
    assert forgotten.after_dry_run_sha == forgotten.before_file_sha
    assert forgotten.person.email not in dry.stdout  # the listing shows no personal value


@pytest.mark.slow
def test_forget_erases_the_person_from_every_table_file_and_byte(forgotten: Forgotten) -> None:
    result, person, db = forgotten.forget, forgotten.person, forgotten.sandbox.db
    assert result.returncode == 0, result.stderr
    assert f"forgot {person.customer_id}" in result.stdout
    nowhere = {"tables": [], "warehouse_bytes": False, "files": []}
    assert forgotten.right_after == {value: nowhere for value in person.values}
    assert forgotten.planted is not None and not forgotten.planted.exists()
    assert not Path(db + ".verify").exists()
    assert oct(Path(db).stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.slow
def test_forget_keeps_what_accounting_needs(forgotten: Forgotten) -> None:
    db, person = forgotten.sandbox.db, forgotten.person
    payments = _query(
        db,
        "select payment_id, total_amount, currency, created_at, customer__email, customer__name "
        "from dodo_raw.payments where customer__customer_id = ?",
        [person.customer_id],
    )
    assert payments
    assert all(p[0] and p[1] is not None and p[2] and p[3] for p in payments)
    assert all(p[4] is None and p[5] is None for p in payments)
    tombstone = _query(
        db,
        "select regulation_id from dodo_raw.forgotten_customers where customer_id = ?",
        [person.customer_id],
    )
    assert tombstone and tombstone[0][0]


@pytest.mark.slow
def test_other_customers_events_and_traits_are_unchanged(forgotten: Forgotten) -> None:
    assert forgotten.after_outboxes == forgotten.before_outboxes
    assert forgotten.before_outboxes["identify"] and forgotten.before_outboxes["track"]
    db = forgotten.sandbox.db
    assert not _query(
        db,
        "select 1 from analytics.identify_outbox where user_id = ? union all "
        "select 1 from analytics.track_outbox where user_id = ?",
        [forgotten.person.customer_id] * 2,
    )


@pytest.mark.slow
def test_regulation_reached_segment_with_the_documented_body(forgotten: Forgotten) -> None:
    requests = forgotten.regulations
    assert [r["status"] for r in requests] == [200]
    assert requests[0]["authorized"] is True
    assert requests[0]["body"] == {
        "regulationType": "SUPPRESS_WITH_DELETE",
        "subjectType": "USER_ID",
        "subjectIds": [forgotten.person.customer_id],
    }
    assert requests[0]["regulate_id"] in forgotten.forget.stdout
    for stream in (forgotten.forget.stdout, forgotten.forget.stderr):
        assert PUBLIC_API_TOKEN not in stream


@pytest.mark.slow
def test_the_next_two_syncs_neither_store_nor_send_the_person(forgotten: Forgotten) -> None:
    person, db = forgotten.person, forgotten.sandbox.db
    assert [s.returncode for s in forgotten.syncs] in ([0, 0], [0, 3], [3, 0], [3, 3]), [
        s.stderr for s in forgotten.syncs
    ]
    renewals = _query(
        db,
        "select count(*) from dodo_raw.payments where customer__customer_id = ?",
        [person.customer_id],
    )[0][0]
    assert renewals >= 3  # the syncs did read the customer's new payments
    for value in person.values:
        assert _tables_holding(db, value) == [], value
        for other in _other_files(forgotten.sandbox):
            assert value.encode() not in other.read_bytes(), (value, other)
    sent = forgotten.sent_after_forget
    assert sent, "the syncs sent nothing at all: the test would prove nothing"
    assert not [m for m in sent if m.get("userId") == person.customer_id]
    wire = json.dumps(sent, ensure_ascii=False)
    for value in person.values:
        assert value not in wire
    assert not list(Path(db + ".dlt").rglob("*.parquet"))  # no load files kept by a run


@pytest.mark.slow
def test_forget_by_email_without_token_prints_the_privacy_portal_steps(
    forgotten: Forgotten,
) -> None:
    sandbox = forgotten.sandbox
    other = _query(
        sandbox.db,
        "select customer_id, email from dodo_raw.customers where email is not null "
        "and customer_id <> ? order by customer_id limit 1",
        [forgotten.person.customer_id],
    )[0]
    result = run_cli("forget", other[1].upper(), env=sandbox.env())
    assert result.returncode == 0, result.stderr
    assert f"forgot {other[0]}" in result.stdout
    assert "Privacy Portal" in result.stdout and other[0] in result.stdout
    assert _tables_holding(sandbox.db, other[1]) == []
    assert sandbox.collector.regulation_requests() == []  # nothing filed without a token


@pytest.mark.slow
def test_unknown_customer_is_one_line_and_exit_5(forgotten: Forgotten) -> None:
    before = _sha(forgotten.sandbox.db)
    result = run_cli("forget", "cus_does_not_exist", env=forgotten.sandbox.env())
    assert result.returncode == 5
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cus_does_not_exist" in lines[0], result.stderr
    assert _sha(forgotten.sandbox.db) == before


@pytest.mark.slow
def test_segment_refusing_the_token_exits_6_and_a_second_forget_files_it(sandbox: Sandbox) -> None:
    sandbox.collector.public_api_token = PUBLIC_API_TOKEN
    assert run_cli("run", env=sandbox.env()).returncode in (0, 3)
    customer_id = _query(sandbox.db, "select min(customer_id) from dodo_raw.customers")[0][0]
    wrong = "wrong_public_api_token_77"
    host = sandbox.collector.base_url
    refused = run_cli(
        "forget", customer_id,
        env=sandbox.env(SEGMENT_PUBLIC_API_TOKEN=wrong, SEGMENT_PUBLIC_API_HOST=host),
    )  # fmt: skip
    assert refused.returncode == 6, refused.stderr
    assert "refused the token (HTTP 401)" in refused.stderr
    assert wrong not in refused.stdout + refused.stderr
    assert _query(
        sandbox.db,
        "select email from dodo_raw.customers where customer_id = ?",
        [customer_id],
    ) == [(None,)]  # erased here all the same
    filed = run_cli(
        "forget", customer_id,
        env=sandbox.env(SEGMENT_PUBLIC_API_TOKEN=PUBLIC_API_TOKEN, SEGMENT_PUBLIC_API_HOST=host),
    )  # fmt: skip
    assert filed.returncode == 0, filed.stderr
    statuses = [(r["status"], r["authorized"]) for r in sandbox.collector.regulation_requests()]
    assert statuses == [(401, False), (200, True)]
    again = run_cli(
        "forget", customer_id,
        env=sandbox.env(SEGMENT_PUBLIC_API_TOKEN=PUBLIC_API_TOKEN, SEGMENT_PUBLIC_API_HOST=host),
    )  # fmt: skip
    assert again.returncode == 0 and "already filed" in again.stdout
    assert len(sandbox.collector.regulation_requests()) == 2


def test_collector_validates_regulation_bodies(sandbox: Sandbox) -> None:
    collector = sandbox.collector
    url = collector.base_url + "/regulations"
    auth = {"Authorization": f"Bearer {collector.public_api_token}"}
    bad_bodies = [
        {"regulationType": "FORGET_ME", "subjectType": "USER_ID", "subjectIds": ["u1"]},
        {"regulationType": "SUPPRESS_WITH_DELETE", "subjectType": "EMAIL", "subjectIds": ["u1"]},
        {"regulationType": "SUPPRESS_WITH_DELETE", "subjectType": "USER_ID", "subjectIds": []},
        {"regulationType": "SUPPRESS_WITH_DELETE", "subjectType": "USER_ID", "subjectIds": "u1"},
    ]
    for body in bad_bodies:
        answer = requests.post(url, json=body, headers=auth, timeout=5)
        assert answer.status_code == 400 and answer.json()["errors"][0]["type"] == "validation"
    regulate_id = file_suppress_with_delete(
        ["u1", "u2"], collector.public_api_token, collector.base_url
    )
    assert collector.regulation_requests()[-1] == {
        "status": 200,
        "authorized": True,
        "regulate_id": regulate_id,
        "body": {
            "regulationType": "SUPPRESS_WITH_DELETE",
            "subjectType": "USER_ID",
            "subjectIds": ["u1", "u2"],
        },
    }
    with pytest.raises(RegulationError, match="HTTP 401") as refused:
        file_suppress_with_delete(["u1"], "not-the-token", collector.base_url)
    assert "not-the-token" not in str(refused.value)
