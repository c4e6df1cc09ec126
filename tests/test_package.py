"""The built distribution works on its own: the wheel carries the SQL, and `dodo-segment demo`
runs from an empty folder in a fresh virtual environment outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here drives a subprocess

REPO = Path(__file__).resolve().parents[1]


def build_wheel(into: Path) -> Path:
    """`pip wheel` of the repository (the project only; its dependencies come at install)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(into), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = into.glob("dodo_segment-*.whl")
    return wheel


@pytest.mark.wheel
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        carried = {n: archive.read(n) for n in archive.namelist() if n.startswith("pipelines/sql/")}
        names = set(archive.namelist())
    # every model, macro and data test of the repository's sql/, byte for byte
    sources = {f"pipelines/sql/{p.relative_to(REPO / 'sql').as_posix()}": p for p in (REPO / "sql").rglob("*.sql")}  # fmt: skip
    assert set(carried) == set(sources)
    assert all(carried[name] == path.read_bytes() for name, path in sources.items())
    assert "pipelines/commands/project_template/dlt/config.toml" in names

    # A fresh venv (no system site-packages, no pip of its own: this interpreter's pip installs
    # into it with --python), the wheel and its dependencies resolved by pip from the
    # configured indexes and pip's cache.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    started = time.monotonic()
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-compile",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    installed_seconds = time.monotonic() - started

    empty = tmp_path / "somewhere-else"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    demo = subprocess.run(
        [str(venv / "bin" / "dodo-segment"), "demo"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    demo_seconds = time.monotonic() - started
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "The collector received" in demo.stdout
    assert (empty / "demo.duckdb").exists()
    # the report, drawn with the runtime dependencies alone (matplotlib, no notebook extras)
    assert "demo-report.html" in demo.stdout
    assert (empty / "demo-report.html").stat().st_size > 50_000
    # the models came from the installed package, not from this checkout
    where = subprocess.run(
        [str(python), "-c", "from pipelines.transform import SQL_DIR; print(SQL_DIR)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == venv.joinpath(
        "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages",
        "pipelines", "sql",
    )  # fmt: skip
    print(
        f"\nwheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB; install "
        f"{installed_seconds:.1f}s; dodo-segment demo {demo_seconds:.1f}s from the fresh install"
    )
