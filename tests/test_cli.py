"""The scheduled job as cron runs it: the real `dodo-segment` console script, in subprocesses,
against the sandbox (Dodo API simulator + Segment collector over HTTP).

Most tests start from one warehouse loaded once per module (`run --skip-emit`), copied per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines import lock, warehouse
from pipelines.dodo_contract import ENDPOINTS, PRIMARY_KEYS, RESOURCES, WAREHOUSE_SCHEMA_VERSION
from tests.conftest import API_KEY, WRITE_KEY, Sandbox, fork_server, make_sandbox, run_cli

# every test here drives a subprocess; one worker builds the module's shared setup
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_cli")]

EXE = str(Path(sys.executable).with_name("dodo-segment"))
SUBCOMMANDS = (
    ("run",), ("demo",), ("status",), ("doctor",), ("preview",), ("resend",), ("transform",),
    ("traits",), ("traits", "recompute"), ("init",), ("report",),
)  # fmt: skip


# --- helpers -----------------------------------------------------------------------------------


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """Start the console script without waiting for it."""
    return subprocess.Popen(
        [EXE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_all(*commands: tuple[tuple[str, ...], dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """Run independent CLI invocations in parallel (each is mostly interpreter start-up)."""
    procs = [(args, start_cli(*args, env=env)) for args, env in commands]
    done = []
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess([EXE, *args], proc.returncode, out, err))
    return done


def status_json(env: dict[str, str]) -> dict[str, Any]:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raw_ids(db: str, resource: str) -> list[str]:
    with duckdb.connect(db, read_only=True) as con:
        key = PRIMARY_KEYS[resource]
        return [r[0] for r in con.execute(f'select "{key}" from dodo_raw."{resource}"').fetchall()]


def assert_raw_equals_truth(db: str, sandbox: Sandbox) -> None:
    """Every raw table holds each of the simulator's objects exactly once."""
    for resource in RESOURCES:
        ids = raw_ids(db, resource)
        truth = {item[PRIMARY_KEYS[resource]] for item in sandbox.business.tables[resource].items}
        assert len(ids) == len(set(ids)), f"{resource}: duplicated rows"
        assert set(ids) == truth, resource


