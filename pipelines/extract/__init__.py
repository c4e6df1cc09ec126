"""Extract and load: read the Dodo Payments API (`dodo/`, a dlt source) into `dodo_raw` (`load`).

`dodo/` is the source: paging, windows, retries, pacing and typed Arrow pages; `load` runs it
through a dlt pipeline into DuckDB, recovers failed loads and keeps the status history tables;
`lookback` decides when a run is the deep pass and records what it found.
"""

from pipelines.extract.dodo import ExtractPlan, dodo_source
from pipelines.extract.dodo.client import ClientSettings, DodoApiError, DodoClient
from pipelines.extract.load import (
    JOB_FORMAT,
    ExtractFormat,
    ExtractResult,
    build_plan,
    make_pipeline,
    run_extract,
)
from pipelines.extract.lookback import LookbackPass, last_deep_pass, recent_passes

__all__ = [
    "JOB_FORMAT",
    "ClientSettings",
    "DodoApiError",
    "DodoClient",
    "ExtractFormat",
    "ExtractPlan",
    "ExtractResult",
    "LookbackPass",
    "build_plan",
    "dodo_source",
    "last_deep_pass",
    "make_pipeline",
    "recent_passes",
    "run_extract",
]
