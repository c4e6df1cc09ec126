"""`dodo-segment listen`: accept Dodo webhooks, keep them durably, and trigger short runs.

Each delivery is verified with the Standard Webhooks scheme Dodo signs with (`standardwebhooks`:
HMAC-SHA256 over `webhook-id.webhook-timestamp.body`, 5-minute tolerance), stored fsync'd in
the warehouse's webhook store, and only then answered 2xx. The listener never opens the
warehouse: it starts `dodo-segment run --webhook-only --wait` (the run lock keeps it from
overlapping a scheduled run), debounced so a burst of deliveries makes one run; deliveries that
came during a run start the next one as soon as it ends (the run was their debounce).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pipelines.commands.common import (
    Subcommands,
    add_command,
    add_common,
    flags,
    load_command_config,
)
from pipelines.config import ListenConfig
from pipelines.webhook_store import WebhookStore, store_folder

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Serve one HTTP endpoint for Dodo's webhooks (loopback by default: put it behind your TLS "
    "reverse proxy). Each delivery is verified with DODO_PAYMENTS_WEBHOOK_KEY (Standard "
    "Webhooks), stored durably beside the warehouse and answered 2xx; a burst of deliveries then "
    "starts one `run --webhook-only`, which waits for a scheduled run to finish."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`listen` and its flags."""
    parser = add_command(
        commands, "listen", summary, DESCRIPTION, handle,
        "example:\n  DODO_PAYMENTS_WEBHOOK_KEY=whsec_... dodo-segment listen --port 8787",
    )  # fmt: skip
    add_common(parser)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; [listen] host)")
    parser.add_argument("--port", type=int, help="port (default 8787; [listen] port)")
    parser.add_argument(
        "--path", help="the endpoint's path (default /webhooks/dodo; [listen] path)"
    )


def handle(args: argparse.Namespace) -> int:
    """Serve the webhook endpoint with the listener's settings."""
    from pipelines.config import load_listen_config

    config = load_command_config(args)
    return serve(load_listen_config(config, flags(args)))


MAX_CONNECTIONS = 64
"""Connections served at once (a thread each); more wait in the kernel's accept queue, so a
flood costs the listener a bounded number of threads and buffers, whatever the backlog."""


