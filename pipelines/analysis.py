"""Helpers for the notebooks in `notebooks/`: find and read the warehouse, label charts, publish.

The notebooks never hold the warehouse open: each `Warehouse.query` opens it read-only, runs one
query and closes it, so a scheduled `dodo-segment run` is never locked out by an open notebook.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from pipelines.config import DEFAULT_WAREHOUSE

DEMO_WAREHOUSE = "demo.duckdb"
FIGURES_PREFIX = "dodo-segment-figures: "
"""Marker of the line a notebook prints with its key figures (read by tests/test_notebooks.py)."""
SAVE_FIGURES_ENV = "DODO_SEGMENT_FIGURES_DIR"
"""When set, `save_figure` writes PNGs there (how notebooks/images/ is rendered)."""
REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_revenue_overview", "02_subscriptions_mrr", "03_retention_cohorts",
             "04_segment_sync_health")  # fmt: skip


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


class Warehouse:
    """A read-only view of the warehouse: every query opens, reads and closes it."""

    def __init__(self, choice: WarehouseChoice) -> None:
        self.path = choice.path
        self.is_demo = choice.is_demo
        self.reason = choice.reason
        try:
            self.as_of = self.scalar("select max(as_of) from analytics.int_as_of")
        except duckdb.CatalogException as exc:
            raise RuntimeError(
                f"{self.path} has no analytics models yet: run 'dodo-segment run' first"
            ) from exc

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
        with self.connect() as con:
            for name, value in (variables or {}).items():
                con.execute(f"set variable {name} = ?", [value])
            with warnings.catch_warnings():  # duckdb's own pandas conversion, not ours
                warnings.filterwarnings("ignore", message="The inplace keyword")
                return con.execute(sql).df()

    def scalar(self, sql: str, variables: dict[str, Any] | None = None) -> Any:
        """The single value of a one-row, one-column query."""
        frame = self.query(sql, variables)
        return None if frame.empty else frame.iat[0, 0]

    def source_note(self) -> str:
        """One line naming the data behind a chart."""
        as_of = self.as_of.strftime("%Y-%m-%d %H:%M UTC") if self.as_of is not None else "?"
        demo = "DEMO DATA (sandbox) - " if self.is_demo else ""
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


# --- charts -----------------------------------------------------------------------------------


def finish_figure(fig: Any, warehouse: Warehouse, name: str | None = None) -> None:
    """Add the source line under a chart, and save it when DODO_SEGMENT_FIGURES_DIR is set."""
    fig.text(0.01, 0.005, warehouse.source_note(), fontsize=8, color="#666666", ha="left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    target = os.environ.get(SAVE_FIGURES_ENV)
    if target and name:
        Path(target).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(target) / f"{name}.png", dpi=110)


def use_style() -> None:
    """One readable chart style for every notebook."""
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.figsize": (11, 4.8),
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 13,
            "axes.titleweight": "bold",
            "axes.labelsize": 11,
            "legend.frameon": False,
        }
    )


def money(value: float | None, currency: str = "USD") -> str:
    """A readable amount: `USD 1,234.50` (no rounding beyond cents)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{currency} {value:,.2f}"


# --- figures for tests ------------------------------------------------------------------------


def publish(figures: dict[str, Any]) -> None:
    """Print the notebook's key figures as one JSON line that a test can read back."""
    print(FIGURES_PREFIX + json.dumps(figures, default=_plain, sort_keys=True))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def read_figures(notebook: Any) -> dict[str, Any]:
    """The figures a notebook published, from its executed outputs."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            for line in str(output.get("text", "")).splitlines():
                if line.startswith(FIGURES_PREFIX):
                    return json.loads(line[len(FIGURES_PREFIX) :])
    raise LookupError("the notebook published no figures")


def execute_notebook(
    path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: int = 120,
) -> Any:
    """Run a notebook top to bottom with the current interpreter's kernel; raises on a failing cell.

    `parameters` are assigned in a cell inserted after the cell tagged `parameters`.
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if parameters:
        source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
        index = next(
            (i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])),
            0,
        )
        notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    # An empty kernel_dirs leaves only the native kernel: this interpreter, never a user's
    # `python3` kernelspec that may point at a Python without duckdb.
    manager = KernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
    )
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=timeout,
        resources={"metadata": {"path": str(cwd or path.parent)}},
    )
    client.execute(env={**os.environ, **(env or {})})
    return notebook


README_IMAGES = ("mrr_waterfall", "cohort_heatmap")


def render_images(target: Path = REPO / "notebooks" / "images") -> None:
    """Execute every notebook on the chosen warehouse; copy the README's charts into `target`."""
    with tempfile.TemporaryDirectory() as scratch:
        for name in NOTEBOOKS:
            execute_notebook(
                REPO / "notebooks" / f"{name}.ipynb",
                env={SAVE_FIGURES_ENV: scratch, "MPLBACKEND": "Agg"},
            )
            print(f"executed {name}")
        target.mkdir(parents=True, exist_ok=True)
        for image in README_IMAGES:
            (target / f"{image}.png").write_bytes((Path(scratch) / f"{image}.png").read_bytes())
            print(f"wrote {target / image}.png")


if __name__ == "__main__":
    render_images(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "notebooks" / "images")
