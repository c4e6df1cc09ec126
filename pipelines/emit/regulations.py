"""Segment's Public API regulations: suppress a userId and delete what Segment holds about it."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import requests

DEFAULT_PUBLIC_API_HOST = "https://api.segmentapis.com"
"""Segment's Public API (EU workspaces: https://eu1.api.segmentapis.com)."""
REGULATIONS_PATH = "/regulations"
"""Create Workspace Regulation: every source of the workspace."""
SUPPRESS_WITH_DELETE = "SUPPRESS_WITH_DELETE"
MAX_SUBJECTS = 5000
"""Segment accepts at most this many subject ids in one regulation."""

PRIVACY_PORTAL_STEPS = """\
No Segment Public API token is configured, so nothing was filed with Segment. In Segment:
  1. Open your workspace > Privacy > Deletion & Suppression (the Privacy Portal).
  2. Click "+ New Request", choose "Delete and Suppress" and the subject type "userId".
  3. Enter each of these userIds, one per line:
{ids}
  4. Submit. Segment suppresses new data for them at once and deletes what it holds within
     30 days (in every destination that supports deletion).
Or set SEGMENT_PUBLIC_API_TOKEN (a Public API token with the Workspace Owner role) and run
this forget again: it files the same request through the Public API."""


class RegulationError(RuntimeError):
    """Segment did not accept the regulation; the message says why (never the token)."""


def regulation_body(user_ids: Sequence[str]) -> dict[str, object]:
    """The Create Workspace Regulation body that suppresses and deletes these userIds."""
    return {
        "regulationType": SUPPRESS_WITH_DELETE,
        "subjectType": "USER_ID",
        "subjectIds": list(user_ids),
    }


def file_suppress_with_delete(
    user_ids: Sequence[str], token: str, host: str = DEFAULT_PUBLIC_API_HOST, timeout: float = 15
) -> str:
    """File one SUPPRESS_WITH_DELETE regulation for the userIds; returns Segment's regulateId."""
    if not user_ids or len(user_ids) > MAX_SUBJECTS:
        raise ValueError(f"between 1 and {MAX_SUBJECTS} userIds per regulation")
    url = host.rstrip("/") + REGULATIONS_PATH
    try:
        response = requests.post(
            url,
            data=orjson.dumps(regulation_body(user_ids)),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise RegulationError(
            f"cannot reach Segment's Public API at {host}: {type(exc).__name__}"
        ) from None
    if response.status_code in (401, 403):
        raise RegulationError(
            f"Segment's Public API at {host} refused the token (HTTP {response.status_code}): "
            "check SEGMENT_PUBLIC_API_TOKEN and that it has the Workspace Owner role"
        )
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if response.status_code != 200:
        raise RegulationError(
            f"Segment's Public API at {host} answered HTTP {response.status_code}: "
            f"{_error_text(payload)}"
        )
    regulate_id = (
        (payload.get("data") or {}).get("regulateId") if isinstance(payload, dict) else None
    )
    if not isinstance(regulate_id, str) or not regulate_id:
        raise RegulationError(f"Segment's Public API at {host} answered without a regulateId")
    return regulate_id


def _error_text(payload: object) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("errors"), list) and payload["errors"]:
        first = payload["errors"][0]
        if isinstance(first, dict):
            return str(first.get("message") or first)[:200]
    return "no details"
