"""Running the notebooks of `notebooks/`: execute one, read back its key figures, render images."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.analysis.charts import SAVE_FIGURES_ENV

FIGURES_PREFIX = "dodo-segment-figures: "
"""Marker of the line a notebook prints with its key figures (read by tests/test_notebooks.py)."""
REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("01_revenue_overview", "02_subscriptions_mrr", "03_retention_cohorts",
             "04_segment_sync_health", "05_dunning")  # fmt: skip
README_IMAGES = ("mrr_waterfall", "cohort_heatmap", "dunning_outcomes")
"""The charts the README shows, saved by the notebooks under these names."""


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


def main() -> None:
    """`python -m pipelines.analysis [TARGET]`: render the README's charts."""
    render_images(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "notebooks" / "images")
