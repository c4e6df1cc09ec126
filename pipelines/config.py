"""Resolve the job's settings: CLI flags win, then environment variables, then `.dlt/*.toml`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.settings import BASE_URLS

DEFAULT_WAREHOUSE = "dodo_segment.duckdb"
DEFAULT_SEGMENT_HOST = "https://api.segment.io"
DEFAULT_MEMORY_LIMIT = "1GB"
"""DuckDB's memory for the models and the emitter: the 1M-payment build peaks at ~850 MB of RSS
under it (~1.1 GB without a limit) in the same time; bigger builds spill to disk instead."""
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)

# Contract variables (README "Configuration"): env name -> dlt config/secrets path.
ENV_TO_DLT: dict[str, str] = {
    "DODO_PAYMENTS_API_KEY": "sources.dodo.api_key",
    "DODO_PAYMENTS_ENVIRONMENT": "sources.dodo.environment",
    "DODO_PAYMENTS_BASE_URL": "sources.dodo.base_url",
    "DODO_SEGMENT_DB": "warehouse.path",
    "SEGMENT_WRITE_KEY": "segment.write_key",
    "SEGMENT_HOST": "segment.host",
}
SECRET_PATHS = frozenset({"sources.dodo.api_key", "segment.write_key"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class ExtractConfig:
    """How the extract talks to Dodo and how far back it reads."""

    api_key: str = field(repr=False)
    environment: str
    base_url: str
    requests_per_minute: float | None
    """The user's ceiling; None: pace to the server's rate-limit headers (100/min without)."""
    lookback_days: float
    """The deep pass's window behind each cursor (once per deep_lookback_hours)."""
    customers_full_refresh_hours: float
    subscriptions_full_sweep_hours: float
    max_pages_per_query: int
    page_size: int
    backfill_start: datetime
    timeout_seconds: float
    max_retries: int
    rows_per_load: int
    as_of: datetime | None = None
    """Read the API as of this time instead of now (replays, and the sandbox's own clock)."""
    lookback_minutes: float = 60
    """Every run's short window behind each cursor (open objects are re-read besides)."""
    deep_lookback_hours: float = 24
    """One run this often re-reads the whole lookback_days window (the deep pass)."""


@dataclass(frozen=True)
class SegmentConfig:
    """Where and how the emitter sends to Segment."""

    write_key: str = field(repr=False)
    host: str
    excluded_fields: tuple[str, ...]
    max_events_per_second: float | None
    event_catalog: str
    max_retries: int
    timeout_seconds: float


