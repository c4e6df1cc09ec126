"""Alerts: one webhook POST when something needs a person, one when it clears, never a flood."""

from __future__ import annotations

import fcntl
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.config import AlertsConfig, AppConfig
from pipelines.lock import lock_path
from pipelines.logs import scrub

log = logging.getLogger("dodo_segment")

DELIVERY_TIMEOUT_SECONDS = 10.0
"""One attempt per alert and run: an undelivered alert is tried again by the next run."""

KINDS = (
    "run_failed",
    "data_test_failed",
    "rejections",
    "dodo_outage",
    "segment_outage",
    "long_lock",
    "model_drift",
)
"""The conditions, each open at most once until it clears."""

OUTAGE_KINDS = {"dodo": "dodo_outage", "segment": "segment_outage"}
"""RunReport.stopped_by -> the condition it opens."""


@dataclass
class Alert:
    """One condition as a webhook message: `text` for chat tools, the rest for machines."""

    kind: str
    text: str
    run_id: str | None = None
    exit_code: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def payload(self, state: str, warehouse_path: str) -> dict[str, Any]:
        """The JSON body: Slack/Mattermost read `text`, anything else the structured fields."""
        return {
            "text": scrub(self.text),
            "kind": self.kind,
            "state": state,
            "run_id": self.run_id,
            "exit_code": self.exit_code,
            "figures": self.figures,
            "error": scrub(self.error) if self.error else None,
            "warehouse": scrub(warehouse_path),
            "host": socket.gethostname(),
            "sent_at": datetime.now(UTC).isoformat(),
        }


def state_path(warehouse_path: str) -> Path:
    """The alert state file, beside the lock file (`<warehouse>.alerts.json`)."""
    return lock_path(warehouse_path).with_suffix(".alerts.json")


