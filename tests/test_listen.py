"""Webhook-triggered runs, through the real CLI: `dodo-segment listen` and `run --webhook-only`.

The sandbox business advances, the sandbox sends signed webhooks of what changed (some twice,
out of order) to the listener started as a subprocess, and the collector shows what Segment got.
"""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import requests

from pipelines.sandbox.webhooks import WebhookSender, changes_since, snapshot
from pipelines.webhook_store import WebhookStore, store_folder
from tests.conftest import Sandbox, make_sandbox, run_cli

SECRET = "whsec_" + base64.b64encode(b"sandbox webhook signing key 32b!").decode()


@pytest.fixture()
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    yield from make_sandbox(tmp_path, customers=60)


class ListenerProcess:
    """`dodo-segment listen` on a free loopback port, its stderr kept for the secret check."""

    def __init__(self, sandbox: Sandbox, **env: str) -> None:
        exe = Path(sys.executable).with_name("dodo-segment")
        self.env = sandbox.env(DODO_PAYMENTS_WEBHOOK_KEY=SECRET, **env)
        self.process = subprocess.Popen(
            [str(exe), "listen", "--port", "0"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            self.lines.append(line)
            found = re.search(r"listening for Dodo webhooks at (\S+)", line)
            if found:
                self.url = found.group(1)
                return
            if not line and self.process.poll() is not None:
                break
        raise AssertionError(f"listener did not start: {''.join(self.lines)}")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        self.process.send_signal(sig)
        out, err = self.process.communicate(timeout=120)
        return "".join(self.lines) + out + err


def wait_until_merged(sandbox: Sandbox, runs: int, timeout: float = 180) -> dict:
    """Wait until nothing is pending and the listener has finished `runs` runs."""
    store = WebhookStore(store_folder(sandbox.db))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = store.read_counters() or {}
        done = sum((counters.get("runs") or {}).values())
        if store.pending_count() == 0 and done >= runs:
            return counters
        time.sleep(0.2)
    raise AssertionError(f"deliveries not merged in time: {store.read_counters()}")


def first_sync(sandbox: Sandbox) -> None:
    result = run_cli("run", env=sandbox.env())
    assert result.returncode in (0, 3), result.stderr
    sandbox.collector.reset()


def newly_succeeded(before: dict, payloads: list[dict]) -> set[str]:
    """Payments that reached `succeeded` in the deliveries (not those only updated since)."""
    was = {k: orjson.loads(v)["status"] for k, v in before["payments"].items()}
    return {
        p["data"]["payment_id"]
        for p in payloads
        if p["type"] == "payment.succeeded" and was.get(p["data"]["payment_id"]) != "succeeded"
    }


def payment_events(sandbox: Sandbox) -> Counter[tuple[str, str]]:
    return Counter(
        (m["event"], m["properties"].get("payment_id"))
        for m in sandbox.collector.tracks()
        if m["properties"].get("payment_id")
    )


@pytest.mark.slow
def test_deliveries_become_events_once_without_reading_the_api(sandbox: Sandbox) -> None:
    first_sync(sandbox)
    listener = ListenerProcess(sandbox)
    try:
        before = snapshot(sandbox.business)
        sandbox.business.advance_time(days=1, seed=3)
        payloads = changes_since(before, sandbox.business)
        succeeded = newly_succeeded(before, payloads)
        assert succeeded, "the sandbox day produced no succeeded payment to deliver"
        sandbox.simulator.reset_counts()
        sender = WebhookSender(listener.url, SECRET, seed=5, duplicate_share=0.3, shuffle=True)
        report = sender.deliver(payloads)
        assert report.failed == [] and report.duplicates > 0
        counters = wait_until_merged(sandbox, runs=1)
        assert counters["received"] == len(payloads)
        assert counters["duplicates"] == report.duplicates
        # no API request was needed for what the webhooks carried
        assert sandbox.simulator.request_counts_by_endpoint() == {}
        completed = {p for (e, p), n in payment_events(sandbox).items() if e == "Payment Completed"}
        assert succeeded <= completed
        # a scheduled run afterwards (it reads the API) sends none of them again
        result = run_cli("run", env=sandbox.env(DODO_PAYMENTS_WEBHOOK_KEY=SECRET))
        assert result.returncode in (0, 3), result.stderr
        ids = sandbox.collector.message_ids()
        assert len(ids) == len(set(ids))
        assert all(n == 1 for n in payment_events(sandbox).values())
    finally:
        output = listener.stop()
    assert SECRET not in output and SECRET[6:] not in output
    status = run_cli("status", env=sandbox.env(DODO_PAYMENTS_WEBHOOK_KEY=SECRET))
    assert status.returncode == 0, status.stderr
    assert "webhooks:" in status.stdout and "pending 0" in status.stdout
    assert SECRET not in status.stdout + status.stderr


def signed(webhook_id: str, body: bytes, at: datetime, secret: str = SECRET) -> dict[str, str]:
    sender = WebhookSender("http://unused", secret)
    headers = sender.signed(webhook_id, body.decode("utf-8", "replace"))
    headers["webhook-timestamp"] = str(int(at.timestamp()))
    headers["webhook-signature"] = sender.webhook.sign(
        webhook_id, at, body.decode("utf-8", "replace")
    )
    return headers


@pytest.mark.slow
def test_bad_deliveries_are_refused_and_nothing_is_stored(sandbox: Sandbox) -> None:
    listener = ListenerProcess(sandbox, LISTEN__MAX_BODY_BYTES="2000")
    now = datetime.now(UTC)
    good = orjson.dumps({"type": "payment.succeeded", "timestamp": now.isoformat(), "data": {}})
    other_secret = "whsec_" + base64.b64encode(b"somebody else's key, 32 bytes!!").decode()
    cases = {
        "bad signature": (good, signed("msg_a", good, now, other_secret), 401),
        "no signature": (good, {"webhook-id": "msg_b", "webhook-timestamp": "1"}, 401),
        "stale": (good, signed("msg_c", good, now - timedelta(minutes=10)), 401),
        "oversized": (b"{" + b" " * 3000 + b"}", signed("msg_d", b"{}", now), 413),
        "not json": (b"payment!", signed("msg_e", b"payment!", now), 400),
        "not an object": (b"[1, 2]", signed("msg_f", b"[1, 2]", now), 400),
    }
    try:
        for name, (body, headers, status) in cases.items():
            answer = requests.post(listener.url, data=body, headers=headers, timeout=10)
            assert answer.status_code == status, name
        store = WebhookStore(store_folder(sandbox.db))
        assert store.pending_count() == 0
        assert list(store.merged_dir.iterdir()) == []
    finally:
        output = listener.stop()
    counters = WebhookStore(store_folder(sandbox.db)).read_counters()
    assert counters["rejected"] == len(cases) and counters.get("received", 0) == 0
    assert SECRET not in output


@pytest.mark.slow
def test_a_listener_killed_after_answering_loses_nothing(sandbox: Sandbox) -> None:
    first_sync(sandbox)
    # no run starts before the kill: the delivery must survive in the store alone
    listener = ListenerProcess(
        sandbox, LISTEN__DEBOUNCE_SECONDS="600", LISTEN__MAX_DELAY_SECONDS="600"
    )
    before = snapshot(sandbox.business)
    sandbox.business.advance_time(days=1, seed=4)
    payloads = changes_since(before, sandbox.business)
    succeeded = newly_succeeded(before, payloads)
    report = WebhookSender(listener.url, SECRET).deliver(payloads)
    assert report.failed == []
    listener.stop(signal.SIGKILL)
    assert WebhookStore(store_folder(sandbox.db)).pending_count() == len(payloads)
    # the next run (here a webhook-only one, as a restarted listener would start) merges them
    result = run_cli("run", "--webhook-only", env=sandbox.env())
    assert result.returncode in (0, 3), result.stderr
    assert WebhookStore(store_folder(sandbox.db)).pending_count() == 0
    completed = {p for (e, p), _ in payment_events(sandbox).items() if e == "Payment Completed"}
    assert succeeded <= completed
    # and the scheduled run that reads the API sends nothing twice
    result = run_cli("run", env=sandbox.env())
    assert result.returncode in (0, 3), result.stderr
    ids = sandbox.collector.message_ids()
    assert len(ids) == len(set(ids))


@pytest.mark.slow
def test_an_older_webhook_never_overwrites_a_newer_api_state(sandbox: Sandbox) -> None:
    first_sync(sandbox)
    sub = next(s for s in sandbox.business.subscriptions if s["status"] == "active")
    stale = {"business_id": "bus_sandbox", "type": "subscription.on_hold",
             "timestamp": (sandbox.business.now - timedelta(days=2)).isoformat(),
             "data": {**sub, "status": "on_hold"}}  # fmt: skip
    store = WebhookStore(store_folder(sandbox.db)).ensure()
    assert store.store("msg_stale", stale)
    result = run_cli("run", "--webhook-only", "--skip-emit", env=sandbox.env())
    assert result.returncode in (0, 3), result.stderr
    import duckdb

    with duckdb.connect(sandbox.db, read_only=True) as con:
        status = con.execute(
            "select status from dodo_raw.subscriptions where subscription_id = ?",
            [sub["subscription_id"]],
        ).fetchone()[0]
        history = con.execute(
            "select count(*) from dodo_raw.subscription_history "
            "where subscription_id = ? and status = 'on_hold'",
            [sub["subscription_id"]],
        ).fetchone()[0]
    assert status == "active" and history == 0
    assert store.pending_count() == 0


@pytest.mark.slow
def test_listen_needs_the_secret(sandbox: Sandbox) -> None:
    env = sandbox.env()
    env.pop("DODO_PAYMENTS_WEBHOOK_KEY", None)
    result = run_cli("listen", "--port", "0", env=env, timeout=60)
    assert result.returncode == 2
    assert "DODO_PAYMENTS_WEBHOOK_KEY is not set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_runs_of_the_listener_never_overlap_a_scheduled_run(sandbox: Sandbox) -> None:
    first_sync(sandbox)
    listener = ListenerProcess(sandbox, LISTEN__DEBOUNCE_SECONDS="0.2")
    try:
        before = snapshot(sandbox.business)
        sandbox.business.advance_time(days=1, seed=6)
        payloads = changes_since(before, sandbox.business)
        exe = Path(sys.executable).with_name("dodo-segment")
        scheduled = subprocess.Popen(
            [str(exe), "run", "--wait"], env=sandbox.env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        WebhookSender(listener.url, SECRET, seed=2, duplicate_share=0.5, shuffle=True).deliver(
            payloads
        )
        _, err = scheduled.communicate(timeout=300)
        assert scheduled.returncode in (0, 3), err
        wait_until_merged(sandbox, runs=1)
    finally:
        listener.stop()
    ids = sandbox.collector.message_ids()
    assert len(ids) == len(set(ids))
    succeeded = newly_succeeded(before, payloads)
    completed = {p for (e, p), _ in payment_events(sandbox).items() if e == "Payment Completed"}
    assert succeeded <= completed


@pytest.mark.slow
def test_doctor_checks_the_secret_once_the_listener_is_used(sandbox: Sandbox) -> None:
    env = sandbox.env()
    env.pop("DODO_PAYMENTS_WEBHOOK_KEY", None)
    quiet = run_cli("doctor", env=env)
    assert "webhooks" not in quiet.stdout  # not in use: no line
    WebhookStore(store_folder(sandbox.db)).ensure().write_counters({"received": 0})
    missing = run_cli("doctor", env=env)
    assert missing.returncode == 1
    assert re.search(
        r"^FAIL webhooks +.*DODO_PAYMENTS_WEBHOOK_KEY is not set", missing.stdout, re.M
    )
    bad = run_cli("doctor", env={**env, "DODO_PAYMENTS_WEBHOOK_KEY": "whsec_%%%not-base64"})
    assert re.search(r"^FAIL webhooks +.*not a signing secret", bad.stdout, re.M)
    assert "%%%not-base64" not in bad.stdout + bad.stderr
    good = run_cli("doctor", env={**env, "DODO_PAYMENTS_WEBHOOK_KEY": SECRET})
    assert re.search(r"^ok   webhooks +webhook signing secret is set", good.stdout, re.M)
    assert SECRET not in good.stdout + good.stderr


@pytest.mark.slow
def test_a_forgotten_customer_leaves_the_webhook_store_and_never_comes_back(
    sandbox: Sandbox,
) -> None:
    first_sync(sandbox)
    business = sandbox.business
    sub = next(s for s in business.subscriptions if s["status"] == "active")
    customer_id, email = sub["customer"]["customer_id"], sub["customer"]["email"]
    store = WebhookStore(store_folder(sandbox.db)).ensure()
    payload = {"business_id": "bus_sandbox", "type": "subscription.updated",
               "timestamp": (business.now + timedelta(minutes=1)).isoformat(),
               "data": {**sub, "quantity": sub["quantity"] + 1}}  # fmt: skip
    assert store.store("msg_before_forget", payload)
    result = run_cli("forget", customer_id, env=sandbox.env())
    assert result.returncode == 0, result.stderr
    assert (
        email
        not in (store.pending_dir / f"{store.file_name('msg_before_forget')}.json").read_text()
    )
    # a delivery after the forget still carries the email: it is not stored in the warehouse
    later = {**payload, "timestamp": (business.now + timedelta(minutes=2)).isoformat()}
    assert store.store("msg_after_forget", later)
    result = run_cli("run", "--webhook-only", env=sandbox.env())
    assert result.returncode in (0, 3), result.stderr
    import duckdb

    with duckdb.connect(sandbox.db, read_only=True) as con:
        row = con.execute(
            "select quantity, customer__email from dodo_raw.subscriptions where subscription_id = ?",
            [sub["subscription_id"]],
        ).fetchone()
    assert row == (sub["quantity"] + 1, None)
    assert all(m.get("userId") != customer_id for m in sandbox.collector.messages)


def test_deliveries_that_came_during_a_run_start_the_next_one_when_it_ends(
    tmp_path: Path,
) -> None:
    """The debounce waits for a quiet moment after deliveries that find the listener idle; those
    that came while a run was going have waited out that run, and start the next one at once."""
    from pipelines.commands.listen import Listener
    from pipelines.config import ListenConfig

    settings = ListenConfig(
        webhook_key=SECRET, warehouse_path=str(tmp_path / "w.duckdb"), port=0,
        debounce_seconds=60, max_delay_seconds=600,
    )  # fmt: skip
    listener = Listener(settings)
    try:
        now = time.monotonic()
        listener._last_run_ended = now - 10  # a run ended ten seconds ago
        listener._first_unrun = listener._last_delivery = now - 1  # idle since, then a delivery
        assert not listener._due(now)  # the debounce holds it
        listener._first_unrun = now - 11  # this one came during that run
        assert listener._due(now)
        listener._not_before = now + 30  # after a failed run the retry wait still holds
        assert not listener._due(now)
    finally:
        listener.server.server_close()