IDLE_CONNECTION_SECONDS = 5.0
"""A connection silent this long is closed (its thread freed for the next sender)."""


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most MAX_CONNECTIONS handler threads at a time."""

    request_queue_size = 256
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # the accept loop waits here while every slot is busy
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Listener:
    """The HTTP server, the store and the run trigger of one `dodo-segment listen`."""

    def __init__(
        self,
        settings: ListenConfig,
        run_command: list[str] | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.worker_env = worker_env
        """The worker's environment (default: the listener's own)."""
        self.run_command = run_command or [
            sys.executable, "-m", "pipelines.cli", "run", "--webhook-only", "--wait",
            "--serve-stdin", "--db", settings.warehouse_path,
        ]  # fmt: skip
        """The worker: this Python's `dodo-segment run --webhook-only --wait`, one run per line
        on its stdin, so the imports (~1.5 s of a run at 100k payments) are paid once."""
        self._worker: subprocess.Popen[str] | None = None
        self.webhook = Webhook(settings.webhook_key)
        self.store = WebhookStore(store_folder(settings.warehouse_path)).ensure()
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.started_at = datetime.now(UTC).isoformat()
        self.last_delivery_at: str | None = None
        self.runs: Counter[str] = Counter()
        self._wake = threading.Condition()
        self._first_unrun: float | None = None
        self._last_delivery = 0.0
        self._not_before = 0.0
        self._last_run_ended = float("-inf")
        self._stop = threading.Event()
        self.server = _BoundedServer((settings.host, settings.port), _handler(self))
        self._trigger = threading.Thread(target=self._trigger_loop, name="run-trigger", daemon=True)

    @property
    def address(self) -> str:
        """`http://host:port/path` as bound (port 0 becomes the real port)."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{self.settings.path}"

    # --- intake ------------------------------------------------------------------------------

    def accept(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """Verify, parse and store one delivery; the HTTP status and a short reason."""
        try:
            self.webhook.verify(body, headers, json_parse=False)
        except WebhookVerificationError as exc:
            reason = "stale or future timestamp" if "timestamp" in str(exc) else "bad signature"
            return self._reject(401, reason)
        except (ValueError, TypeError):  # malformed signature header or a body that is not UTF-8
            return self._reject(401, "bad signature")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._reject(400, "not JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            return self._reject(400, "not a Dodo webhook (no type)")
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        try:
            fresh = self.store.store(webhook_id, payload)
        except OSError as exc:  # disk full or read-only: Dodo retries later
            log.error("could not store a webhook delivery: %s", exc.strerror or exc)
            return self._reject(503, "store unavailable")
        self.counters["received" if fresh else "duplicates"] += 1
        self.last_delivery_at = datetime.now(UTC).isoformat()
        if fresh:
            self._delivered()
        return 200, "stored" if fresh else "duplicate"

    def _reject(self, status: int, reason: str) -> tuple[int, str]:
        self.counters["rejected"] += 1
        self.rejected[reason] += 1
        log.warning("webhook refused (%d): %s", status, reason)
        return status, reason

    def _delivered(self) -> None:
        with self._wake:
            now = time.monotonic()
            self._last_delivery = now
            if self._first_unrun is None:
                self._first_unrun = now
            self._wake.notify()

    # --- runs --------------------------------------------------------------------------------

    def _due(self, now: float) -> bool:
        if self._first_unrun is None or now < self._not_before:
            return False
        if self._first_unrun <= self._last_run_ended:
            return True  # they came during the last run: its length was their debounce
        quiet = now - self._last_delivery >= self.settings.debounce_seconds
        return quiet or now - self._first_unrun >= self.settings.max_delay_seconds

    def _trigger_loop(self) -> None:
        if self.store.pending_count():  # deliveries a crash or a failed run left behind
            self._first_unrun = self._last_delivery = 0.0
        while not self._stop.is_set():
            with self._wake:
                while not self._stop.is_set() and not self._due(time.monotonic()):
                    self._wake.wait(timeout=0.1)
                if self._stop.is_set():
                    return
                self._first_unrun = None
            self._write_counters()
            code = self._run_once()
            self._last_run_ended = time.monotonic()
            if code not in (0, 3) and self.store.pending_count():
                with self._wake:  # a failed run: the deliveries stay pending; try again later
                    self._not_before = time.monotonic() + self.settings.retry_seconds
                    self._first_unrun = self._first_unrun or self._not_before
            self._write_counters()

    def _run_in_worker(self) -> int:
        """One run in the worker process (started, or restarted after it died, as needed)."""
        if self._worker is None or self._worker.poll() is not None:
            self._worker = subprocess.Popen(
                self.run_command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=self.worker_env,
            )  # fmt: skip
        worker = self._worker
        assert worker.stdin is not None and worker.stdout is not None
        try:
            worker.stdin.write("run\n")
            worker.stdin.flush()
        except OSError:
            self._worker = None
            return 1
        for line in worker.stdout:
            done = line.startswith("exit ")
            if done:
                return int(line.split()[1])
            print(line, end="", flush=True)  # the run's summary line, as a run prints it
        self._worker = None  # it died mid-run: the deliveries stay pending
        return 1

    def _run_once(self) -> int:
        started = time.monotonic()
        try:
            code = self._run_in_worker()
        except OSError as exc:
            log.error("could not start a run: %s", exc.strerror or exc)
            code = 1
        self.runs["ok" if code in (0, 3) else "failed"] += 1
        log.info("webhook-triggered run ended with exit code %d in %.1fs", code,
                 time.monotonic() - started)  # fmt: skip
        return code

    def _write_counters(self) -> None:
        try:
            self.store.write_counters(
                {
                    "started_at": self.started_at,
                    "address": self.address,
                    "last_delivery_at": self.last_delivery_at,
                    **self.counters,
                    "rejected_by_reason": dict(self.rejected),
                    "runs": dict(self.runs),
                }  # fmt: skip
            )
        except OSError as exc:
            log.warning("could not write the listener's counters: %s", exc.strerror or exc)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Listener:
        """Serve in background threads (tests and `serve_forever`)."""
        threading.Thread(target=self.server.serve_forever, name="listener", daemon=True).start()
        self._trigger.start()
        self._write_counters()
        return self

    def stop(self) -> None:
        """Stop accepting; a run already started goes on to its end on its own."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self.server.shutdown()
        self.server.server_close()
        if self._worker is not None and self._worker.poll() is None:
            self._worker.stdin.close()  # it ends after the run in progress, if any
            try:
                self._worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._worker.kill()
        self._write_counters()


def _handler(listener: Listener) -> type[BaseHTTPRequestHandler]:
    settings = listener.settings

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IDLE_CONNECTION_SECONDS  # an idle keep-alive connection gives its slot back

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per refusal is logged by the listener; headers hold the signature

        def _answer(self, status: int, reason: str) -> None:
            body = orjson.dumps({"status": reason})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] != settings.path:
                self.close_connection = True
                return self._answer(404, "not found")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._answer(411, "length required")
            if length < 0 or length > settings.max_body_bytes:
                self.close_connection = True  # the body is not read
                listener.counters["rejected"] += 1
                listener.rejected["body too large"] += 1
                return self._answer(413, "body too large")
            body = self.rfile.read(length)
            status, reason = listener.accept(dict(self.headers.items()), body)
            self._answer(status, reason)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(405 if self.path == settings.path else 404, "POST webhooks here")

    return Handler


def serve(settings: ListenConfig) -> int:
    """Run the listener in the foreground until SIGTERM or Ctrl-C."""
    listener = Listener(settings).start()
    log.info("listening for Dodo webhooks at %s", listener.address)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("listener stopping")
    finally:
        listener.stop()
    return 0
