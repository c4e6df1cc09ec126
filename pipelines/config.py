"""Resolve the job's settings: CLI flags win, then environment variables, then `.dlt/*.toml`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.dodo_contract import BASE_URLS

DEFAULT_WAREHOUSE = "dodo_segment.duckdb"
DEFAULT_SEGMENT_HOST = "https://api.segment.io"
DEFAULT_SEGMENT_PUBLIC_API_HOST = "https://api.segmentapis.com"
DEFAULT_MEMORY_LIMIT = "1GB"
"""DuckDB's memory for the models and the emitter: the 1M-payment build peaks at ~850 MB of RSS
under it (~1.1 GB without a limit) in the same time; bigger builds spill to disk instead."""
DEFAULT_DELTA_MEMORY_LIMIT = "256MB"
"""DuckDB's memory for a delta build of the models (never above `memory_limit`): the 1M-payment
delta build alone peaks at ~390 MB of RSS under it, ~965 MB under 1GB (its buffer pool fills with
the blocks its scans read), ~10% slower (docs/models.md); a full build keeps `memory_limit`."""
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip

# Contract variables (README "Configuration"): env name -> dlt config/secrets path.
ENV_TO_DLT: dict[str, str] = {
    "DODO_PAYMENTS_API_KEY": "sources.dodo.api_key",
    "DODO_PAYMENTS_ENVIRONMENT": "sources.dodo.environment",
    "DODO_PAYMENTS_BASE_URL": "sources.dodo.base_url",
    "DODO_SEGMENT_DB": "warehouse.path",
    "SEGMENT_WRITE_KEY": "segment.write_key",
    "SEGMENT_HOST": "segment.host",
    "DODO_PAYMENTS_WEBHOOK_KEY": "sources.dodo.webhook_key",
    "DODO_SEGMENT_ALERT_WEBHOOK_URL": "alerts.webhook_url",
    "SEGMENT_PUBLIC_API_TOKEN": "segment.public_api_token",
    "SEGMENT_PUBLIC_API_HOST": "segment.public_api_host",
}
SECRET_PATHS = frozenset(
    {
        "sources.dodo.api_key",
        "segment.write_key",
        "sources.dodo.webhook_key",
        "alerts.webhook_url",
        "segment.public_api_token",
    }
)


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
    backoff_seconds: float = 1.0
    """The first retry's backoff without Retry-After; it doubles per retry (up to 60 s)."""


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
    public_api_token: str = field(default="", repr=False)
    """Segment Public API token: `forget` files its deletion request with it (optional)."""
    public_api_host: str = DEFAULT_SEGMENT_PUBLIC_API_HOST
    tracking_plan_path: str | None = None
    """`[tracking_plan] path`: a plan written by `dodo-segment tracking-plan` to validate every
    message against (default: the plan of the last build)."""


USER_ID_SOURCES_DEFAULT: tuple[str, ...] = ("customer_id",)
_METADATA_SOURCE = re.compile(
    r"^(customer|subscription|payment)\.metadata\.([A-Za-z0-9_\-]{1,100})$"
)
GROUP_ID_FIELDS = ("tax_id", "customer_business_name")


@dataclass(frozen=True)
class IdentityConfig:
    """`[identity] user_id` (ordered sources of the Segment userId), `alias`, `[group] id`."""

    user_id_sources: tuple[str, ...] = USER_ID_SOURCES_DEFAULT
    """Tried in order per customer; the first that gives a valid value wins (customer_id is
    always the last resort, so nobody is left without an id)."""
    alias: bool = False
    """Send one `alias` (previousId -> userId) when a customer's user id changes."""
    group_source: str | None = None
    """`tax_id`, `customer_business_name`, `customer.metadata.KEY` or
    `subscription.metadata.KEY`; None: no group calls."""


def identity_source_parts(source: str) -> tuple[str, str | None]:
    """(kind, metadata key) of a validated source: ("customer_metadata", "app_user_id"),
    ("email", None), ("tax_id", None), ..."""
    match = _METADATA_SOURCE.match(source)
    if match:
        return f"{match.group(1)}_metadata", match.group(2)
    return source, None


