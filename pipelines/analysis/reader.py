"""The warehouse the notebooks and the report read: which file, opened read-only per query.

The notebooks never hold the warehouse open: each `Warehouse.query` opens it read-only, runs one
query and closes it, so a scheduled `dodo-segment run` is never locked out by an open notebook.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from pipelines.config import DEFAULT_WAREHOUSE

DEMO_WAREHOUSE = "demo.duckdb"


@dataclass(frozen=True)
class WarehouseChoice:
    """Which warehouse the notebooks read, and why."""

    path: str
    is_demo: bool
    reason: str


def demo_cache_path() -> Path:
    """Where a demo warehouse is built when there is no warehouse at all."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dodo-segment" / DEMO_WAREHOUSE


def choose_warehouse(cwd: Path | None = None) -> WarehouseChoice:
    """DODO_SEGMENT_DB if set, else the job's default path, else the demo warehouse.

    The default and demo files are looked for in `cwd` and its parent (Jupyter starts kernels in
    `notebooks/`, the job runs from the repository root). A DODO_SEGMENT_DB that points at no
    file is an error, not a silent switch to demo data.
    """
    here = (cwd or Path.cwd()).resolve()
    explicit = os.environ.get("DODO_SEGMENT_DB")
    if explicit:
        if explicit.startswith("md:") or Path(explicit).expanduser().exists():
            return WarehouseChoice(explicit, False, "DODO_SEGMENT_DB")
        raise FileNotFoundError(
            f"DODO_SEGMENT_DB={explicit} does not exist: run 'dodo-segment run' first, fix the "
            "path, or unset it to read the demo warehouse"
        )
    for folder in (here, here.parent):
        if (folder / DEFAULT_WAREHOUSE).exists():
            return WarehouseChoice(str(folder / DEFAULT_WAREHOUSE), False, "default path")
    for candidate in (here / DEMO_WAREHOUSE, here.parent / DEMO_WAREHOUSE, demo_cache_path()):
        if candidate.exists():
            return WarehouseChoice(str(candidate), True, "demo warehouse")
    return WarehouseChoice(str(demo_cache_path()), True, "demo warehouse (to be built)")