def open_alerts(warehouse_path: str) -> dict[str, dict[str, Any]]:
    """The conditions open now (kind -> since, run_id, notified); read-only, best effort."""
    try:
        data = json.loads(state_path(warehouse_path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    found = data.get("open") if isinstance(data, dict) else None
    return found if isinstance(found, dict) else {}


def deliver(url: str, payload: Mapping[str, Any]) -> str | None:
    """POST one alert; None when the endpoint took it, else why not (never the URL)."""
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT_SECONDS) as response:
            response.read()
        return None
    except urllib.error.HTTPError as exc:
        return f"the webhook answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        return f"the webhook is unreachable ({type(reason).__name__}: {reason})"
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        return f"the webhook is unreachable ({type(exc).__name__})"


def _send(config: AppConfig, alert: Alert, state: str) -> bool:
    reason = deliver(config.alerts.webhook_url, alert.payload(state, config.warehouse_path))
    if reason is None:
        log.info("alert sent: %s %s", alert.kind, state)
        return True
    # scrub: a URLError's reason may quote the host or path of the webhook
    log.warning(
        "could not deliver the %s alert (%s): %s; the next run tries again",
        alert.kind,
        state,
        scrub(reason),
    )
    return False


@contextmanager
def _state(warehouse_path: str) -> Iterator[dict[str, Any]]:
    """The state file, locked for the caller (a run and a skipped run may both evaluate)."""
    path = state_path(warehouse_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            data = json.loads(handle.read() or "{}")
        except ValueError:
            data = {}
        if not isinstance(data, dict) or not isinstance(data.get("open"), dict):
            data = {"open": {}}
        yield data
        text = json.dumps(data, default=str, indent=1)
        handle.seek(0)
        handle.truncate()
        handle.write(text)
        handle.flush()


def evaluate(
    config: AppConfig, firing: Mapping[str, Alert], evaluated: set[str], cleared_by: str
) -> None:
    """Send what changed: a condition that opens fires once, one that clears sends "recovered".

    `evaluated` are the kinds this caller can speak about (the others keep their state);
    `firing` those of them that hold now. Never raises: alerting must not fail the run.
    """
    if not config.alerts.webhook_url:
        return
    try:
        with _state(config.warehouse_path) as data:
            opened: dict[str, Any] = data["open"]
            for kind in sorted(evaluated):
                entry = opened.get(kind)
                if kind in firing:
                    if entry is None or not entry.get("notified"):
                        alert = firing[kind]
                        opened[kind] = {
                            "since": (entry or {}).get("since") or datetime.now(UTC).isoformat(),
                            "run_id": alert.run_id,
                            "notified": _send(config, alert, "firing"),
                        }
                elif entry is not None:
                    if not entry.get("notified"):  # nobody was told it opened: close quietly
                        del opened[kind]
                        continue
                    recovered = Alert(
                        kind=kind,
                        text=f"dodo-segment recovered: {_TITLES[kind]} cleared ({cleared_by})",
                        run_id=entry.get("run_id"),
                        figures={"open_since": entry.get("since")},
                    )
                    if _send(config, recovered, "recovered"):
                        del opened[kind]
    except Exception as exc:  # a read-only or full folder, or a bug: never the run's problem
        log.warning("alerts: could not evaluate or keep the alert state: %s", scrub(str(exc)))


_TITLES = {
    "run_failed": "the run failed",
    "data_test_failed": "an error data test blocked emission",
    "rejections": "rejected messages or quarantined rows above the threshold",
    "dodo_outage": "the Dodo Payments API was unavailable",
    "segment_outage": "Segment was unavailable",
    "long_lock": "a run has held the lock unusually long",
    "model_drift": "the models differed from a full build",
}


def _over_threshold(alerts: AlertsConfig, flagged: int, messages: int) -> bool:
    if alerts.reject_threshold_is_share:
        return messages > 0 and flagged / messages > alerts.reject_threshold
    return flagged > alerts.reject_threshold


def run_conditions(
    alerts: AlertsConfig, run: Mapping[str, Any]
) -> tuple[dict[str, Alert], set[str]]:
    """Which conditions a finished run speaks about, and which of them hold.

    `run` is the run's row (segment_sync.runs) plus `stopped_by` ("dodo", "segment" or None),
    `records_set_aside` (malformed API records) and the steps it went through (`extracted`,
    `modelled`, `emitted`). A condition clears only on evidence: an outage of Segment by a run
    that sent, a failed data test by a run that built the models; an outage hides whatever
    failure lay behind it, and an interrupted run only proves the lock was free.
    """
    outcome = run.get("outcome")
    evaluated = {"long_lock"}
    firing: dict[str, Alert] = {}
    if outcome == "interrupted":
        return {}, evaluated
    stopped_by = run.get("stopped_by")
    if stopped_by not in OUTAGE_KINDS:
        evaluated.add("run_failed")
    if run.get("extracted") or stopped_by == "dodo":
        evaluated.add("dodo_outage")
    if run.get("emitted") or stopped_by == "segment":
        evaluated.add("segment_outage")
    if run.get("modelled"):
        evaluated.add("data_test_failed")
    if run.get("models_verified"):
        evaluated.add("model_drift")
        if run.get("models_drift"):
            firing["model_drift"] = Alert(
                "model_drift",
                "dodo-segment: the delta-built models differed from a full build (repaired by "
                f"a full build): {'; '.join(run['models_drift'])[:500]}",
                run_id=run.get("run_id"),
                exit_code=run.get("exit_code"),
                figures={"drifted_tables": len(run["models_drift"])},
            )
    base = {"run_id": run.get("run_id"), "exit_code": run.get("exit_code")}
    error = run.get("error")
    if outcome in ("failed", "usage_error") and stopped_by in OUTAGE_KINDS:
        kind = OUTAGE_KINDS[stopped_by]
        service = "the Dodo Payments API" if stopped_by == "dodo" else "Segment"
        firing[kind] = Alert(
            kind,
            f"dodo-segment: the run stopped because {service} was unavailable: {error}",
            error=error,
            figures={"pending": run.get("pending")},
            **base,
        )
    elif outcome in ("failed", "usage_error"):
        firing["run_failed"] = Alert(
            "run_failed",
            f"dodo-segment: the run failed (exit {run.get('exit_code')}): {error}",
            error=error,
            **base,
        )
    elif outcome == "data_test_failed":
        firing["data_test_failed"] = Alert(
            "data_test_failed",
            f"dodo-segment: an error data test failed, nothing was emitted: {error}",
            error=error,
            figures={"failed_tests": run.get("data_test_errors") or []},
            **base,
        )
    if outcome in ("success", "finished_with_rejections"):
        evaluated.add("rejections")
        rejected = int(run.get("rejected") or 0)
        quarantined = int(run.get("quarantined") or 0)
        set_aside = int(run.get("records_set_aside") or 0)
        flagged = rejected + quarantined + set_aside
        messages = int(run.get("identifies_sent") or 0) + int(run.get("tracks_sent") or 0)
        messages += rejected + quarantined
        if _over_threshold(alerts, flagged, messages):
            share = f" ({flagged / messages:.1%} of {messages} messages)" if messages else ""
            firing["rejections"] = Alert(
                "rejections",
                f"dodo-segment: {rejected} message(s) rejected, {quarantined} row(s) quarantined, "
                f"{set_aside} malformed API record(s) set aside{share}; see `dodo-segment status`",
                figures={
                    "rejected": rejected,
                    "quarantined": quarantined,
                    "records_set_aside": set_aside,
                    "messages": messages,
                    "threshold": alerts.reject_threshold,
                    "threshold_is_share": alerts.reject_threshold_is_share,
                },
                **base,
            )
    return firing, evaluated


def after_run(config: AppConfig, run: Mapping[str, Any]) -> None:
    """Alert on what a finished `run` shows, and send "recovered" for what it cleared."""
    firing, evaluated = run_conditions(config.alerts, run)
    evaluate(config, firing, evaluated, f"run {run.get('run_id')}: {run.get('outcome')}")


def lock_held(
    config: AppConfig,
    held_seconds: float | None,
    threshold_seconds: float,
    facts: Mapping[str, Any] | None = None,
) -> None:
    """A run that found the lock held: alert when it has been held unusually long."""
    facts = dict(facts or {})
    if held_seconds is not None and held_seconds > threshold_seconds:
        alert = Alert(
            "long_lock",
            f"dodo-segment: a run ({facts.get('command')}, pid {facts.get('pid')}, step "
            f"{facts.get('step')}) has held the lock for {held_seconds:.0f}s, over "
            f"{threshold_seconds:.0f}s: hung, or a backfill worth knowing about",
            run_id=facts.get("run_id"),
            figures={
                "held_seconds": round(held_seconds, 1),
                "threshold_seconds": round(threshold_seconds),
                **facts,
            },
        )
        evaluate(config, {"long_lock": alert}, {"long_lock"}, "")
    else:
        held = f"{held_seconds:.0f}s" if held_seconds is not None else "a moment"
        evaluate(config, {}, {"long_lock"}, f"the lock has been held for {held} only")


def send_test(config: AppConfig) -> str | None:
    """Send one test alert; None when delivered, else why not. Changes no state."""
    alert = Alert(
        "test",
        "dodo-segment: test alert; alerts from this job reach this channel",
        figures={"open": sorted(open_alerts(config.warehouse_path))},
    )
    return deliver(config.alerts.webhook_url, alert.payload("test", config.warehouse_path))
