"""The user's own models beside the product's: where they are, what they replace, and the settings
(`[events] skip`/`rename`) that the runner hands to the SQL as a table.

A user folder (`[models] paths`) holds `<name>.sql` files (one model each, any sub-folder) and
`<name>.tests.sql` beside them, with the product's conventions. Two product models exist to be
replaced: `custom_traits` (extra identify traits) and `custom_events` (extra track events); the
product's data tests of those two always run. Replacing any other product model is allowed and
warned about once per run; the product's data tests of a replaced model are then dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import duckdb

from pipelines import dodo_contract
from pipelines.config import ConfigError, IdentityConfig, identity_source_parts

SCHEMA = dodo_contract.ANALYTICS_SCHEMA

EXTENSION_POINTS: frozenset[str] = frozenset(
    {"custom_traits", "custom_events", "custom_group_traits"}
)
"""Product models that are empty on purpose: a user model of that name fills them (no warning)."""

CUSTOM_TRAITS = "custom_traits"
CUSTOM_GROUP_TRAITS = "custom_group_traits"
CUSTOM_EVENTS = "custom_events"
EVENT_RULES_TABLE = f"{SCHEMA}.event_rules"
"""`[events] skip` and `rename` as rows (event, action, renamed_to), read by `outbound_events`."""
IDENTITY_RULES_TABLE = f"{SCHEMA}.identity_rules"
"""`[identity] user_id` and `[group] id` as rows (role, priority, source, kind, json_path), read by
`customer_identity`; role is 'user_id' or 'group_id'."""
EVENT_RULES_MODEL = "outbound_events"
"""The model that applies the event rules; they are checked just before it is built."""
TRAIT_DEFINING_MODELS = ("customer_traits", "identify_outbox")
"""Replacing one of these lets `custom_traits` redefine a built-in trait."""
_TRAIT_KEY = re.compile(r"^\s*'([A-Za-z_][A-Za-z0-9_]*)'\s*,", re.MULTILINE)


def user_model_files(paths: Iterable[Path]) -> list[Path]:
    """Every model file (`*.sql` but not `*.tests.sql`) under the user's folders, sorted."""
    found: list[Path] = []
    for folder in paths:
        found.extend(
            p for p in sorted(Path(folder).rglob("*.sql")) if not p.name.endswith(".tests.sql")
        )
    return found


def user_test_files(paths: Iterable[Path]) -> list[Path]:
    """Every `*.tests.sql` under the user's folders, sorted."""
    found: list[Path] = []
    for folder in paths:
        found.extend(sorted(Path(folder).rglob("*.tests.sql")))
    return found


def user_fingerprint(
    paths: Iterable[Path], skip: Iterable[str], rename: Iterable[tuple[str, str]]
) -> str:
    """A hash of the user's SQL files and the event rules (part of the build fingerprint)."""
    paths = list(paths)
    digest = hashlib.sha256()
    for path in [*user_model_files(paths), *user_test_files(paths)]:
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    digest.update(repr((sorted(skip), sorted(rename))).encode())
    return digest.hexdigest()


def builtin_trait_names(identify_outbox_sql: str) -> set[str]:
    """The trait names the product's `identify_outbox` sends (the keys of its json_object)."""
    return set(_TRAIT_KEY.findall(identify_outbox_sql))


def check_custom_traits(
    con: duckdb.DuckDBPyConnection,
    builtin: set[str],
    model: str = CUSTOM_TRAITS,
    key: str = "customer_id",
) -> None:
    """The user's `custom_traits` (or `custom_group_traits`) has its key column (`customer_id`,
    `group_id`) and no column named like a built-in trait.

    Raises ValueError with the message for the user's file."""
    columns = [
        row[0]
        for row in con.execute(
            "select column_name from information_schema.columns "
            "where table_schema = ? and table_name = ? order by ordinal_position",
            [SCHEMA, model],
        ).fetchall()
    ]
    if key not in columns:
        raise ValueError(f"{model} needs a {key} column (one row per {key.split('_')[0]})")
    clashes = sorted(set(columns) & builtin)
    if clashes:
        raise ValueError(
            f"column(s) {', '.join(clashes)} of {model} are named like built-in traits: "
            "rename them, or replace the product's customer_traits model to redefine built-in "
            "traits"
        )


def write_event_rules(
    con: duckdb.DuckDBPyConnection, skip: Iterable[str], rename: Iterable[tuple[str, str]]
) -> None:
    """Replace `analytics.event_rules` with the configured skip and rename rules."""
    con.execute(
        f"create or replace table {EVENT_RULES_TABLE} "
        "(event VARCHAR, action VARCHAR, renamed_to VARCHAR)"
    )
    rows = [(name, "skip", None) for name in skip]
    rows += [(name, "rename", renamed_to) for name, renamed_to in rename]
    if rows:
        con.executemany(f"insert into {EVENT_RULES_TABLE} values (?, ?, ?)", rows)


def check_event_rules(con: duckdb.DuckDBPyConnection) -> None:
    """Every event named in `[events] skip`/`rename` is one the models can send; else ConfigError.

    Known names: the product's catalog (`event_catalog`), and what `custom_events` and
    `lifecycle_events` hold."""
    unknown = [
        row[0]
        for row in con.execute(
            f"""select distinct event from {EVENT_RULES_TABLE}
                where event not in (
                    select event from {SCHEMA}.event_catalog
                    union select event from {SCHEMA}.{CUSTOM_EVENTS} where event is not null
                    union select event from {SCHEMA}.lifecycle_events where event is not null
                )
                order by event"""
        ).fetchall()
    ]
    if unknown:
        raise ConfigError(
            "[events] skip/rename name unknown event(s): "
            + ", ".join(repr(u) for u in unknown)
            + " (names are case-sensitive: see analytics.event_catalog, or your custom_events)"
        )


def write_identity_rules(con: duckdb.DuckDBPyConnection, identity: IdentityConfig) -> None:
    """Replace `analytics.identity_rules` with the configured user id and group id sources."""
    con.execute(
        f"create or replace table {IDENTITY_RULES_TABLE} (role VARCHAR, priority INTEGER, "
        "source VARCHAR, kind VARCHAR, json_path VARCHAR)"
    )
    rows: list[tuple[str, int, str, str, str | None]] = []
    for priority, source in enumerate(identity.user_id_sources):
        kind, key = identity_source_parts(source)
        rows.append(("user_id", priority, source, kind, f'$."{key}"' if key else None))
    if identity.group_source:
        kind, key = identity_source_parts(identity.group_source)
        rows.append(("group_id", 0, identity.group_source, kind, f'$."{key}"' if key else None))
    con.executemany(f"insert into {IDENTITY_RULES_TABLE} values (?, ?, ?, ?, ?)", rows)
