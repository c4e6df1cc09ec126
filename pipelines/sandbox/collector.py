"""A Segment-compatible HTTP collector on loopback (tracking API and Public API regulations)."""

from __future__ import annotations

import argparse
import base64
import threading
import time
import zlib
from collections import deque
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import orjson

from pipelines.sandbox.loopback import LoopbackServer

MAX_REQUEST_BYTES = 500_000
"""Segment answers 400 above 500 KB per request (measured decompressed; strict decimal KB)."""
MAX_MESSAGE_BYTES = 32 * 1024
"""Segment's per-message limit (measured on compact JSON)."""

_SINGLE_CALL_PATHS = {
    "/v1/track": "track", "/v1/identify": "identify", "/v1/group": "group", "/v1/alias": "alias"
}  # fmt: skip

REGULATIONS_PATH = "/regulations"
"""Segment's Public API: Create Workspace Regulation (bearer token, JSON body)."""
REGULATION_TYPES = frozenset(
    {
        "DELETE_ARCHIVE_ONLY", "DELETE_INTERNAL", "DELETE_ONLY", "SUPPRESS_ONLY",
        "SUPPRESS_WITH_DELETE", "SUPPRESS_WITH_DELETE_INTERNAL", "UNSUPPRESS",
    }
)  # fmt: skip
REGULATION_SUBJECT_TYPES = frozenset({"USER_ID", "ANONYMOUS_ID", "OBJECT_ID"})
MAX_REGULATION_SUBJECTS = 5000


