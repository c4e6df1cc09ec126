"""Emit: send the outboxes to Segment as identify and track calls, once, with a ledger in the warehouse.

`emitter` sends and records (`emit`, `resend`, `recompute_traits`, `preview`); `messages` turns
outbox rows into validated Segment calls; `segment_client` delivers them batch by batch with
confirmation; `ledger` owns `segment_sync` (delivered events, identify state, rejects);
`checkpoint` keeps, outside the warehouse, what a rebuilt ledger needs not to skip anything;
`settled` lets a run read only what the models changed since the last clean emit;
`pending` counts what the next run would send without writing; `tracking_plan` derives the
plan every message is checked against; `accounts` keeps group state and past user ids;
`regulations` asks Segment's Public API to suppress and delete a forgotten customer.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Checkpoint": "checkpoint",
    "catch_up_ledger": "checkpoint",
    "checkpoint_path": "checkpoint",
    "ledger_is_empty": "checkpoint",
    "read_checkpoint": "checkpoint",
    "restore_ledger": "checkpoint",
    "take_checkpoint": "checkpoint",
    "warehouse_knows_run": "checkpoint",
    "write_checkpoint": "checkpoint",
    "ChangedSince": "settled",
    "EmitResult": "emitter",
    "Preview": "emitter",
    "emit": "emitter",
    "ensure_sync_schema": "emitter",
    "preview": "emitter",
    "recompute_traits": "emitter",
    "resend": "emitter",
    "iter_identify_rows": "ledger",
    "pending_counts": "pending",
    "pending_identify_ids": "pending",
    "DEFAULT_PUBLIC_API_HOST": "regulations",
    "PRIVACY_PORTAL_STEPS": "regulations",
    "RegulationError": "regulations",
    "file_suppress_with_delete": "regulations",
    "regulation_body": "regulations",
    "EmitSettings": "settings",
    "PlanError": "tracking_plan",
    "build_plan": "tracking_plan",
    "load_plan": "tracking_plan",
    "write_plan": "tracking_plan",
}
"""Each public name and the module that defines it. The names are imported on first use
(PEP 562): `status` needs the pending counts, not the Segment client and its cryptography."""

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
