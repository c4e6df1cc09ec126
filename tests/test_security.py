"""Security and privacy: no key in any output or file after runs that fail every way, excluded
fields never sent, owner-only files, and API input treated as data (never pasted into SQL)."""

from __future__ import annotations

import ast
import base64
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from pipelines.commands.demo import DEMO_API_KEY, DEMO_WRITE_KEY
from pipelines.sandbox.faults import set_field
from tests.conftest import API_KEY, REPO, WRITE_KEY, Sandbox, run_cli
from tests.test_reliability import (
    EVERYTHING,
    FIGURES,
    assert_nothing_lost,
    assert_raw_matches_truth,
)

WRONG_KEY = "sk_revoked_3c9f1e77aa"


def secret_forms(*secrets: str) -> list[bytes]:
    """Each key as written, and in the Basic-auth form Segment's client sends."""
    forms = []
    for s in secrets:
        forms += [s.encode(), base64.b64encode(f"{s}:".encode())]
    return forms


def _umask_022() -> None:
    os.umask(0o022)  # a permissive parent: the CLI itself must make its files owner-only


def cli(*args: str, env: dict[str, str], outputs: list[str]) -> subprocess.CompletedProcess:
    result = run_cli(*args, env=env, umask=0o022)
    outputs.append(f"$ {' '.join(args)}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow
def test_no_key_anywhere_after_runs_that_fail_every_way(sandbox: Sandbox, tmp_path: Path) -> None:
    outputs: list[str] = []
    env = sandbox.env()
    # 1. a revoked key (401), in both log formats
    for fmt in ("text", "json"):
        bad = cli(
            "run",
            "--log-format",
            fmt,
            env=sandbox.env(DODO_PAYMENTS_API_KEY=WRONG_KEY),
            outputs=outputs,
        )
        assert bad.returncode == 1
    # 2. a good extract, then a run whose one event Segment rejects (400)
    assert cli("run", "--skip-emit", "-v", env=env, outputs=outputs).returncode == 0
    with duckdb.connect(sandbox.db, read_only=True) as con:
        culprit = con.execute("select min(event_id) from analytics.track_outbox").fetchone()[0]
    sandbox.collector.reject_message_ids = {culprit}
    assert cli("run", *EVERYTHING, "--log-format", "json", env=env, outputs=outputs).returncode == 3
    # 3. a Segment outage, verbose (the client logs its requests at debug level)
    sandbox.business.advance_time(days=1)
    env = sandbox.env()
    sandbox.collector.outage(True)
    assert cli("run", "-v", env=env, outputs=outputs).returncode == 1
    sandbox.collector.outage(False)
    # 4. a run killed in the middle (leaves a WAL, load packages, a trace)
    sandbox.business.advance_time(days=1)
    env = sandbox.env()
    exe = Path(sys.executable).with_name("dodo-segment")
    killed = subprocess.Popen(
        [str(exe), "run", "--log-format", "json"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, preexec_fn=_umask_022,
    )  # fmt: skip
    time.sleep(3.0)
    killed.send_signal(signal.SIGKILL)
    out, err = killed.communicate()
    outputs.append(out.decode() + err.decode())
    FIGURES["faults_injected"] += 5
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    # 5. what an operator looks at afterwards
    for args in (["status"], ["status", "--json"], ["doctor"], ["preview"]):
        cli(*args, env=env, outputs=outputs)
    assert cli("run", *EVERYTHING, env=env, outputs=outputs).returncode in (0, 3)
    # 6. the demo, with the user's keys in the environment
    user_env = {k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "SEGMENT"))}
    user_env.update(DODO_PAYMENTS_API_KEY=API_KEY, SEGMENT_WRITE_KEY=WRITE_KEY)
    demo = cli("demo", "--db", str(tmp_path / "demo.duckdb"), env=user_env, outputs=outputs)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-2000:]

    text = "\n".join(outputs).encode()
    forms = secret_forms(API_KEY, WRITE_KEY, WRONG_KEY, DEMO_API_KEY, DEMO_WRITE_KEY)
    found = [f.decode() for f in forms if f in text]
    scanned = 1
    for path in tmp_path.rglob("*"):
        if path.is_file():
            scanned += 1
            data = path.read_bytes()
            found += [f"{path.name}: {f.decode()}" for f in forms if f in data]
    FIGURES["secrets_found"] += len(found)
    FIGURES["files_and_outputs_scanned"] += scanned + len(outputs)
    assert found == [], found
    assert any(".dlt" in p for p in leftovers) and scanned > 10
    assert any(o.lstrip().startswith("$ run --log-format json") for o in outputs)
    # The warehouse, its WAL and the pipeline folder are owner-only, though the umask was 022.
    loose = []
    for path in [*tmp_path.glob("*.duckdb*"), *tmp_path.rglob("*.duckdb.dlt/**/*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(tmp_path)} {mode:o}")
    assert loose == []


EXCLUDED = ("email", "customer_email", "phone", "customer_phone")


def _assert_no_personal_data_sent(sandbox: Sandbox) -> None:
    emails = {c["email"] for c in sandbox.business.customers}
    phones = {c.get("phone_number") for c in sandbox.business.customers} - {None, ""}
    assert sandbox.collector.tracks() and sandbox.collector.identifies()
    for m in sandbox.collector.tracks():
        assert not set(m["properties"]) & set(EXCLUDED), m["properties"]
    for m in sandbox.collector.identifies():
        assert not set(m["traits"]) & set(EXCLUDED), m["traits"]
        assert "name" in m["traits"]  # other traits still go
    sent = orjson.dumps(sandbox.collector.messages).decode()
    assert not [e for e in emails if e in sent] and not [p for p in phones if p in sent]


@pytest.mark.slow
def test_excluded_fields_from_the_environment_never_reach_segment(sandbox: Sandbox) -> None:
    env = sandbox.env(SEGMENT__EXCLUDED_FIELDS=",".join(EXCLUDED))
    result = run_cli("run", *EVERYTHING, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_no_personal_data_sent(sandbox)
    assert_nothing_lost(sandbox, excluded=EXCLUDED)


@pytest.mark.slow
def test_excluded_fields_from_config_toml_never_reach_segment(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    (tmp_path / ".dlt").mkdir()
    (tmp_path / ".dlt" / "config.toml").write_text(
        "[segment]\nexcluded_fields = [" + ", ".join(f'"{f}"' for f in EXCLUDED) + "]\n"
    )
    result = run_cli("run", *EVERYTHING, env=sandbox.env())  # run from tmp_path (the cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_no_personal_data_sent(sandbox)


# --- API input is data --------------------------------------------------------------------------

SQL_WORDS = re.compile(
    r"\b(select\s|insert\s+into|update\s+\S+\s+set|delete\s+from|create\s+(or\s+replace\s+)?"
    r"((temp|temporary)\s+)?(table|view|macro|schema)|drop\s+(table|view|schema)|alter\s+table|"
    r"on\s+conflict)",
    re.I,
)
REVIEWED_INTERPOLATIONS = {
    # Reviewed: each is an identifier or clause built from code (dodo_contract.*, module constants),
    # from the repo's own .sql files, or a printed hint; none carries an API value.
    # sql/**.tests.sql: a test's query, or the same with its references narrowed (scoped_tests)
    "pipelines/transform/data_tests.py": {"sql", "test.sql", "test.quarantine"},
    "pipelines/commands/demo.py": {"db_path"},  # a printed "next, try" command, never executed
    "pipelines/extract/load.py": {"key", "status", "resource"},  # PRIMARY_KEYS/STATUS_FIELDS
    # issue 14: PRIMARY_KEYS/STATUS_FIELDS/NON_TERMINAL_STATUSES (code constants), RESOURCES, the
    # raw tables' column names (dlt's snake_case: [a-z0-9_] only) and the query built from them
    "pipelines/extract/lookback.py": {"content", "is_open", "key", "now", "resource"},
    # PRIMARY_KEYS, and column names of an Arrow table built from RAW_COLUMNS' fields only
    # (webhook fields without a raw column are dropped first), with types DuckDB described
    "pipelines/extract/webhooks.py": {"key", "resource", "name", "kind", "names"},
    "pipelines/transform/runner.py": {
        "raw",
        "exclude",  # the source macros leave out the key hash columns (dodo_contract names)
        "table",
        "typed",
        "empty",
        "other",
        "kind",
        "body",
        "model.name",
        "by_name[AS_OF_MODEL].sql",  # sql/marts/int_as_of.sql, run as a query
        # column names read from dodo_raw: API field names, but normalised by dlt's snake_case
        # naming ([a-z0-9_] only) before they become columns; see the hostile-field test below
        "row_hash",
    },  # fmt: skip
    # forget: the warehouse's own schema, table and column names (duckdb_columns()), quoted with
    # doubled quotes by _q, and clauses built from them; ids and emails are parameters
    "pipelines/commands/erasure.py": {
        "_q(column)",
        "_q(key)",
        "_q(schema)",
        "_q(table)",
        "held",
        "qualified",
        "where",
    },  # fmt: skip
    # issue 21, delta build: model names and SQL from the repo's/user's .sql files, the grain's
    # key column (a model header), code-built predicates and clauses, dodo_raw table and column
    # names (dlt's snake_case, [a-z0-9_] only) and analytics table names (model file names);
    # timestamps and customer ids are parameters or rows of temp tables
    "pipelines/transform/delta.py": {
        # issue 21 (cost): the touched days' clauses (code-built), days are a session variable
        "in_touched('owner')",
        # rebuild_keys keeping the rows it inserted: a temp table's name from a model's name,
        # the model's scoped SQL (code-built), its scope's temp view name
        "kept",
        "rebuilt",
        "scopes[model.name]",
        "model.name",  # reopen_scope drops the kept rows' temp table (_REBUILT + a model's name)
        # the touched days' payments by row id (touched.staging_rows: code-built SQL)
        "payments",
        "refunded_payments",
        "on_touched_days",  # in_touched_days over a code constant
        "stg_payments",  # the staging relation's name
        "touched_day",  # an element of the touched days' session variable, by a code index
        "changed",  # touched.CHANGED, a temp table's name
        "kind",  # "view" or "table" (a day scope's)
        "objects.format('refund_id')",
        "new",  # touched.NEW_OWNERS, a temp table's name
        "old",  # touched.OLD_OWNERS, a temp table's name
        "as_of_sql",
        "column",
        "current",
        "in_touched('customer_id')",
        "month",
        "name",
        "predicate",
        "previous",
        # temp tables' bodies built in code: rows_where's SQL, an empty or a fixed query
        "rows",
        "body",
        "scoped_sql(model, scopes)",
        "table",
    },  # fmt: skip
    "pipelines/transform/previous.py": {
        # issue 21 (cost): the track outbox's inputs (model names) and a fixed clause
        "in_ids",
        "name",
        "new_track",
        "expr",
        "fingerprint",
        "group",
        "identify",
        "in_touched('customer_id')",
        "in_touched_users('user_id')",
        # rows_where over identify_outbox with a fixed clause
        "touched.rows_where(identify, in_touched_users('user_id'))",
        "keys",
        "new",
        "old",
        "table",
        "target",
        "track",
    },  # fmt: skip
    # key: a test's `quarantine:` column (event_id | user_id, checked when parsed); new_sql,
    # old_sql: the test's own SQL with its inputs renamed
    "pipelines/transform/scoped_tests.py": {
        # issue 21 (cost): a fixed clause; the track outbox's input model names
        "rows",  # rows_where's SQL over a model table
        "scope",  # a model's scope: a temp view's name (code)
        "scopes[name]",
        "delta.rows_where(relation, where, table=table)",
        "query",  # the track outbox's SQL from the repo's .sql files, inputs renamed
        "ids",
        "n",
        "delta.key_predicate(grain, delta.key_column(grain))",
        "in_touched('customer_id')",
        "key",
        "name",
        "new_sql",
        "old_sql",
        "where",
    },  # fmt: skip
    "pipelines/transform/touched.py": {
        # rows_where's: a code-built predicate over an analytics table (issue 21)
        "predicate",
        "found",  # _rows_by_key's SQL over the snapshot table
        "_owner_branches(REACHED)",  # code-built owners query over a temp table
        # issue 21 (cost): code-built subqueries of the owners' branches (model and column names), `>`/`>=`, temp table names
        "_in_pairs(CHANGED)",  # a temp table's name
        # the snapshot's lookups by hashed keys (issue 21): code-built predicates and column lists
        "_by_key(table, 'id_key', ids, exact)",  # snapshot table, temp tables' names
        "_by_key(table, key, ids, exact)",
        "_with_keys(OWNERS_TABLE, f'select * from {NEW_OWNERS}')",  # a temp table's name
        "_with_keys(ROWS_TABLE, rows)",  # a temp table's name and _in_pairs
        "by_ref",  # _rows_by_key over temp tables' names
        "entities",  # a temp table's name
        "exact",  # a comparison with a temp table
        "hop2",  # _rows_by_key over a CTE's name
        "lookup_key('i')",  # a hash of a subquery's column
        "owner_relation",  # a key of OWNER_RELATIONS (code)
        "spec.columns",  # OWNER_RELATIONS: column names from code
        "spec.id_column",
        "spec.staging",  # OWNER_RELATIONS: a staging relation's name from code
        # staging_rows: a staging model's own SQL, its source macro's call replaced by code-built
        # SQL (raw table and column names from _RAW_KEYS, a code-built predicate)
        "view",
        "view_sql",
        "narrowed",
        "source_call",
        "predicate_of(column)",
        "predicate_of(raw_column)",
        "owner_rows",  # staging_rows over OWNER_RELATIONS (code)
        # staging_rows by the key hashes (issue 21): hash column names (dodo_contract), the
        # KeyList's session variables (code), the code-built row filter
        "hashed",
        "excluded",
        "keys.ids",
        "keys.more",
        "_key_hash('k')",
        "matching",
        "scope_ids(scoped, column)",  # a session variable's name from temp table and column names
        "by_id",
        "columns",
        "compare",
        "day",
        "dispute_history",
        "disputes",
        "history",
        "history_disputes",
        "keys",
        "ledger",
        "ledger_refunds",
        "lookup('stg_subscriptions', 'subscription_id', 'customer_id', f'select sid from {paid}')",
        "lookup('stg_subscriptions', 'subscription_id', 'customer_id', f'select subscription_id from {history}')",
        "paid",
        "passes",
        "payments(f'select payment_id from {disputes}')",
        "payments(f'select payment_id from {history_disputes}')",
        "payments(f'select payment_id from {ledger_refunds}')",
        "payments(f'select payment_id from {refunds}')",
        "payments(f'select reference_object_id from {ledger}')",
        "refunds",
        "relation",
        "since",
        # the owners' relations filtered by id lists in session variables (code-built)
        "payments",
        "rel['customers']",
        "rel['dispute_history']",
        "rel['disputes']",
        "rel['forgotten']",
        "rel['history']",
        "rel['ledger']",
        "rel['paid']",
        "rel['payments']",
        "rel['refunds']",
        "rel['subscriptions']",
        "subscriptions",
        "ENTITY_KEYS[t]",
        "ENTITY_KEYS[table]",
        "_newest_load(load_times.get(t), newest_sync)",
        "by_time",
        "t",
        "totals",
        "_rows_sql(table, names, only)",
        "candidates",
        "old.replace('select k', 'select tbl, id, k')",
        "raw",
        "_current_rows_sql(columns)",
        "_owner_branches('delta_refresh')",
        "_owner_branches(CHANGED)",
        "_owner_branches(None)",
        "_rows_sql(table, names)",
        "a",
        "b",
        "changed",
        "column",
        "content",
        "every",
        "expr",
        "ids",
        "null",  # in_key_list/sync_key_list: a session variable's name (code constants)
        "in_touched('customer_id')",
        "in_touched('owner')",
        "key",
        "mark",
        "newest",
        "only('balance_ledger', 'ledger_entry_id')",
        "only('customers', 'customer_id')",
        "only('dispute_history', 'dispute_id')",
        "only('disputes', 'dispute_id')",
        "only('forgotten_customers', 'customer_id')",
        "only('payments', 'payment_id')",
        "only('refunds', 'refund_id')",
        "only('subscription_history', 'subscription_id')",
        "only('subscriptions', 'subscription_id')",
        "query",
        "scope_ids",
        "scoped",
        "table",
        "tbl",
        "where",
    },  # fmt: skip
    "pipelines/transform/verify.py": {"a", "b", "full", "here", "key", "select", "table"},
    "pipelines/commands/forget.py": {"id_column", "match", "table"},  # forget._LOOKUPS
    # fixed clauses: changed_only (its value is a parameter), group_id (a column name or NULL)
    # issue 21 (emit): `table` is outbox_changes.CHANGED_TRACKS (a code constant the job hands
    # over), `match` one of two fixed clauses; the ids themselves are bound parameters
    "pipelines/emit/ledger.py": {
        "rows",  # a fixed query of the outbox, or of a temp table the models step named
        "changed_only",
        "group_id",
        "group",
        "match.format('event_id')",
        "match.format('message_id')",
        "table",
    },
    "pipelines/emit/accounts.py": {"only"},  # a fixed clause; the ids are a bound parameter
    # issue 21 (emit): the runner's temp view of the touched customers' track outbox rows
    "pipelines/transform/outbox_changes.py": {"track_rows"},
    # issue 13: PRIMARY_KEYS/STATUS_FIELDS and the raw contract's names (dodo_contract.RAW_COLUMNS)
    "pipelines/extract/dodo/settled.py": {"key", "status", "resource"},
    "pipelines/warehouse.py": {
        "', '.join((f'{name} {kind}' for name, kind in RUNS_COLUMNS))",
        "', '.join(columns)",
        "kind",
        "name",
        "placeholders",
        "updates",
        "target",
        "qualified",  # the warehouse's own table names (duckdb_tables()), quotes doubled
        "table",  # issue 13, type_raw_columns: dodo_contract.RAW_COLUMNS names and types
        "column",
        "wanted",
    },  # fmt: skip
}


def _sql_fstring_interpolations() -> dict[str, set[str]]:
    """Every expression pasted into an f-string that looks like SQL, per module of pipelines/."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if "/sandbox/" in rel:
            continue  # the simulator writes no SQL
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.JoinedStr):
                continue
            literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if not SQL_WORDS.search(literal):
                continue
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    source = ast.unparse(value.value)
                    last = source.split(".")[-1]
                    if last.isupper() or last.startswith(("SYNC_", "RAW_", "ANALYTICS_")):
                        continue  # a module constant: code, not data
                    found.setdefault(rel, set()).add(source)
    return found


def test_sql_never_pastes_values_only_reviewed_identifiers() -> None:
    """Audit: interpolations in SQL-looking f-strings are only reviewed identifiers from code.

    A new one fails this test until someone checks it cannot carry API data (and adds it here).
    """
    unreviewed = {
        module: sorted(exprs - REVIEWED_INTERPOLATIONS.get(module, set()))
        for module, exprs in _sql_fstring_interpolations().items()
    }
    assert {m: e for m, e in unreviewed.items() if e} == {}


HOSTILE = "'); drop table dodo_raw.payments; --"
HOSTILE_META = {
    "note": "x'); delete from segment_sync.delivered_events; --",
    'quote"key': 'O\'Brien \\ "quoted" $1 ? %s {}',
    "nested": {"sql": "1; drop schema analytics cascade"},
}


@pytest.mark.slow
def test_hostile_names_and_metadata_round_trip_as_data(sandbox: Sandbox) -> None:
    business = sandbox.business
    victims = business.customers[:3]
    with business.lock:
        for customer in victims:
            customer["name"] = HOSTILE
            customer["metadata"] = HOSTILE_META
            business.buyers[customer["customer_id"]].ref["name"] = HOSTILE
        business.touch()
    # A hostile new field *name* too: API keys become column names.
    sandbox.simulator.inject_fault(
        path="/customers", mutate=set_field('evil"); drop table x; --', HOSTILE), times=10_000
    )
    result = run_cli("run", *EVERYTHING, env=sandbox.env())
    assert result.returncode == 0, result.stderr[-2000:]
    with duckdb.connect(sandbox.db, read_only=True) as con:
        columns = {
            r[0]
            for r in con.execute(
                "select column_name from duckdb_columns() where table_name = 'customers'"
                " and schema_name = 'dodo_raw'"
            ).fetchall()
        }
        odd = sorted(c for c in columns if not re.fullmatch(r"[a-z0-9_]+", c))
        assert odd == [] and any(c.startswith("evil") for c in columns), columns
        for customer in victims:
            row = con.execute(
                "select name, metadata::varchar from dodo_raw.customers where customer_id = ?",
                [customer["customer_id"]],
            ).fetchone()
            assert row is not None and row[0] == HOSTILE
            assert orjson.loads(row[1]) == HOSTILE_META
        assert con.execute("select count(*) from segment_sync.delivered_events").fetchone()[0] > 0
    traits = {m["userId"]: m["traits"] for m in sandbox.collector.identifies()}
    assert all(traits[c["customer_id"]]["name"] == HOSTILE for c in victims)
    # A second run over the hostile rows (merge, history, status) changes nothing and sends nothing.
    sent = len(sandbox.collector.messages)
    assert run_cli("run", *EVERYTHING, env=sandbox.env()).returncode == 0
    assert len(sandbox.collector.messages) == sent
    assert_raw_matches_truth(sandbox)
    assert_nothing_lost(sandbox)
