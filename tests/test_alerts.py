"""Alerts and metrics through the real `dodo-segment` console script: a loopback webhook receiver
takes the alerts, the sandbox's simulator and collector cause the failures, and Prometheus'
own parser reads the metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines import lock
from tests.conftest import API_KEY, WRITE_KEY, Sandbox, make_sandbox, run_cli

pytestmark = pytest.mark.xdist_group("test_alerts")  # one worker builds the module-scoped setup

HOOK_TOKEN = "T0DODO/B0SEG/hook-s3cr3t-4f9a1c"
"""The secret part of a Slack incoming-webhook URL: its path."""


# --- a loopback webhook receiver ---------------------------------------------------------------


class Receiver:
    """An incoming-webhook endpoint on 127.0.0.1 that keeps every JSON body it is posted."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                receiver.paths.append(self.path)
                if receiver.status == 200:
                    receiver.bodies.append(body)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/{HOOK_TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[tuple[str, str]]:
        """(kind, state) of every alert taken, in order."""
        return [(b["kind"], b["state"]) for b in self.bodies]

    def clear(self) -> None:
        self.bodies.clear()
        self.paths.clear()
        self.status = 200

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


# --- a loaded warehouse, copied per test ---------------------------------------------------------


@dataclass
class Loaded:
    sandbox: Sandbox
    template: Path

    def copy(self, tmp_path: Path, hook: Receiver | None, **extra: str) -> dict[str, str]:
        """A private copy of the loaded warehouse; the environment pointing at it and the hook."""
        target = tmp_path / "warehouse.duckdb"
        shutil.copyfile(self.template, target)
        self.sandbox.collector.reset()
        self.sandbox.collector.reject_message_ids = set()
        self.sandbox.simulator.clear_faults()
        env = self.sandbox.env(DODO_SEGMENT_DB=str(target), **extra)
        if hook is not None:
            env["DODO_SEGMENT_ALERT_WEBHOOK_URL"] = hook.url
        return env


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    folder = tmp_path_factory.mktemp("alerts")
    for sandbox in make_sandbox(folder):
        result = run_cli("run", "--skip-emit", env=sandbox.env())
        assert result.returncode == 0, result.stderr
        with duckdb.connect(sandbox.db) as con:
            con.execute("checkpoint")
        yield Loaded(sandbox, Path(sandbox.db))


OUTPUTS: list[str] = []
"""Everything the CLI printed in this module, checked for the webhook URL at the end."""


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = run_cli(*args, env=env)
    OUTPUTS.extend((result.stdout, result.stderr))
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_hook_url(*texts: str) -> None:
    for text in texts:
        assert HOOK_TOKEN not in text and "hook-s3cr3t" not in text


def warehouse_bytes(env: dict[str, str]) -> bytes:
    db = env["DODO_SEGMENT_DB"]
    with duckdb.connect(db) as con:
        con.execute("checkpoint")
    return Path(db).read_bytes() + Path(db + ".alerts.json").read_bytes()


# --- each condition fires once and clears once ---------------------------------------------------


@pytest.mark.slow
def test_failed_run_alerts_once_then_recovers_once(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver)
    revoked = {**env, "DODO_PAYMENTS_API_KEY": "revoked_key_0000"}
    for _ in range(2):  # cron keeps failing: one alert, not two
        assert cli("run", env=revoked).returncode == 1
    assert receiver.events() == [("run_failed", "firing")]
    (alert,) = receiver.bodies
    status = json.loads(cli("status", "--json", env=env).stdout)
    first_failure = [r for r in status["runs"] if r["outcome"] == "failed"][-1]
    assert alert["run_id"] == first_failure["run_id"] and alert["exit_code"] == 1
    assert "refused the key" in alert["text"] and alert["error"] == first_failure["error"]
    assert "revoked_key_0000" not in json.dumps(alert)  # scrubbed like every other output
    for _ in range(2):
        assert cli("run", env=env).returncode == 0
    assert receiver.events() == [("run_failed", "firing"), ("run_failed", "recovered")]
    recovered = receiver.bodies[-1]
    assert recovered["text"].startswith("dodo-segment recovered: the run failed cleared (run ")
    assert recovered["figures"]["open_since"]
    assert_no_hook_url(*OUTPUTS, json.dumps(status))


@pytest.mark.slow
def test_outages_of_segment_and_dodo_alert_once_each_and_clear(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver, SOURCES__DODO__MAX_RETRIES="1")
    customers = loaded.sandbox.business.counts()["customers"]
    loaded.sandbox.collector.outage(True)
    try:
        for _ in range(2):
            assert cli("run", "--only-emit", env=env).returncode == 1
    finally:
        loaded.sandbox.collector.outage(False)
    assert receiver.events() == [("segment_outage", "firing")]
    assert receiver.bodies[0]["figures"]["pending"] == customers
    assert "Segment was unavailable" in receiver.bodies[0]["text"]

    loaded.sandbox.simulator.inject_fault(status=503, times=10_000, retry_after=0.01)
    try:
        for _ in range(2):
            assert cli("run", env=env).returncode == 1
    finally:
        loaded.sandbox.simulator.clear_faults()
    # the Dodo outage opens its own alert; Segment was not reached, so it has not cleared
    assert receiver.events()[1:] == [("dodo_outage", "firing")]
    assert "Dodo Payments API was unavailable" in receiver.bodies[1]["text"]

    assert cli("run", env=env).returncode == 0
    assert sorted(receiver.events()[2:]) == [
        ("dodo_outage", "recovered"),
        ("segment_outage", "recovered"),
    ]
    assert len(loaded.sandbox.collector.identifies()) == customers


@pytest.mark.slow
def test_error_data_test_alerts_once_then_clears(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver)
    db = env["DODO_SEGMENT_DB"]
    with duckdb.connect(db) as con:  # the same customer twice breaks an error-severity test
        con.execute("insert into dodo_raw.customers select * from dodo_raw.customers limit 1")
    for _ in range(2):
        assert cli("run", "--only-emit", env=env).returncode == 4
    assert receiver.events() == [("data_test_failed", "firing")]
    assert "nothing was emitted" in receiver.bodies[0]["text"]
    assert any("unique" in t for t in receiver.bodies[0]["figures"]["failed_tests"])
    with duckdb.connect(db) as con:
        con.execute(
            "create or replace table dodo_raw.customers as "
            "select distinct on (customer_id) * from dodo_raw.customers"
        )
    assert cli("run", "--only-emit", env=env).returncode == 0
    assert receiver.events() == [("data_test_failed", "firing"), ("data_test_failed", "recovered")]


def _ghost_payment(db: str) -> str:
    """A payment whose customer the warehouse does not know (quarantined by a warn test); and the
    messageId of one track event for the collector to reject."""
    with duckdb.connect(db) as con:
        con.execute(
            "insert into dodo_raw.payments select * replace ('pay_ghost' as payment_id, "
            "'cus_ghost' as customer__customer_id) from dodo_raw.payments "
            "where status = 'succeeded' limit 1"
        )
        return con.execute(
            "select event_id from analytics.track_outbox order by event_id limit 1"
        ).fetchone()[0]


@pytest.mark.slow
def test_rejections_above_the_threshold_alert_once_then_clear(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver)  # the default threshold: any rejection or quarantine
    db = env["DODO_SEGMENT_DB"]
    loaded.sandbox.collector.reject_message_ids = {_ghost_payment(db)}
    first = cli("run", "--only-emit", "--events-since", "2000-01-01", env=env)
    assert first.returncode == 3, first.stderr
    run = json.loads(cli("status", "--json", env=env).stdout)["runs"][0]
    assert run["rejected"] == 1 and run["quarantined"] >= 1
    assert receiver.events() == [("rejections", "firing")]
    figures = receiver.bodies[0]["figures"]
    assert (figures["rejected"], figures["quarantined"]) == (1, run["quarantined"])
    assert (figures["threshold"], figures["threshold_is_share"]) == (0, False)
    sent = run["identifies_sent"] + run["tracks_sent"]
    assert figures["messages"] == sent + 1 + run["quarantined"]
    # the ghost's rows stay quarantined on the next run: still open, no second alert
    second = cli("run", "--only-emit", env=env)
    assert second.returncode == 3 and receiver.events() == [("rejections", "firing")]
    with duckdb.connect(db) as con:
        con.execute("delete from dodo_raw.payments where payment_id = 'pay_ghost'")
    assert cli("run", "--only-emit", env=env).returncode == 0
    assert receiver.events() == [("rejections", "firing"), ("rejections", "recovered")]


@pytest.mark.slow
def test_a_share_threshold_ignores_a_few_rejections_among_many(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver, ALERTS__REJECT_THRESHOLD="5%")
    loaded.sandbox.collector.reject_message_ids = {_ghost_payment(env["DODO_SEGMENT_DB"])}
    result = cli("run", "--only-emit", "--events-since", "2000-01-01", env=env)
    assert result.returncode == 3  # the exit code still says so; the share is under 5%
    run = json.loads(cli("status", "--json", env=env).stdout)["runs"][0]
    assert (run["rejected"] + run["quarantined"]) / (run["tracks_sent"] + 120) < 0.05
    assert receiver.events() == []


@pytest.mark.slow
def test_a_lock_held_unusually_long_alerts_once_then_clears(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver)
    db = env["DODO_SEGMENT_DB"]
    with lock.run_lock(db, "run"):
        lock.annotate(db, started_at=time.time() - 3 * 3600, step="extract", typical_seconds=60)
        for _ in range(3):  # every cron run meets the hung run; one alert
            skipped = cli("run", env=env)
            assert skipped.returncode == 0 and "another run is in progress" in skipped.stdout
    assert receiver.events() == [("long_lock", "firing")]
    figures = receiver.bodies[0]["figures"]
    assert figures["pid"] == os.getpid() and figures["step"] == "extract"
    assert figures["held_seconds"] > 3 * 3600 - 60 and figures["threshold_seconds"] == 900
    assert cli("run", "--only-emit", env=env).returncode == 0  # the lock is free again
    assert receiver.events() == [("long_lock", "firing"), ("long_lock", "recovered")]
    # a run that meets a lock held briefly does not alert
    with lock.run_lock(db, "run"):
        assert cli("run", env=env).returncode == 0
    assert receiver.events() == [("long_lock", "firing"), ("long_lock", "recovered")]


# --- a failing endpoint never fails the run; the URL is never shown -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["answers_500", "unreachable"])
def test_a_failing_alert_endpoint_never_fails_the_run_and_is_retried(
    loaded: Loaded, receiver: Receiver, tmp_path: Path, endpoint: str
) -> None:
    env = loaded.copy(tmp_path, receiver)
    if endpoint == "answers_500":
        receiver.status = 500
    else:
        env["DODO_SEGMENT_ALERT_WEBHOOK_URL"] = (
            f"http://127.0.0.1:{free_port()}/services/{HOOK_TOKEN}"
        )
    revoked = {**env, "DODO_PAYMENTS_API_KEY": "revoked_key_0000"}
    failed = cli("run", "--log-format", "json", env=revoked)
    assert failed.returncode == 1  # the run's own exit code, not the alert's
    warnings = [json.loads(line) for line in failed.stderr.splitlines()]
    (warning,) = [w for w in warnings if "could not deliver" in w["message"]]
    assert warning["level"] == "warning" and "run_failed" in warning["message"]
    assert ("HTTP 500" if endpoint == "answers_500" else "unreachable") in warning["message"]
    ok = cli("run", "--only-emit", env=env)
    assert ok.returncode == 0, ok.stderr  # the recovered alert fails too (or is not due)
    assert receiver.bodies == []
    # once the endpoint works, an alert that was never delivered is sent by the next failing run
    env["DODO_SEGMENT_ALERT_WEBHOOK_URL"] = receiver.url
    receiver.status = 200
    assert (
        cli("run", env={**revoked, "DODO_SEGMENT_ALERT_WEBHOOK_URL": receiver.url}).returncode == 1
    )
    assert receiver.events() == [("run_failed", "firing")]
    status = cli("status", "--json", env=env)
    assert_no_hook_url(*OUTPUTS, status.stdout, warehouse_bytes(env).decode("latin-1"))


@pytest.mark.slow
def test_the_webhook_url_appears_in_no_output(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver)
    revoked = {**env, "DODO_PAYMENTS_API_KEY": "revoked_key_0000"}
    results = [
        cli("run", "-v", "--log-format", "json", env=revoked),
        cli("run", "-v", env=env),
        cli("status", env=env),
        cli("status", "--json", env=env),
        cli("status", "--format", "prometheus", env=env),
        cli("doctor", env=env),
        cli("alerts", "test", "-v", env=env),
    ]
    assert receiver.events() == [
        ("run_failed", "firing"),
        ("run_failed", "recovered"),
        ("test", "test"),
    ]
    assert all(path == f"/services/{HOOK_TOKEN}" for path in receiver.paths)
    texts = [r.stdout + r.stderr for r in results]
    assert_no_hook_url(*texts, warehouse_bytes(env).decode("latin-1"))
    # a webhook URL that is not a URL: the configuration error does not quote it
    bad = cli("run", env={**env, "DODO_SEGMENT_ALERT_WEBHOOK_URL": f"hooks/{HOOK_TOKEN}"})
    assert bad.returncode == 2 and "must be an http(s) URL" in bad.stderr
    assert_no_hook_url(bad.stdout, bad.stderr)
    for secret in (API_KEY, WRITE_KEY):
        assert all(secret not in t for t in texts)


# --- alerts test ----------------------------------------------------------------------------


@pytest.mark.slow
def test_alerts_test_sends_one_test_alert(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    env = loaded.copy(tmp_path, receiver)
    sent = cli("alerts", "test", env=env)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "alerts test: delivered; check the channel"
    (body,) = receiver.bodies
    assert (body["kind"], body["state"]) == ("test", "test")
    assert body["text"].startswith("dodo-segment: test alert") and body["host"]
    assert not os.path.exists(env["DODO_SEGMENT_DB"] + ".alerts.json")  # no state changed

    unreachable = {
        **env,
        "DODO_SEGMENT_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/x/{HOOK_TOKEN}",
    }
    failed = cli("alerts", "test", env=unreachable)
    assert failed.returncode == 1
    assert failed.stderr.startswith("dodo-segment: alerts test: not delivered: the webhook is ")
    assert len(failed.stderr.splitlines()) == 1
    missing = {k: v for k, v in env.items() if k != "DODO_SEGMENT_ALERT_WEBHOOK_URL"}
    unset = cli("alerts", "test", env=missing)
    assert unset.returncode == 2 and "DODO_SEGMENT_ALERT_WEBHOOK_URL" in unset.stderr
    assert cli("alerts", env=env).returncode == 2  # the subcommand is required
    assert_no_hook_url(*OUTPUTS)


# --- metrics ----------------------------------------------------------------------------------


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.slow
def test_prometheus_metrics_from_status_and_the_textfile(
    loaded: Loaded, receiver: Receiver, tmp_path: Path
) -> None:
    textfile = tmp_path / "node_exporter" / "dodo_segment.prom"
    env = loaded.copy(tmp_path, receiver, METRICS__TEXTFILE_PATH=str(textfile))
    assert cli("run", env={**env, "DODO_PAYMENTS_API_KEY": "revoked_key_0000"}).returncode == 1
    assert cli("run", env=env).returncode == 0
    status = json.loads(cli("status", "--json", env=env).stdout)
    runs = status["runs"]  # newest first: run, failed run, the template's run --skip-emit
    prom = cli("status", "--format", "prometheus", env=env)
    assert prom.returncode == 0, prom.stderr
    samples = parse(prom.stdout)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("dodo_segment_runs_total", command="run", outcome="success") == 2
    assert value("dodo_segment_runs_total", command="run", outcome="failed") == 1
    for table in ("payments", "customers", "subscriptions"):
        loaded_rows = sum(r["rows_loaded"].get(table, 0) for r in runs)
        assert value("dodo_segment_rows_loaded_total", table=table) == loaded_rows > 0
    requests = sum(r["api_requests"].get("payments", 0) for r in runs)
    assert value("dodo_segment_api_requests_total", resource="payments") == requests > 0
    assert value("dodo_segment_messages_sent_total", type="identify") == sum(
        r["identifies_sent"] for r in runs
    )
    assert value("dodo_segment_messages_sent_total", type="track") == runs[0]["tracks_sent"]
    assert value("dodo_segment_messages_rejected_total") == 0
    assert value("dodo_segment_messages_pending") == runs[0]["pending"] == 0
    finished = runs[0]["finished_at"]
    assert value("dodo_segment_last_success_timestamp_seconds") == pytest.approx(
        datetime.fromisoformat(finished).timestamp()
    )
    assert value("dodo_segment_last_run_exit_code") == 0
    assert value("dodo_segment_last_run_duration_seconds") == pytest.approx(
        runs[0]["duration_seconds"], abs=0.01
    )
    steps = {s: value("dodo_segment_last_run_step_duration_seconds", step=s) for s in
             ("extract", "models", "emit", "total")}  # fmt: skip
    assert all(v > 0 for v in steps.values())
    assert steps["extract"] + steps["models"] + steps["emit"] <= steps["total"]
    assert value("dodo_segment_step_seconds_total", step="extract") > steps["extract"]
    assert value("dodo_segment_run_in_progress") == 0
    assert value("dodo_segment_alert_open", kind="run_failed") == 0

    # the textfile the run wrote: the same figures, readable by node_exporter's user
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    from_file = parse(textfile.read_text())
    for key in (
        ("dodo_segment_runs_total", (("command", "run"), ("outcome", "success"))),
        ("dodo_segment_messages_sent_total", (("type", "track"),)),
        ("dodo_segment_rows_loaded_total", (("table", "payments"),)),
    ):
        assert from_file[key] == samples[key]
    assert [p.name for p in textfile.parent.iterdir()] == ["dodo_segment.prom"]

    # while a run holds the warehouse: only what the lock file and the alert state say
    with lock.run_lock(env["DODO_SEGMENT_DB"], "run"):
        busy = parse(cli("status", "--format", "prometheus", env=env).stdout)
    assert busy[("dodo_segment_run_in_progress", ())] == 1
    assert ("dodo_segment_run_in_progress_seconds", ()) in busy
    assert not any(name == "dodo_segment_runs_total" for name, _ in busy)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "value", "is_share"),
    [(0, 0, False), ("10", 10, False), (25, 25, False), ("5%", 0.05, True), (0.05, 0.05, True)],
)
def test_reject_threshold_is_a_count_or_a_share(given: Any, value: float, is_share: bool) -> None:
    from pipelines.config import load_config

    alerts = load_config({"alerts.reject_threshold": given}).alerts
    assert (alerts.reject_threshold, alerts.reject_threshold_is_share) == (
        pytest.approx(value),
        is_share,
    )


@pytest.mark.parametrize("given", ["-1", "lots", "150%", "2.5"])
def test_a_bad_reject_threshold_is_a_configuration_error(given: str) -> None:
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="alerts.reject_threshold must be a count"):
        load_config({"alerts.reject_threshold": given})


def test_the_webhook_url_and_its_path_are_secrets() -> None:
    from pipelines.config import load_config

    url = f"https://hooks.example.com/services/{HOOK_TOKEN}"
    config = load_config({"alerts.webhook_url": url})
    assert url in config.secrets and f"/services/{HOOK_TOKEN}" in config.secrets
    assert url not in repr(config)