class SegmentCollector(LoopbackServer):
    """Loopback stand-in for Segment's tracking API (`/v1/batch`, `/v1/track`, `/v1/identify`)
    and for the Public API's `POST /regulations` (bearer `public_api_token`).

    Like Segment, a wrong write key gets 200 and the data is dropped (counted in
    `dropped_wrong_key`). Faults: `inject`, `latency_ms`, `outage`, `drop_after_receive`,
    `reject_message_ids`.

    `journal`: a file every accepted message is appended to (one JSON line each, written before
    the 200) and read back at start, so what was received outlives this process: a soak that is
    stopped and resumed checks against everything Segment would have had.
    """

    def __init__(
        self,
        write_key: str = "sandbox_write_key",
        host: str = "127.0.0.1",
        port: int = 0,
        public_api_token: str = "sandbox_public_api_token",
        journal: Path | None = None,
    ) -> None:
        self.write_key = write_key
        self.public_api_token = public_api_token
        self.host = host
        self.port = port
        self.latency_ms: float = 0
        self.reject_message_ids: set[str] = set()
        self._lock = threading.Lock()
        self._faults: deque[tuple[int, float | None]] = deque()
        self._outage: tuple[int, float | None] | None = None
        self._drops = 0
        self.journal: Path | None = None
        self.reset()
        if journal is not None:
            self.journal = journal
            if journal.exists():
                self._messages.extend(_read_journal(journal))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"collector": self})

    # --- faults --------------------------------------------------------------------------------

    def inject(self, status: int = 500, times: int = 1, retry_after: float | None = None) -> None:
        """Answer the next `times` requests with `status` (and `Retry-After` if given)."""
        with self._lock:
            self._faults.extend([(status, retry_after)] * times)

    def outage(self, on: bool = True, status: int = 503, retry_after: float | None = None) -> None:
        """Answer every request with `status` until lifted: a long outage simulated by state."""
        with self._lock:
            self._outage = (status, retry_after) if on else None

    def drop_after_receive(self, times: int = 1) -> None:
        """Store the next `times` batches, then close the connection without answering."""
        with self._lock:
            self._drops += times

    def stop_dropping(self) -> None:
        """Answer every batch again (cancel the drops `drop_after_receive` left)."""
        with self._lock:
            self._drops = 0

    def reset(self) -> None:
        """Forget everything received and every pending fault."""
        with self._lock:
            self._messages: list[dict[str, Any]] = []
            self.requests = 0
            self.bytes_received = 0
            self.accepted_body_bytes: list[int] = []
            self.batch_sizes: list[int] = []
            self.first_received_at: dict[str, float] = {}
            """messageId -> time.time() of its first acceptance (for latency figures)."""
            self.status_counts: dict[int, int] = {}
            self.dropped_wrong_key = 0
            self.regulations: list[dict[str, Any]] = []
            self._faults.clear()
            self._outage = None
            self._drops = 0
            if self.journal is not None:
                self.journal.write_bytes(b"")

    # --- what was received ---------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every accepted message in arrival order (repeats included)."""
        with self._lock:
            return list(self._messages)

    def tracks(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "track"]

    def identifies(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "identify"]

    def groups(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "group"]

    def aliases(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "alias"]

    def message_ids(self) -> list[str]:
        """messageIds of every accepted message, repeats included."""
        return [m.get("messageId") for m in self.messages]

    def regulation_requests(self) -> list[dict[str, Any]]:
        """Every Public API regulation request: status, body (parsed), regulateId if accepted."""
        with self._lock:
            return [dict(r) for r in self.regulations]

    def _record_regulation(self, entry: dict[str, Any]) -> None:
        with self._lock:
            entry["regulate_id"] = (
                f"reg_{len(self.regulations) + 1:06d}" if entry["status"] == 200 else None
            )
            self.regulations.append(entry)

    def stats(self) -> dict[str, Any]:
        """Counters as plain JSON-able values (also served at `GET /_stats`)."""
        with self._lock:
            return {
                "requests": self.requests,
                "bytes_received": self.bytes_received,
                "messages": len(self._messages),
                "batch_sizes": list(self.batch_sizes),
                "accepted_body_bytes": list(self.accepted_body_bytes),
                "status_counts": {str(k): v for k, v in self.status_counts.items()},
                "dropped_wrong_key": self.dropped_wrong_key,
            }

    # --- request handling (called by the handler threads) --------------------------------------

    def _next_fault(self) -> tuple[int, float | None] | None:
        with self._lock:
            if self._outage is not None:
                return self._outage
            if self._faults:
                return self._faults.popleft()
        return None

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops > 0:
                self._drops -= 1
                return True
        return False

    def _count(self, status: int, wire_bytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_received += wire_bytes
            self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def _store(self, batch: list[dict[str, Any]], body_bytes: int, key_ok: bool) -> None:
        with self._lock:
            if not key_ok:
                self.dropped_wrong_key += len(batch)
                return
            self._messages.extend(batch)
            if self.journal is not None:
                with self.journal.open("ab") as out:
                    out.write(b"".join(orjson.dumps(m) + b"\n" for m in batch))
            now = time.time()
            for message in batch:  # latency figures: when Segment would first have had it
                self.first_received_at.setdefault(message.get("messageId"), now)
            self.batch_sizes.append(len(batch))
            self.accepted_body_bytes.append(body_bytes)


def _read_journal(journal: Path) -> list[dict[str, Any]]:
    """The messages a journal holds. A last line cut short (the process killed while writing
    it: that batch got no 200, so its sender sends it again) is cut off the file."""
    data = journal.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with journal.open("r+b") as out:
            out.truncate(len(whole))
    return [orjson.loads(line) for line in whole.splitlines() if line.strip()]


def _invalid(batch: list[Any]) -> str | None:
    """Why Segment would answer 400 for this batch, or None."""
    for msg in batch:
        if not isinstance(msg, dict):
            return "message is not an object"
        if len(orjson.dumps(msg)) > MAX_MESSAGE_BYTES:
            return f"message {msg.get('messageId')} exceeds 32 KB"
        if not (msg.get("userId") or msg.get("anonymousId")):
            return "userId or anonymousId is required"
        if msg.get("type") == "track" and not msg.get("event"):
            return "track requires event"
        if msg.get("type") == "group" and not msg.get("groupId"):
            return "group requires groupId"
        if msg.get("type") == "alias" and not msg.get("previousId"):
            return "alias requires previousId"
    return None


def _invalid_regulation(body: Any) -> str | None:
    """Why the Public API would refuse this regulation body, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if body.get("regulationType") not in REGULATION_TYPES:
        return f"regulationType must be one of {sorted(REGULATION_TYPES)}"
    if body.get("subjectType") not in REGULATION_SUBJECT_TYPES:
        return f"subjectType must be one of {sorted(REGULATION_SUBJECT_TYPES)}"
    ids = body.get("subjectIds")
    if not isinstance(ids, list) or not ids or len(ids) > MAX_REGULATION_SUBJECTS:
        return f"subjectIds must list 1 to {MAX_REGULATION_SUBJECTS} ids"
    if not all(isinstance(i, str) and i for i in ids):
        return "subjectIds must be non-empty strings"
    unknown = set(body) - {"regulationType", "subjectType", "subjectIds"}
    if unknown:
        return f"unknown fields: {sorted(unknown)}"
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Segment's clients expect
    wbufsize = 1 << 16  # headers and body in one segment: no Nagle/delayed-ACK stall
    disable_nagle_algorithm = True
    collector: SegmentCollector

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    def _answer(self, status: int, payload: dict[str, Any], retry_after: float | None = None):
        body = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", str(int(retry_after)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/_stats":
            self._answer(200, self.collector.stats())
        else:
            self._answer(404, {"code": "not_found", "message": "not found"})

    def do_POST(self) -> None:
        c = self.collector
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if c.latency_ms:
            time.sleep(c.latency_ms / 1000)
        if self.path == "/_reset":
            c.reset()
            self._answer(200, {"success": True})
            return
        if self.path == REGULATIONS_PATH:
            self._regulation(raw)
            return
        if self.path != "/v1/batch" and self.path not in _SINGLE_CALL_PATHS:
            c._count(404, len(raw))
            self._answer(404, {"code": "not_found", "message": "not found"})
            return
        fault = c._next_fault()
        if fault is not None:
            status, retry_after = fault
            c._count(status, len(raw))
            self._answer(status, {"code": "injected", "message": "injected fault"}, retry_after)
            return
        status, payload = self._parse(raw)
        if status != 200:
            c._count(status, len(raw))
            self._answer(status, payload)
            return
        batch, body_bytes, key_ok = payload["batch"], payload["size"], payload["key_ok"]
        c._store(batch, body_bytes, key_ok)
        c._count(200, len(raw))
        if key_ok and c._take_drop():
            # Delivered but not acknowledged: the client sees a dropped connection.
            self.close_connection = True
            return
        self._answer(200, {"success": True})

    def _regulation(self, raw: bytes) -> None:
        """Create Workspace Regulation, as Segment's Public API documents it."""
        c = self.collector
        fault = c._next_fault()
        if fault is not None:
            c._count(fault[0], len(raw))
            self._answer(fault[0], {"errors": [{"type": "injected", "message": "injected"}]})
            return
        token_ok = self.headers.get("Authorization", "") == f"Bearer {c.public_api_token}"
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        status, message = (401, "invalid or missing token") if not token_ok else (200, "")
        if token_ok:
            reason = _invalid_regulation(body)
            if reason:
                status, message = 400, reason
        entry = {"status": status, "body": body, "authorized": token_ok}
        c._record_regulation(entry)
        c._count(status, len(raw))
        if status != 200:
            kind = "unauthorized" if status == 401 else "validation"
            self._answer(status, {"errors": [{"type": kind, "message": message}]})
        else:
            self._answer(200, {"data": {"regulateId": entry["regulate_id"]}})

    def _parse(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        c = self.collector
        body = raw
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            try:
                body = zlib.decompressobj(wbits=31).decompress(raw, MAX_REQUEST_BYTES + 1)
            except (zlib.error, OSError):
                return 400, {"code": "invalid_request", "message": "invalid gzip body"}
        if len(body) > MAX_REQUEST_BYTES:
            return 400, {"code": "request_too_large", "message": "request exceeds 500 KB"}
        try:
            data = orjson.loads(body)  # strict: NaN and Infinity are invalid JSON
        except orjson.JSONDecodeError:
            return 400, {"code": "invalid_request", "message": "invalid JSON"}
        if not isinstance(data, dict):
            return 400, {"code": "invalid_request", "message": "body must be an object"}
        if self.path == "/v1/batch":
            batch = data.get("batch")
            if not isinstance(batch, list):
                return 400, {"code": "invalid_request", "message": "batch must be a list"}
        else:
            data.setdefault("type", _SINGLE_CALL_PATHS[self.path])
            batch = [data]
        reason = _invalid(batch)
        if reason is None and c.reject_message_ids:
            hit = [m.get("messageId") for m in batch if m.get("messageId") in c.reject_message_ids]
            reason = f"invalid message {hit[0]}" if hit else None
        if reason is not None:
            return 400, {"code": "invalid_request", "message": reason}
        return 200, {"batch": batch, "size": len(body), "key_ok": self._key(data) == c.write_key}

    def _key(self, data: dict[str, Any]) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                return base64.b64decode(auth[6:]).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                return None
        key = data.get("writeKey")
        return key if isinstance(key, str) else None


def main(argv: list[str] | None = None) -> None:
    """Run the collector in the foreground: `python -m pipelines.sandbox.collector --port 8766`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766, help="0 picks a free port")
    parser.add_argument("--write-key", default="sandbox_write_key")
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args(argv)
    collector = SegmentCollector(args.write_key, args.host, args.port)
    collector.latency_ms = args.latency_ms
    print(collector.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        collector.stop()


if __name__ == "__main__":
    main()