def build_demo_warehouse(path: Path) -> None:
    """Run `dodo-segment demo` into `path` (about 15 s; needs no keys and no network)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"No warehouse found: building the demo warehouse at {path} (about 15 s) ...")
    command = [sys.executable, "-m", "pipelines.cli", "demo", "--db", str(path)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=path.parent)


class NoModelsYet(RuntimeError):
    """The file has no analytics models: no run has built them yet."""


class Warehouse:
    """A read-only view of the warehouse: every query opens, reads and closes it."""

    def __init__(self, choice: WarehouseChoice) -> None:
        self.path = choice.path
        self.is_demo = choice.is_demo
        self.reason = choice.reason
        self._session: duckdb.DuckDBPyConnection | None = None
        try:
            self.as_of = self.scalar("select max(as_of) from analytics.int_as_of")
        except duckdb.CatalogException as exc:
            raise NoModelsYet(
                f"{self.path} has no analytics models yet: run 'dodo-segment run' first"
            ) from exc
        self.is_sandbox = self.is_demo or bool(
            self.has_table("segment_sync", "runs")
            and self.scalar("select count(*) from segment_sync.runs where command = 'demo'")
        )
        """Demo data: the demo warehouse, or a file `dodo-segment demo` wrote (the sandbox's)."""

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-only connection (UTC session); waits while a run holds the file."""
        for attempt in range(20):
            try:
                con = duckdb.connect(self.path, read_only=True)
                break
            except duckdb.IOException as exc:  # a run is writing: it holds the file briefly
                if "lock" not in str(exc).lower() or attempt == 19:
                    raise
                time.sleep(0.5)
        try:
            con.execute("set TimeZone = 'UTC'")
            yield con
        finally:
            con.close()

    def query(self, sql: str, variables: dict[str, Any] | None = None) -> pd.DataFrame:
        """Run one SQL query and return a DataFrame.

        `variables` are set with `SET VARIABLE` first, so the query reads them with
        `getvariable('name')` exactly as it would in the DuckDB CLI.
        """
        if self._session is not None:
            return self._run(self._session, sql, variables)
        with self.connect() as con:
            return self._run(con, sql, variables)

    @staticmethod
    def _run(
        con: duckdb.DuckDBPyConnection, sql: str, variables: dict[str, Any] | None
    ) -> pd.DataFrame:
        for name, value in (variables or {}).items():
            con.execute(f"set variable {name} = ?", [value])
        with warnings.catch_warnings():  # duckdb's own pandas conversion, not ours
            warnings.filterwarnings("ignore", message="The inplace keyword")
            return con.execute(sql).df()

    @contextmanager
    def session(self) -> Iterator[None]:
        """Run the queries inside on one read-only connection (the report reads in one go, so
        it holds the file once and briefly rather than opening it for every query)."""
        with self.connect() as con:
            self._session = con
            try:
                yield
            finally:
                self._session = None

    def scalar(self, sql: str, variables: dict[str, Any] | None = None) -> Any:
        """The single value of a one-row, one-column query."""
        frame = self.query(sql, variables)
        return None if frame.empty else frame.iat[0, 0]

    def has_table(self, schema: str, name: str) -> bool:
        """Whether a table or view exists (older warehouses lack the newer ones)."""
        found = self.scalar(
            "select count(*) from information_schema.tables "
            "where table_schema = getvariable('schema_name') and table_name = getvariable('t')",
            {"schema_name": schema, "t": name},
        )
        return bool(found)

    def source_note(self) -> str:
        """One line naming the data behind a chart."""
        as_of = self.as_of.strftime("%Y-%m-%d %H:%M UTC") if self.as_of is not None else "?"
        demo = "DEMO DATA (sandbox) - " if self.is_sandbox else ""
        return f"{demo}{Path(self.path).name}, as of {as_of}"


def open_warehouse() -> Warehouse:
    """Choose the warehouse (building the demo one if needed) and show which one it is."""
    choice = choose_warehouse()
    if choice.is_demo and not Path(choice.path).exists():
        build_demo_warehouse(Path(choice.path))
        choice = WarehouseChoice(choice.path, True, "demo warehouse, built just now")
    warehouse = Warehouse(choice)
    if warehouse.is_demo:
        _show_banner(
            "<div style='padding:10px;border:3px solid #c0392b;background:#fdecea;"
            "font-size:16px'><b>DEMO DATA</b>: no warehouse found (DODO_SEGMENT_DB is unset and "
            f"there is no {DEFAULT_WAREHOUSE}), so these figures come from the sandbox business "
            f"in <code>{warehouse.path}</code>, not from your Dodo Payments account.</div>",
            f"*** DEMO DATA: no warehouse found; figures come from the sandbox ({warehouse.path}) ***",
        )
    elif warehouse.is_sandbox:
        _show_banner(
            "<div style='padding:10px;border:3px solid #c0392b;background:#fdecea;"
            "font-size:16px'><b>SANDBOX DATA</b>: this warehouse was written by "
            "<code>dodo-segment demo</code> (the simulated business), not by your Dodo Payments "
            "account.</div>",
            f"*** SANDBOX DATA: {warehouse.path} was written by dodo-segment demo ***",
        )
    print(f"Warehouse: {warehouse.path} ({warehouse.reason}); data as of {warehouse.as_of}")
    return warehouse


def _show_banner(html: str, text: str) -> None:
    try:
        from IPython.display import HTML, display
    except ImportError:
        print(text)
        return
    display(HTML(html), metadata={"text/plain": text})
    print(text)


def pending_identifies(
    warehouse: Warehouse, excluded_fields: tuple[str, ...] | None = None
) -> list[str]:
    """Customers the next run would identify, by the emitter's own change test (read-only).

    `identify_state.traits_hash` hashes the traits as sent (nulls and excluded fields removed),
    so it cannot be compared with `identify_outbox.traits_hash` in SQL.
    """
    from pipelines.config import load_config
    from pipelines.emit import pending_identify_ids

    if excluded_fields is None:
        excluded_fields = load_config().segment.excluded_fields
    with warehouse.connect() as con:
        has_state = con.execute(
            "select count(*) from information_schema.tables "
            "where table_schema = 'segment_sync' and table_name = 'identify_state'"
        ).fetchone()
        if not has_state or not has_state[0]:
            rows = con.execute("select user_id from analytics.identify_outbox order by 1")
            return [r[0] for r in rows.fetchall()]
        # emit.preview would say the same but creates missing tables, which a read-only file refuses
        return pending_identify_ids(con, excluded_fields)