@dataclass(frozen=True)
class AppConfig:
    """Every setting of one invocation."""

    warehouse_path: str
    extract: ExtractConfig
    segment: SegmentConfig
    memory_limit: str | None = DEFAULT_MEMORY_LIMIT
    """DuckDB's memory_limit while the models build and the emitter reads (None: DuckDB's own
    default, 80% of RAM)."""
    skip_unchanged_models: bool = True
    """Keep the last clean build of the models when a rebuild would give the same tables (same
    raw data, SQL and catalog; no month, trial or paid period ended since). False: always
    rebuild."""

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values, for scrubbing output."""
        return tuple(s for s in (self.extract.api_key, self.segment.write_key) if s)


def _from_files(path: str, secret: bool) -> Any:
    import dlt  # imported on first use: it costs half a second, and --help should not wait

    accessor = dlt.secrets if secret else dlt.config
    try:
        return accessor.get(path)
    except Exception:  # a malformed toml is reported by dlt itself on the next access
        return None


def lookup(path: str, flags: Mapping[str, Any] | None = None, default: Any = None) -> Any:
    """One setting by its dlt path (`sources.dodo.lookback_days`): flag, then env, then files."""
    if flags and flags.get(path) is not None:
        return flags[path]
    for env_name, dlt_path in ENV_TO_DLT.items():
        if dlt_path == path and os.environ.get(env_name):
            return os.environ[env_name]
    value = _from_files(path, path in SECRET_PATHS)
    return default if value is None else value


def _number(path: str, flags: Mapping[str, Any] | None, default: float) -> float:
    value = lookup(path, flags, default)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path} must be a number, got {value!r}") from exc


def _optional_number(path: str, flags: Mapping[str, Any] | None) -> float | None:
    value = lookup(path, flags, None)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _number(path, flags, 0)


def _positive(path: str, flags: Mapping[str, Any] | None, default: float) -> float:
    value = _number(path, flags, default)
    if value <= 0:
        raise ConfigError(f"{path} must be a number above 0, got {value:g}")
    return value


def _flag(path: str, flags: Mapping[str, Any] | None, default: bool) -> bool:
    value = lookup(path, flags, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{path} must be true or false, got {value!r}")


def _datetime(path: str, flags: Mapping[str, Any] | None, default: str) -> datetime:
    value = lookup(path, flags, default)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{path} must be an ISO date, got {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _memory_limit(flags: Mapping[str, Any] | None) -> str | None:
    value = str(lookup("warehouse.memory_limit", flags, DEFAULT_MEMORY_LIMIT)).strip()
    if value.lower() in ("", "none", "default"):
        return None
    if not _MEMORY.match(value):
        raise ConfigError(
            f"warehouse.memory_limit must be a size such as 1GB or 800MB (or none), got {value!r}"
        )
    return value


def load_config(flags: Mapping[str, Any] | None = None) -> AppConfig:
    """Resolve every setting; flags are keyed by dlt path, e.g. {"warehouse.path": "x.duckdb"}."""
    environment = str(lookup("sources.dodo.environment", flags, "live_mode"))
    if environment not in BASE_URLS:
        raise ConfigError(
            f"DODO_PAYMENTS_ENVIRONMENT must be live_mode or test_mode, got {environment!r}"
        )
    base_url = str(lookup("sources.dodo.base_url", flags, BASE_URLS[environment]))
    excluded = lookup(
        "segment.excluded_fields", flags, os.environ.get("DODO_SEGMENT_EXCLUDED_FIELDS", "")
    )
    if isinstance(excluded, str):
        excluded = [f.strip() for f in excluded.split(",") if f.strip()]
    rate = lookup("segment.max_events_per_second", flags, None)
    extract = ExtractConfig(
        api_key=str(lookup("sources.dodo.api_key", flags, "") or ""),
        environment=environment,
        base_url=base_url,
        requests_per_minute=_optional_number("sources.dodo.requests_per_minute", flags),
        lookback_days=_number("sources.dodo.lookback_days", flags, 3),
        customers_full_refresh_hours=_number(
            "sources.dodo.customers_full_refresh_hours", flags, 24
        ),
        subscriptions_full_sweep_hours=_number(
            "sources.dodo.subscriptions_full_sweep_hours", flags, 24
        ),
        max_pages_per_query=int(_number("sources.dodo.max_pages_per_query", flags, 50)),
        page_size=int(_number("sources.dodo.page_size", flags, 100)),
        backfill_start=_datetime("sources.dodo.backfill_start", flags, "2020-01-01T00:00:00Z"),
        timeout_seconds=_number("sources.dodo.timeout_seconds", flags, 60),
        max_retries=int(_number("sources.dodo.max_retries", flags, 8)),
        rows_per_load=int(_number("sources.dodo.rows_per_load", flags, 250_000)),
        as_of=_datetime("sources.dodo.as_of", flags, "")
        if lookup("sources.dodo.as_of", flags)
        else None,
        lookback_minutes=_positive("sources.dodo.lookback_minutes", flags, 60),
        deep_lookback_hours=_positive("sources.dodo.deep_lookback_hours", flags, 24),
    )
    segment = SegmentConfig(
        write_key=str(lookup("segment.write_key", flags, "") or ""),
        host=str(lookup("segment.host", flags, DEFAULT_SEGMENT_HOST)),
        excluded_fields=tuple(excluded),
        max_events_per_second=float(rate) if rate not in (None, "", 0, "0") else None,
        event_catalog=str(
            lookup("events.catalog", flags, os.environ.get("DODO_SEGMENT_EVENT_CATALOG", "default"))
        ),
        max_retries=int(_number("segment.max_retries", flags, 6)),
        timeout_seconds=_number("segment.timeout_seconds", flags, 15),
    )
    warehouse = str(lookup("warehouse.path", flags, DEFAULT_WAREHOUSE))
    return AppConfig(
        warehouse_path=warehouse,
        extract=extract,
        segment=segment,
        memory_limit=_memory_limit(flags),
        skip_unchanged_models=_flag("models.skip_unchanged", flags, True),
    )


def pipeline_dir(warehouse_path: str) -> Path:
    """The dlt pipeline folder that belongs to a warehouse (beside it, owner-only)."""
    if warehouse_path.startswith("md:"):
        return Path(".dodo_segment_motherduck.dlt").resolve()
    return Path(warehouse_path).expanduser().resolve().with_name(Path(warehouse_path).name + ".dlt")
