"""Logging for the job: readable text or one JSON object per line, with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

_SECRETS: list[str] = []
REDACTED = "***"


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


def setup_logging(log_format: str = "text", verbose: bool = False) -> None:
    """Route all logging (ours and dlt's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ScrubbingFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("dlt", "segment", "urllib3", "backoff", "analytics"):
        noisy = logging.getLogger(name)
        noisy.handlers[:] = []
        noisy.filters[:] = [_ScrubbingFilter()]
        noisy.propagate = True
        noisy.setLevel(logging.INFO if verbose else logging.WARNING)