def query(db: str, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(db, read_only=True) as con:
        return con.execute(sql).fetchall()


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The failure is one `dodo-segment: ...` line on stderr, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dodo-segment: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def fingerprint(path: Path) -> tuple[str, int, int]:
    data = path.read_bytes()
    stat = path.stat()
    return hashlib.sha256(data).hexdigest(), stat.st_size, stat.st_mtime_ns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert API_KEY not in text and WRITE_KEY not in text


def wait_for_lock(db: str, pid: int, timeout: float = 30) -> None:
    """Until the process `pid` holds the run lock (read from the lock file, no flock taken)."""
    path = lock.lock_path(db)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and lock.read_holder(path).pid == pid:
            return
        time.sleep(0.05)
    raise AssertionError("the run never took the lock")


# --- fixtures ----------------------------------------------------------------------------------


@dataclass
class Loaded:
    """The module's sandbox and a warehouse that went through one `run --skip-emit`."""

    sandbox: Sandbox
    template: Path

    def copy(self, tmp_path: Path, name: str = "warehouse.duckdb") -> tuple[str, dict[str, str]]:
        """A private copy of the loaded warehouse, and the environment pointing at it."""
        target = tmp_path / name
        shutil.copyfile(self.template, target)
        collector = self.sandbox.collector
        collector.reset()
        collector.reject_message_ids = set()
        collector.latency_ms = 0
        return str(target), self.sandbox.env(DODO_SEGMENT_DB=str(target))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    folder = tmp_path_factory.mktemp("loaded")
    for sandbox in make_sandbox(folder):
        result = run_cli("run", "--skip-emit", env=sandbox.env())
        assert result.returncode == 0, result.stderr
        with duckdb.connect(sandbox.db) as con:
            con.execute("checkpoint")  # one self-contained file to copy
        yield Loaded(sandbox, Path(sandbox.db))


# --- help and usage ----------------------------------------------------------------------------


def test_help_of_every_subcommand_reads_like_documentation() -> None:
    env = dict(os.environ)
    results = run_all(
        ((), env),
        (("--help",), env),
        (("--version",), env),
        *(((*cmd, "--help"), env) for cmd in SUBCOMMANDS),
    )
    bare, top, version, *subs = results
    assert bare.returncode == 2 and "dodo-segment run" in bare.stderr
    assert top.returncode == 0
    for phrase in ("Exit codes", "DODO_PAYMENTS_API_KEY", "SEGMENT_WRITE_KEY", "doctor"):
        assert phrase in top.stdout
    assert version.returncode == 0 and version.stdout.startswith("dodo-segment ")
    for cmd, result in zip(SUBCOMMANDS, subs, strict=True):
        assert result.returncode == 0, (cmd, result.stderr)
        assert result.stdout.startswith(f"usage: dodo-segment {' '.join(cmd)}"), cmd
        # every subcommand has a description of its own, not just the usage line
        assert len(result.stdout.split("\n\n")) >= 3, (cmd, result.stdout)
    run_help = subs[0].stdout
    for flag in ("--dry-run", "--events-since", "--full-refresh", "--skip-emit", "--only-emit",
                 "--wait", "--log-format", "--db", "examples:", "Exit codes"):  # fmt: skip
        assert flag in run_help, flag


def test_usage_and_configuration_errors_exit_2_with_one_line(loaded: Loaded) -> None:
    env = loaded.sandbox.env(DODO_SEGMENT_DB="never_created.duckdb")
    no_key = {k: v for k, v in env.items() if k != "SEGMENT_WRITE_KEY"}
    results = run_all(
        (("run",), no_key),
        (("run", "--no-such-flag"), env),
        (("run", "--skip-emit", "--only-emit"), env),
        (("run", "--full-refresh", "invoices"), env),
        (("run", "--events-since", "last tuesday"), env),
        (("status",), {**env, "DODO_PAYMENTS_ENVIRONMENT": "production"}),
        (("traits",), env),
        (("run", "--skip-emit"), {**env, "WAREHOUSE__MEMORY_LIMIT": "lots"}),
    )
    assert [r.returncode for r in results] == [2] * len(results), [r.stderr for r in results]
    missing_key = one_line_error(results[0])
    assert "SEGMENT_WRITE_KEY is not set" in missing_key and "--skip-emit" in missing_key
    assert "--skip-emit and --only-emit exclude each other" in one_line_error(results[2])
    assert "unrecognized arguments: --no-such-flag" in results[1].stderr
    assert "invalid choice: 'invoices'" in results[3].stderr
    assert "not a date" in results[4].stderr
    assert "live_mode or test_mode" in one_line_error(results[5])
    assert "warehouse.memory_limit must be a size" in one_line_error(results[7])
    assert not Path("never_created.duckdb").exists()  # refused before touching anything


def test_a_warm_cli_child_answers_like_the_installed_script(loaded: Loaded) -> None:
    """`run_cli` forks its processes warm (tests/cli_forkserver.py): byte for byte, exit code
    for exit code, they answer what an exec of the installed script answers."""
    env = loaded.sandbox.env(DODO_SEGMENT_DB="never_created.duckdb")
    calls = (
        ("--version",), ("run", "--no-such-flag"), ("run", "--skip-emit", "--only-emit"),
        ("traits",), ("transform", "--help"), ("status",), (),
    )  # fmt: skip
    server = fork_server()
    assert server is not None and server.accepts(env)
    warm = [run_cli(*args, env=env) for args in calls]
    cold = run_all(*((args, env) for args in calls))
    assert [(w.returncode, w.stdout, w.stderr) for w in warm] == [
        (c.returncode, c.stdout, c.stderr) for c in cold
    ]
    assert {w.returncode for w in warm} >= {0, 2}


# --- a clean life: first sync, then an incremental run ----------------------------------------


def test_runs_status_and_json_logs_match_what_was_loaded_and_sent(sandbox: Sandbox) -> None:
    sim, collector, db = sandbox.simulator, sandbox.collector, sandbox.db
    first = run_cli("run", "--log-format", "json", env=sandbox.env())
    assert first.returncode == 0, first.stderr
    # --log-format json: every line on stderr and stdout is one JSON object
    logs = [json.loads(line) for line in first.stderr.splitlines()]
    out = [json.loads(line) for line in first.stdout.splitlines()]
    assert logs and all({"time", "level", "message"} <= set(d) for d in logs)
    assert len(out) == 1 and out[0]["outcome"] == "success" and out[0]["exit_code"] == 0

    status = status_json(sandbox.env())
    (run1,) = status["runs"]
    counts = sandbox.business.counts()
    assert run1["outcome"] == "success" and run1["exit_code"] == 0 and run1["error"] is None
    assert run1["rows_loaded"] == counts
    assert sum(run1["api_requests"].values()) == len(sim.requests)
    assert run1["identifies_sent"] == len(collector.identifies()) == counts["customers"]
    assert run1["tracks_sent"] == len(collector.tracks()) == 0  # history is skipped, not sent
    outbox = query(db, "select count(*) from analytics.track_outbox")[0][0]
    assert run1["skipped_backlog"] == outbox > 0 and run1["pending"] == 0
    assert status["pending"] == {
        "tracks": 0, "identifies": 0, "skipped_backlog": outbox, "rejected_total": 0,
    }  # fmt: skip
    assert status["run_in_progress"] is None
    assert_raw_equals_truth(db, sandbox)

    # a week passes in the simulator; the next run sends what changed, with progress lines
    changes = sandbox.business.advance_time(until=sandbox.wall)
    assert changes["new_payments"]
    sim.reset_counts()
    second = run_cli("run", env=sandbox.env(DODO_SEGMENT_PROGRESS_SECONDS="0"))
    assert second.returncode == 0, second.stderr
    (summary,) = second.stdout.splitlines()  # exactly one line on stdout
    assert re.match(r"run \S+: success in [\d.]+s; loaded \d+ rows with \d+ API requests; sent "
                    r"\d+ identify, \d+ track; 0 rejected, 0 quarantined; 0 pending \(exit 0\)$",
                    summary), summary  # fmt: skip
    tracks = collector.tracks()
    assert re.search(rf"emit: track {len(tracks)}/{len(tracks)} acknowledged", second.stderr)

    status = status_json(sandbox.env())
    run2, again = status["runs"]
    assert again == run1
    assert run2["tracks_sent"] == len(tracks) > 0
    assert run2["identifies_sent"] == len(collector.identifies()) - counts["customers"] > 0
    assert f"sent {run2['identifies_sent']} identify, {len(tracks)} track" in summary
    assert sum(run2["api_requests"].values()) == len(sim.requests)
    assert status["pending"]["tracks"] == 0 and status["pending"]["identifies"] == 0
    ids = collector.message_ids()
    assert len(ids) == len(set(ids))
    assert {m["messageId"] for m in tracks} == {
        r[0]
        for r in query(
            db, "select event_id from segment_sync.delivered_events where status = 'delivered'"
        )  # fmt: skip
    }
    assert_raw_equals_truth(db, sandbox)

    text = run_cli("status", env=sandbox.env())
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and lines[0].startswith("started (UTC)")
    assert [line.split()[2:5:2] for line in lines[1:3]] == [["run", "success"]] * 2
    assert lines[-1].startswith("Pending now: 0 track, 0 identify")
    assert_no_secrets(first.stdout, first.stderr, second.stdout, second.stderr, text.stdout)


# --- overlap ----------------------------------------------------------------------------------


def test_overlapping_runs_one_proceeds_one_skips_and_wait_queues(sandbox: Sandbox) -> None:
    env = sandbox.env(SOURCES__DODO__TIMEOUT_SECONDS="60")
    gate = threading.Event()

    def held_at_the_gate(items: list[dict[str, Any]], ctx: Any) -> list[dict[str, Any]]:
        gate.wait(50)  # the first run's first customers page waits until the checks are done
        return items

    sandbox.simulator.inject_fault(ENDPOINTS["customers"], mutate=held_at_the_gate)
    first = start_cli("run", env=env)
    try:
        wait_for_lock(sandbox.db, first.pid)
        t0 = time.monotonic()
        skipped = run_cli("run", env=env)
        assert skipped.returncode == 0 and time.monotonic() - t0 < 10
        assert re.fullmatch(
            rf"dodo-segment: another run is in progress for \d+s \(pid {first.pid}, run, step "
            r"\w+\); skipping this one \(--wait queues it\)\n",
            skipped.stdout,
        ), skipped.stdout
        assert skipped.stderr == ""

        # status answers from the lock while the run holds the warehouse, and never disturbs it
        during, document = run_all((("status",), env), (("status", "--json"), env))
        assert during.returncode == 0
        assert during.stdout.startswith(f"A run is in progress: run (pid {first.pid}, step ")
        assert "unusually long" not in during.stdout
        document = json.loads(document.stdout)
        assert document["run_in_progress"]["pid"] == first.pid and document["runs"] is None

        queued = start_cli("run", "--wait", env=env)
        time.sleep(1.5)
        assert first.poll() is None and queued.poll() is None  # queued behind the first run
    finally:
        gate.set()
    first_out, first_err = first.communicate(timeout=120)
    queued_out, queued_err = queued.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert queued.returncode == 0, queued_err
    assert "another run is in progress" in queued_err and "waiting for it to finish" in queued_err

    runs = status_json(env)["runs"]
    assert [r["outcome"] for r in runs] == ["success", "success"]  # the skipped run left no row
    later, earlier = runs
    assert later["started_at"] >= earlier["finished_at"]  # --wait ran after, not beside
    assert later["run_id"] in queued_out and earlier["run_id"] in first_out
    ids = sandbox.collector.message_ids()
    assert len(ids) == len(set(ids)) == sandbox.business.counts()["customers"]
    assert_raw_equals_truth(sandbox.db, sandbox)


def test_status_flags_a_lock_held_unusually_long(loaded: Loaded, tmp_path: Path) -> None:
    db, env = loaded.copy(tmp_path)
    with lock.run_lock(db, "run"):
        lock.annotate(db, started_at=time.time() - 3 * 3600, step="extract", typical_seconds=60)
        text, as_json, skipped, doctor = run_all(
            (("status",), env),
            (("status", "--json"), env),
            (("run", "--log-format", "json"), env),
            (("doctor",), env),
        )
    assert text.returncode == 0
    assert re.match(
        rf"A run is in progress: run \(pid {os.getpid()}, step extract\) for 108\d\ds  <- "
        r"unusually long \(over 900s\)",
        text.stdout,
    ), text.stdout
    running = json.loads(as_json.stdout)["run_in_progress"]
    assert running["unusually_long"] is True and running["step"] == "extract"
    (line,) = skipped.stdout.splitlines()  # cron's log stays one JSON object per line
    assert skipped.returncode == 0 and json.loads(line)["outcome"] == "skipped"
    assert "another run is in progress for 108" in json.loads(line)["message"]
    assert doctor.returncode == 1
    assert re.search(r"^FAIL lock +a run holds the lock for 108\d\ds", doctor.stdout, re.M)
    assert re.search(r"^ok   warehouse .* not opened while a run holds it", doctor.stdout, re.M)
    # the lock is released: status reads the warehouse again
    after = status_json(env)
    assert after["run_in_progress"] is None and after["runs"][0]["command"] == "run"


# --- crash ------------------------------------------------------------------------------------


def _stop_mid_extract(sandbox: Sandbox, env: dict[str, str], how: signal.Signals) -> str:
    sandbox.simulator.reset_counts()
    victim = start_cli("run", env=env)
    deadline = time.monotonic() + 60
    while len(sandbox.simulator.requests) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, victim.communicate()
    os.kill(victim.pid, how)
    out, _ = victim.communicate(timeout=60)
    return out


def test_run_stopped_or_killed_mid_extract_then_rerun_duplicates_nothing(sandbox: Sandbox) -> None:
    env = sandbox.env(SOURCES__DODO__ROWS_PER_LOAD="300")  # many small loads to die between
    # SIGTERM (systemd stopping the unit): the run records itself as interrupted and exits 1
    out = _stop_mid_extract(sandbox, env, signal.SIGTERM)
    assert re.match(r"run \S+: interrupted in ", out), out
    # SIGKILL: nothing runs at all; the next run marks the row and releases nothing by hand
    _stop_mid_extract(sandbox, env, signal.SIGKILL)

    rerun = run_cli("run", env=env)
    assert rerun.returncode == 0, rerun.stderr  # the lock died with the process
    assert_raw_equals_truth(sandbox.db, sandbox)
    runs = status_json(env)["runs"]
    assert [r["outcome"] for r in runs] == ["success", "interrupted", "interrupted"]
    assert "killed" in runs[1]["error"] and "SIGTERM" in runs[2]["error"]
    assert runs[2]["exit_code"] == 1 and runs[1]["exit_code"] is None
    ids = [m["userId"] for m in sandbox.collector.identifies()]
    assert sorted(ids) == sorted(c["customer_id"] for c in sandbox.business.customers)


# --- exit codes 1, 3, 4 ------------------------------------------------------------------------


def test_failures_exit_1_with_the_run_recorded(loaded: Loaded, tmp_path: Path) -> None:
    db_key, env_key = loaded.copy(tmp_path, "bad_key.duckdb")
    db_host, env_host = loaded.copy(tmp_path, "no_host.duckdb")
    env_key["DODO_PAYMENTS_API_KEY"] = "revoked_key_0000"
    env_host["SEGMENT_HOST"] = f"http://127.0.0.1:{free_port()}"
    bad_key, no_host = run_all((("run",), env_key), (("run", "--only-emit"), env_host))
    assert bad_key.returncode == 1 and no_host.returncode == 1
    assert "401" in one_line_error(bad_key) or "key" in one_line_error(bad_key).lower()
    one_line_error(no_host)
    assert "revoked_key_0000" not in bad_key.stdout + bad_key.stderr
    for status in run_all((("status", "--json"), env_key), (("status", "--json"), env_host)):
        run = json.loads(status.stdout)["runs"][0]
        assert run["outcome"] == "failed" and run["exit_code"] == 1 and run["error"]

    # a Segment outage: exit 1 in bounded time, everything stays pending, the next run sends it
    db, env = loaded.copy(tmp_path)
    loaded.sandbox.collector.outage(True)
    t0 = time.monotonic()
    outage = run_cli("run", "--only-emit", env=env)
    assert outage.returncode == 1 and time.monotonic() - t0 < 60
    assert "failed:" in one_line_error(outage)
    customers = loaded.sandbox.business.counts()["customers"]
    status = status_json(env)
    assert status["runs"][0]["outcome"] == "failed"
    assert status["runs"][0]["pending"] == status["pending"]["identifies"] == customers
    loaded.sandbox.collector.outage(False)
    recovered = run_cli("run", "--only-emit", env=env)
    assert recovered.returncode == 0, recovered.stderr
    assert len(loaded.sandbox.collector.identifies()) == customers


def test_rejected_message_and_quarantined_row_exit_3(loaded: Loaded, tmp_path: Path) -> None:
    db, env = loaded.copy(tmp_path)
    with duckdb.connect(db) as con:  # a payment whose customer the warehouse does not know
        con.execute(
            "insert into dodo_raw.payments select * replace ('pay_ghost' as payment_id, "
            "'cus_ghost' as customer__customer_id) from dodo_raw.payments "
            "where status = 'succeeded' limit 1"
        )
        victim = con.execute(
            "select event_id from analytics.track_outbox order by event_id limit 1"
        ).fetchone()[0]
        outbox = con.execute("select count(*) from analytics.track_outbox").fetchone()[0]
    loaded.sandbox.collector.reject_message_ids = {victim}
    result = run_cli("run", "--only-emit", "--events-since", "2000-01-01", env=env)
    assert result.returncode == 3, result.stderr
    ghost = {
        r[0]
        for r in query(
            db, "select event_id from analytics.lifecycle_events where object_id = 'pay_ghost'"
        )  # fmt: skip
    }
    assert ghost and f"1 rejected, {len(ghost)} quarantined" in result.stdout
    run = status_json(env)["runs"][0]
    assert (run["outcome"], run["exit_code"], run["rejected"], run["quarantined"]) == (
        "finished_with_rejections", 3, 1, len(ghost),
    )  # fmt: skip
    sent = {m["messageId"] for m in loaded.sandbox.collector.tracks()}
    assert victim not in sent and len(sent) == outbox - 1 == run["tracks_sent"]
    assert not ghost & sent
    assert query(db, "select message_id from segment_sync.rejected_messages") == [(victim,)]


def test_error_data_test_blocks_emission_exit_4(loaded: Loaded, tmp_path: Path) -> None:
    db, env = loaded.copy(tmp_path)
    with duckdb.connect(db) as con:  # the same customer twice breaks an error-severity test
        con.execute("insert into dodo_raw.customers select * from dodo_raw.customers limit 1")
    result = run_cli("run", "--only-emit", env=env)
    assert result.returncode == 4, result.stderr
    assert "stg_customers_customer_id_unique" in result.stderr
    assert "nothing was emitted" in one_line_error(result)
    assert loaded.sandbox.collector.messages == []
    run = status_json(env)["runs"][0]
    assert (run["outcome"], run["exit_code"]) == ("data_test_failed", 4)


# --- doctor, preview ----------------------------------------------------------------------------


def test_doctor_on_a_good_and_a_broken_configuration(loaded: Loaded, tmp_path: Path) -> None:
    db, good_env = loaded.copy(tmp_path)
    corrupt = tmp_path / "corrupt.duckdb"
    corrupt.write_bytes(b"not a warehouse\n" * 64)
    broken_env = loaded.sandbox.env(
        DODO_PAYMENTS_API_KEY="wrong_key_1234",
        SEGMENT_HOST=f"http://127.0.0.1:{free_port()}",
        DODO_SEGMENT_DB=str(corrupt),
    )
    before = fingerprint(Path(db))
    good, broken, status = run_all(
        (("doctor",), good_env), (("doctor",), broken_env), (("status", "--json"), good_env)
    )
    assert status.returncode == 0 and json.loads(status.stdout)["runs"]
    assert good.returncode == 0, good.stdout
    assert [line.split()[:2] for line in good.stdout.splitlines()] == [
        ["ok", "dodo"], ["ok", "segment"], ["ok", "warehouse"], ["ok", "lock"],
    ]  # fmt: skip
    assert broken.returncode == 1
    assert [line.split()[:2] for line in broken.stdout.splitlines()] == [
        ["FAIL", "dodo"], ["FAIL", "segment"], ["FAIL", "warehouse"], ["ok", "lock"],
    ]  # fmt: skip
    assert "refused the key (HTTP 401)" in broken.stdout
    assert "not a DuckDB database" in broken.stdout
    assert fingerprint(Path(db)) == before  # doctor and status change nothing
    assert_no_secrets(good.stdout, broken.stdout, broken.stderr)
    assert "wrong_key_1234" not in broken.stdout


def test_preview_counts_what_the_next_run_sends_and_sends_nothing(
    loaded: Loaded, tmp_path: Path
) -> None:
    db, env = loaded.copy(tmp_path)
    result = run_cli("preview", "--sample", "1", env=env)
    assert result.returncode == 0, result.stderr
    customers = loaded.sandbox.business.counts()["customers"]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Would send {customers} identify and 0 track call(s); ")
    assert json.loads(lines[1].split(": ", 1)[1])["type"] == "identify"
    assert loaded.sandbox.collector.messages == []
    assert status_json(env)["pending"]["identifies"] == customers


# --- the warehouse file: versions and damage ----------------------------------------------------


def test_older_warehouse_is_migrated_in_place(loaded: Loaded, tmp_path: Path) -> None:
    db, env = loaded.copy(tmp_path)
    with duckdb.connect(db) as con:  # as a pre-versioning release left it: no meta, fewer columns
        con.execute("drop table segment_sync.warehouse_meta")
        for column in ("skipped_backlog", "quarantined", "api_requests"):
            con.execute(f"alter table segment_sync.runs drop column {column}")
        raw_before = con.execute("select count(*) from dodo_raw.payments").fetchone()[0]
        old_run = con.execute("select run_id from segment_sync.runs").fetchone()[0]
    result = run_cli("run", "--only-emit", env=env)
    assert result.returncode == 0, result.stderr
    with duckdb.connect(db, read_only=True) as con:
        assert warehouse.schema_version(con) == WAREHOUSE_SCHEMA_VERSION
        assert (
            con.execute("select written_by from segment_sync.warehouse_meta")
            .fetchone()[0]
            .startswith("dodo-segment ")
        )
        assert con.execute("select count(*) from dodo_raw.payments").fetchone()[0] == raw_before
    runs = status_json(env)["runs"]
    assert runs[-1]["run_id"] == old_run and runs[-1]["quarantined"] is None
    assert runs[0]["outcome"] == "success" and runs[0]["quarantined"] == 0


def test_a_new_migration_runs_once_in_place(
    loaded: Loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _ = loaded.copy(tmp_path)
    monkeypatch.setattr(warehouse, "WAREHOUSE_SCHEMA_VERSION", WAREHOUSE_SCHEMA_VERSION + 1)
    monkeypatch.setitem(
        warehouse.MIGRATIONS,
        WAREHOUSE_SCHEMA_VERSION + 1,
        "alter table segment_sync.runs add column host varchar",
    )
    assert warehouse.prepare(db, "next") == WAREHOUSE_SCHEMA_VERSION
    assert warehouse.prepare(db, "next") == WAREHOUSE_SCHEMA_VERSION + 1  # applied once only
    with duckdb.connect(db, read_only=True) as con:
        assert warehouse.schema_version(con) == WAREHOUSE_SCHEMA_VERSION + 1
        assert con.execute("select count(host) from segment_sync.runs").fetchone() == (0,)


def test_newer_or_corrupt_warehouse_is_refused_untouched(loaded: Loaded, tmp_path: Path) -> None:
    db, env = loaded.copy(tmp_path)
    with duckdb.connect(db) as con:  # as a newer release would leave it
        con.execute("update segment_sync.warehouse_meta set schema_version = 99")
    newer = Path(db)
    corrupt = tmp_path / "corrupt.duckdb"
    corrupt.write_bytes(os.urandom(64 * 1024))
    corrupt_env = {**env, "DODO_SEGMENT_DB": str(corrupt)}
    before = {path: fingerprint(path) for path in (newer, corrupt)}
    time.sleep(0.01)  # an mtime change would be visible
    # A run and a status on the same file never overlap here: a status during that run's
    # short lock would rightly answer "a run is in progress" instead of refusing the file.
    runs = run_all((("run",), env), (("run",), corrupt_env))
    statuses = run_all((("status",), env), (("status",), corrupt_env))
    results = [runs[0], statuses[0], runs[1], statuses[1]]
    assert [r.returncode for r in results] == [1, 1, 1, 1], [r.stderr for r in results]
    for result in results[:2]:
        line = one_line_error(result)
        assert "schema version 99, newer than this dodo-segment" in line
        assert "upgrade dodo-segment" in line
    for result in results[2:]:
        line = one_line_error(result)
        assert "is not a DuckDB database" in line and "was not changed" in line
    assert {path: fingerprint(path) for path in (newer, corrupt)} == before
    assert not Path(db + ".wal").exists() and not Path(str(corrupt) + ".wal").exists()
    assert not Path(str(corrupt) + ".dlt").exists()  # the extract never started
