"""Logging for the job: readable text or one JSON object per line, with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_SECRETS: list[str] = []
REDACTED = "***"
_FORMAT = {"value": "text"}

PROGRESS_EVERY_SECONDS = 10.0
"""Plain progress lines at most this often (DODO_SEGMENT_PROGRESS_SECONDS overrides)."""

log = logging.getLogger("dodo_segment")


def register_secrets(values: Iterable[str]) -> None:
    """Remember secret values so no log line, error or summary ever prints them."""
    for value in values:
        if value and len(value) >= 4 and value not in _SECRETS:
            _SECRETS.append(value)


def scrub(text: str) -> str:
    """Replace every registered secret in a text."""
    for secret in _SECRETS:
        text = text.replace(secret, REDACTED)
    return text


class _ScrubbingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = scrub(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return "when merging arrow schema with dlt schema" not in message


class _ArrowHintNoise(logging.Filter):
    """dlt warns on every page that our JSON columns arrive as Arrow strings: expected, silenced."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "when merging arrow schema with dlt schema" not in record.getMessage()


def quiet_dlt() -> None:
    """Drop dlt's per-page warning about JSON hints on Arrow string columns."""
    dlt_logger = logging.getLogger("dlt")
    if not any(isinstance(f, _ArrowHintNoise) for f in dlt_logger.filters):
        dlt_logger.addFilter(_ArrowHintNoise())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("run_id", "step", "figures"):
            if hasattr(record, key):
                document[key] = getattr(record, key)
        if record.exc_text:
            document["error"] = record.exc_text
        return json.dumps(document, default=str, ensure_ascii=False)


LOG_WRITE_FAILURES = {"count": 0}
"""Log lines that could not be written (a full disk under a redirected stderr)."""


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr; a line that cannot be written is counted, never a traceback or a crash."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        LOG_WRITE_FAILURES["count"] += 1


def log_write_failures() -> int:
    """How many log lines could not be written in this process."""
    return LOG_WRITE_FAILURES["count"]


def setup_logging(log_format: str = "text", verbose: bool = False) -> None:
    """Route all logging (ours and dlt's) to stderr in the chosen format."""
    handler = _LogHandler(sys.stderr)
    handler.addFilter(_ScrubbingFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    _FORMAT["value"] = log_format
    logging.captureWarnings(True)  # warnings too go through the handler (one JSON per line)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("dlt", "segment", "urllib3", "backoff", "analytics"):
        noisy = logging.getLogger(name)
        noisy.handlers[:] = []
        noisy.filters[:] = [_ScrubbingFilter()]
        noisy.propagate = True
        noisy.setLevel(logging.INFO if verbose else logging.WARNING)


def json_mode() -> bool:
    """Whether output is one JSON object per line (--log-format json)."""
    return _FORMAT["value"] == "json"


def say(text: str, **figures: Any) -> None:
    """One result line on stdout: the text, or with --log-format json a JSON object."""
    text = scrub(text)
    if json_mode():
        document = {"time": datetime.now(UTC).isoformat(), "message": text, **figures}
        print(scrub(json.dumps(document, default=str, ensure_ascii=False)), flush=True)
    else:
        print(text, flush=True)


def complain(text: str) -> None:
    """One error line on stderr (`dodo-segment: ...`), a JSON object in JSON mode."""
    text = scrub(text)
    if json_mode():
        document = {"time": datetime.now(UTC).isoformat(), "level": "error", "message": text}
        line = json.dumps(document, ensure_ascii=False)
    else:
        line = f"dodo-segment: {text}"
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr on a full disk: the exit code still says it
        LOG_WRITE_FAILURES["count"] += 1


def _progress_every() -> float:
    try:
        return float(os.environ.get("DODO_SEGMENT_PROGRESS_SECONDS", PROGRESS_EVERY_SECONDS))
    except ValueError:
        return PROGRESS_EVERY_SECONDS


class Progress:
    """Progress of a long step (backfill, model build, send): a bar per kind on a terminal
    (`rich`), else a plain log line at most every few seconds, plus one when a kind completes."""

    def __init__(self, step: str, verb: str = "acknowledged") -> None:
        self.step = step
        self.verb = verb
        self.every = _progress_every()
        self._counts: dict[str, list[int]] = {}
        self._lock = threading.Lock()  # the extract's readers count pages from their threads
        self._started = time.monotonic()
        self._last: dict[str, float] = {}
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        if sys.stderr.isatty() and not json_mode():
            from rich.console import Console
            from rich.progress import MofNCompleteColumn
            from rich.progress import Progress as Bar

            # on stderr with the logs: stdout carries the one summary line
            self._bar = Bar(
                *Bar.get_default_columns(),
                MofNCompleteColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()

    def __call__(self, kind: str, done: int, total: int | None, note: str = "") -> None:
        """The emitter's progress callback: `done` of `total` (None: unknown) acknowledged;
        `note` is shown beside it (the model being built, the pages read)."""
        if self._bar is not None:
            label = f"{self.step}: {kind}" + (f" ({note})" if note else "")
            if kind not in self._tasks:
                self._tasks[kind] = self._bar.add_task(label, total=total)
            self._bar.update(self._tasks[kind], completed=done, total=total, description=label)
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        since = now - self._last.get(kind, self._started)
        if since < self.every and (not finished or kind not in self._last):
            return  # a send shorter than the interval needs no progress line at all
        self._last[kind] = now
        of = f"/{total}" if total is not None else ""
        log.info(
            "%s: %s %d%s %s%s",
            self.step,
            kind,
            done,
            of,
            self.verb,
            f" ({note})" if note else "",
            extra={"step": self.step, "figures": {"kind": kind, "done": done, "total": total}},
        )

    def count_page(self, resource: str, rows: int) -> None:
        """The extract's page callback: one more page of `rows` rows of `resource` read."""
        with self._lock:
            counts = self._counts.setdefault(resource, [0, 0])
            counts[0] += rows
            counts[1] += 1
            done, pages = counts
            self(resource, done, None, note=f"{pages} page{'s' if pages != 1 else ''}")

    def close(self) -> None:
        """Remove the bar, if any."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def heartbeat(step: str, what: str) -> Iterator[None]:
    """Log "still <what>" periodically while a long step runs (its own figures come at the end)."""
    every = _progress_every()
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(max(every, 0.5)):
            log.info(
                "%s: still %s (%.0fs so far)",
                step,
                what,
                time.monotonic() - started,
                extra={"step": step},
            )

    thread = threading.Thread(target=beat, name=f"{step}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)