def identity_config(flags: Mapping[str, Any] | None = None) -> IdentityConfig:
    """`[identity] user_id`, `[identity] alias` and `[group] id`, checked before anything runs."""
    raw = lookup("identity.user_id", flags, None)
    if raw in (None, "", []):
        sources = USER_ID_SOURCES_DEFAULT
    else:
        if isinstance(raw, str):
            text = raw.strip()
            try:
                raw = json.loads(text) if text.startswith("[") else text.split(",")
            except ValueError:
                raw = None
        if not isinstance(raw, list | tuple) or not all(isinstance(v, str) for v in raw):
            raise ConfigError(
                f'identity.user_id must be a list of sources, e.g. ["customer.metadata.app_user_id", '
                f'"customer_id"], got {raw!r}'
            )
        sources = tuple(v.strip() for v in raw if v.strip())
        bad = [
            v
            for v in sources
            if v not in ("email", "customer_id") and not _METADATA_SOURCE.match(v)
        ]
        if bad or not sources:
            raise ConfigError(
                f"identity.user_id: unknown source(s) {', '.join(map(repr, bad)) or '(none)'}: use "
                "customer.metadata.KEY, subscription.metadata.KEY, payment.metadata.KEY, email "
                "or customer_id (KEY: letters, digits, _ and -)"
            )
    group = lookup("group.id", flags, None)
    group_source = None
    if group not in (None, ""):
        group_source = str(group).strip()
        kind, _ = identity_source_parts(group_source)
        if group_source not in GROUP_ID_FIELDS and kind not in (
            "customer_metadata",
            "subscription_metadata",
        ):
            raise ConfigError(
                f"group.id: unknown group id source {group_source!r}: use tax_id, "
                "customer_business_name, customer.metadata.KEY or subscription.metadata.KEY"
            )
    return IdentityConfig(
        user_id_sources=sources,
        alias=_flag("identity.alias", flags, False),
        group_source=group_source,
    )


@dataclass(frozen=True)
class ModelsConfig:
    """The user's SQL models beside the product's, and the event rules passed to the SQL."""

    paths: tuple[Path, ...] = ()
    """Folders of user models (`[models] paths`; default `models/` of the working directory
    when it exists), each holding `<name>.sql` files and `<name>.tests.sql` beside them."""
    skip_events: tuple[str, ...] = ()
    """`[events] skip`: event names never sent."""
    rename_events: tuple[tuple[str, str], ...] = ()
    """`[events] rename`: (event, sent as) pairs; the event keeps its event_id."""
    identity: IdentityConfig = field(default_factory=lambda: IdentityConfig())
    """`[identity]` and `[group]`: who a customer is in Segment and which account they belong to."""


@dataclass(frozen=True)
class AlertsConfig:
    """Where alerts go and when rejections are worth one (`[alerts]`)."""

    webhook_url: str = field(default="", repr=False)
    """An incoming-webhook URL (Slack, Mattermost or anything that takes a JSON POST); a secret."""
    reject_threshold: float = 0
    """Alert when a run's rejected messages plus quarantined rows exceed this count, or this
    share of the run's messages when `reject_threshold_is_share`."""
    reject_threshold_is_share: bool = False


