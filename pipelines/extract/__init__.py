"""Extract and load: read the Dodo Payments API (`dodo/`, a dlt source) into `dodo_raw` (`load`).

`dodo/` is the source: paging, windows, retries and typed Arrow pages; `load` runs it through a
dlt pipeline into DuckDB, recovers failed loads and keeps the status history tables; `webhooks`
merges the objects carried by stored Dodo webhooks into the same tables.
"""

from pipelines.extract.dodo import ExtractPlan, dodo_source
from pipelines.extract.dodo.client import (
    ClientSettings,
    DodoApiError,
    DodoClient,
    DodoUnavailable,
)
from pipelines.extract.load import (
    JOB_FORMAT,
    ExtractFormat,
    ExtractResult,
    build_plan,
    make_pipeline,
    run_extract,
)
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
    "WebhookMerge",
    "build_plan",
    "dodo_source",
    "make_pipeline",
    "merge_webhooks",
    "run_extract",
]
