"""Extract and load: read the Dodo Payments API (`dodo/`, a dlt source) into `dodo_raw` (`load`).

`dodo/` is the source: paging, windows, retries, pacing and typed Arrow pages; `load` runs it
through a dlt pipeline into DuckDB, recovers failed loads and keeps the status history tables;
`lookback` decides when a run is the deep pass and records what it found; `webhooks` merges the
objects carried by stored Dodo webhooks into the same tables; `forgotten` keeps the tombstones of
forgotten customers and drops their personal fields at load.
"""

from pipelines.extract.dodo import ExtractPlan, dodo_source
from pipelines.extract.dodo.client import (
    ClientSettings,
    DodoApiError,
    DodoClient,
    DodoUnavailable,
)
from pipelines.extract.forgotten import (
    ensure_tombstone,
    forgotten_ids,
    load_files,
    mentions,
    record_forgotten,
    remove_load_files,
    scrub_json,
    tombstones,
)
from pipelines.extract.load import (
    JOB_FORMAT,
    ExtractFormat,
    ExtractResult,
    build_plan,
    make_pipeline,
    run_extract,
)
from pipelines.extract.lookback import LookbackPass, last_deep_pass, recent_passes
from pipelines.extract.webhooks import WebhookMerge, merge_webhooks

__all__ = [
    "JOB_FORMAT",
    "ClientSettings",
    "DodoApiError",
    "DodoClient",
    "DodoUnavailable",
    "ExtractFormat",
    "ExtractPlan",
    "ExtractResult",
    "LookbackPass",
    "WebhookMerge",
    "build_plan",
    "dodo_source",
    "ensure_tombstone",
    "forgotten_ids",
    "last_deep_pass",
    "load_files",
    "make_pipeline",
    "mentions",
    "merge_webhooks",
    "recent_passes",
    "record_forgotten",
    "remove_load_files",
    "run_extract",
    "scrub_json",
    "tombstones",
]