@dataclass(frozen=True)
class AppConfig:
    """Every setting of one invocation."""

    warehouse_path: str
    extract: ExtractConfig
    segment: SegmentConfig
    memory_limit: str | None = DEFAULT_MEMORY_LIMIT
    """DuckDB's memory_limit while the models build and the emitter reads (None: DuckDB's own
    default, 80% of RAM)."""
    delta_memory_limit: str | None = DEFAULT_DELTA_MEMORY_LIMIT
    """DuckDB's memory_limit while a delta build of the models runs (None: `memory_limit`);
    never above `memory_limit`."""
    skip_unchanged_models: bool = True
    """Keep the last clean build of the models when a rebuild would give the same tables (same
    raw data, SQL and catalog; no month, trial or paid period ended since). False: always
    rebuild."""
    incremental_models: bool = True
    """A job run rebuilds only the rows of the customers its new raw rows touch (a delta build,
    equal to a full build) when that is cheaper; False: every build is full (`[models]
    incremental`)."""
    models: ModelsConfig | None = None
    """The user's own models and which events go out (`[models] paths`, `[events] skip/rename`)."""
    alerts: AlertsConfig = AlertsConfig()
    metrics_textfile: str | None = None
    """Where each run writes its Prometheus metrics for node_exporter's textfile collector."""

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values, for scrubbing output (the webhook URL's path too: Slack's token)."""
        hook = self.alerts.webhook_url
        path = "/" + hook.split("://", 1)[-1].partition("/")[2] if hook else ""
        values = (
            self.extract.api_key,
            self.segment.write_key,
            self.segment.public_api_token,
            hook,
            path if len(path) > 8 else "",
        )
        return tuple(s for s in values if s)


def dlt_telemetry_off() -> None:
    """dlt's anonymous telemetry stays off unless the user turned it on. Called before dlt's
    first look at its configuration: dlt keeps its runtime settings for the life of the process,
    so a setting made after a first `dlt.config` lookup would come too late."""
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")


def _from_files(path: str, secret: bool) -> Any:
    dlt_telemetry_off()
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


def _memory_limit(
    flags: Mapping[str, Any] | None,
    path: str = "warehouse.memory_limit",
    default: str = DEFAULT_MEMORY_LIMIT,
) -> str | None:
    value = str(lookup(path, flags, default)).strip()
    if value.lower() in ("", "none", "default"):
        return None
    if not _MEMORY.match(value):
        raise ConfigError(f"{path} must be a size such as 1GB or 800MB (or none), got {value!r}")
    return value


def _size_bytes(size: str) -> float:
    """Bytes of a size `_MEMORY` matched ("800MB" -> 8e8)."""
    match = _MEMORY.match(size)
    assert match is not None
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def _delta_memory_limit(flags: Mapping[str, Any] | None, memory_limit: str | None) -> str | None:
    """`[warehouse] delta_memory_limit`, never above `memory_limit` (None: that one)."""
    value = _memory_limit(flags, "warehouse.delta_memory_limit", DEFAULT_DELTA_MEMORY_LIMIT)
    if value is None or (memory_limit and _size_bytes(memory_limit) <= _size_bytes(value)):
        return memory_limit
    return value


def _alerts(flags: Mapping[str, Any] | None) -> AlertsConfig:
    """`[alerts]`: the webhook URL and the reject threshold, a count (10) or a share ("5%", 0.05)."""
    url = str(lookup("alerts.webhook_url", flags, "") or "").strip()
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(
            "alerts.webhook_url (DODO_SEGMENT_ALERT_WEBHOOK_URL) must be an http(s) URL"
        )
    raw = lookup("alerts.reject_threshold", flags, 0)
    text = str(raw).strip()
    share = text.endswith("%")
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1.0
    if share:
        value /= 100
    elif not value.is_integer():
        share = True  # 0.05: a share of the run's messages
    if value < 0 or (share and value > 1):
        raise ConfigError(
            f"alerts.reject_threshold must be a count (10) or a share of the run's messages "
            f'("5%" or 0.05), got {raw!r}'
        )
    return AlertsConfig(webhook_url=url, reject_threshold=value, reject_threshold_is_share=share)


def _tracking_plan_path(flags: Mapping[str, Any] | None) -> str | None:
    """`[tracking_plan] path`: a written plan that must exist (checked before anything runs)."""
    path = str(lookup("tracking_plan.path", flags, "") or "").strip()
    if path and not Path(path).expanduser().is_file():
        raise ConfigError(
            f"tracking_plan.path: no such file {path!r} (write one with "
            "dodo-segment tracking-plan --out PATH)"
        )
    return path or None


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
        backoff_seconds=_positive("sources.dodo.backoff_seconds", flags, 1.0),
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
        public_api_token=str(lookup("segment.public_api_token", flags, "") or ""),
        public_api_host=str(
            lookup("segment.public_api_host", flags, DEFAULT_SEGMENT_PUBLIC_API_HOST)
        ),
        tracking_plan_path=_tracking_plan_path(flags),
    )
    warehouse = str(lookup("warehouse.path", flags, DEFAULT_WAREHOUSE))
    memory_limit = _memory_limit(flags)
    return AppConfig(
        warehouse_path=warehouse,
        extract=extract,
        segment=segment,
        memory_limit=memory_limit,
        delta_memory_limit=_delta_memory_limit(flags, memory_limit),
        skip_unchanged_models=_flag("models.skip_unchanged", flags, True),
        incremental_models=_flag("models.incremental", flags, True),
        models=models_config(flags),
        alerts=_alerts(flags),
        metrics_textfile=str(lookup("metrics.textfile_path", flags, "") or "") or None,
    )


DEFAULT_MODELS_DIR = "models"


def _names(path: str, value: Any) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path} must be a list of names, got {value!r}")
    return tuple(value)


def models_config(flags: Mapping[str, Any] | None = None) -> ModelsConfig:
    """`[models] paths` (relative to the working directory) and `[events] skip`, `rename`.

    Whether a skipped or renamed event exists is checked when the models build (the user's
    `custom_events` may add names), and is a configuration error there too."""
    configured = lookup("models.paths", flags, None)
    if configured is None:
        default = Path(DEFAULT_MODELS_DIR)
        paths: tuple[Path, ...] = (default.resolve(),) if default.is_dir() else ()
    else:
        paths = tuple(Path(p).expanduser().resolve() for p in _names("models.paths", configured))
        missing = [str(p) for p in paths if not p.is_dir()]
        if missing:
            raise ConfigError(f"models.paths: no such folder: {', '.join(missing)}")
    rename = lookup("events.rename", flags, None) or {}
    if isinstance(rename, str):
        try:
            rename = json.loads(rename)
        except ValueError as exc:
            raise ConfigError(f"events.rename must be a table of names, got {rename!r}") from exc
    if not isinstance(rename, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v.strip() for k, v in rename.items()
    ):
        raise ConfigError(
            f'events.rename must map event names to new names, e.g. {{"Payment Completed" = '
            f'"Order Paid"}}, got {rename!r}'
        )
    return ModelsConfig(
        paths=paths,
        skip_events=_names("events.skip", lookup("events.skip", flags, None)),
        rename_events=tuple((str(k), str(v).strip()) for k, v in rename.items()),
        identity=identity_config(flags),
    )


def pipeline_dir(warehouse_path: str) -> Path:
    """The dlt pipeline folder that belongs to a warehouse (beside it, owner-only)."""
    if warehouse_path.startswith("md:"):
        return Path(".dodo_segment_motherduck.dlt").resolve()
    return Path(warehouse_path).expanduser().resolve().with_name(Path(warehouse_path).name + ".dlt")


def webhook_key(flags: Mapping[str, Any] | None = None) -> str:
    """The webhook endpoint's signing secret (DODO_PAYMENTS_WEBHOOK_KEY), or "" when unset."""
    return str(lookup("sources.dodo.webhook_key", flags, "") or "")


@dataclass(frozen=True)
class ListenConfig:
    """Where `dodo-segment listen` listens and how it turns deliveries into runs."""

    webhook_key: str = field(repr=False)
    warehouse_path: str
    host: str = "127.0.0.1"
    port: int = 8787
    path: str = "/webhooks/dodo"
    max_body_bytes: int = 1_000_000
    debounce_seconds: float = 0.5
    """Quiet time after the last delivery before a run starts."""
    max_delay_seconds: float = 2.0
    """A steady stream of deliveries still starts a run this long after the first one."""
    retry_seconds: float = 30.0
    """After a failed run, wait this long before trying the pending deliveries again."""


def load_listen_config(config: AppConfig, flags: Mapping[str, Any] | None = None) -> ListenConfig:
    """The listener's settings: `[listen]` host, port, path, limits, with the webhook secret."""
    key = webhook_key(flags)
    if not key:
        raise ConfigError(
            "DODO_PAYMENTS_WEBHOOK_KEY is not set: copy the endpoint's signing secret (whsec_...) "
            "from Dodo's dashboard (Developer > Webhooks) into it, or into .dlt/secrets.toml "
            "under [sources.dodo] webhook_key"
        )
    return ListenConfig(
        webhook_key=key,
        warehouse_path=config.warehouse_path,
        host=str(lookup("listen.host", flags, "127.0.0.1")),
        port=int(_number("listen.port", flags, 8787)),
        path=str(lookup("listen.path", flags, "/webhooks/dodo")),
        max_body_bytes=int(_number("listen.max_body_bytes", flags, 1_000_000)),
        debounce_seconds=_number("listen.debounce_seconds", flags, 0.5),
        max_delay_seconds=_number("listen.max_delay_seconds", flags, 2.0),
        retry_seconds=_number("listen.retry_seconds", flags, 30.0),
    )
