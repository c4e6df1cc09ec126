"""Progress of long work: bars on a terminal (rich) for the backfill, the model build and the
send; plain lines (never bars) off a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import Sandbox, run_cli

pytestmark = pytest.mark.slow  # every test here drives a subprocess

EXE = str(Path(sys.executable).with_name("dodo-segment"))


def run_on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; return its exit code and what it drew."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(
        [EXE, *args], env={**env, "COLUMNS": "120"}, stdout=subprocess.PIPE, stderr=slave,
        timeout=180, check=False,
    )  # fmt: skip
    os.close(slave)
    reader.join(timeout=5)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_bars_on_a_terminal_plain_lines_off_it(sandbox: Sandbox) -> None:
    code, drawn = run_on_a_terminal("run", "--events-since", "2000-01-01", env=sandbox.env())
    assert code in (0, 3), drawn[-2000:]
    assert "━" in drawn
    for resource in ("customers", "payments", "subscriptions"):
        assert f"extract: {resource} (" in drawn  # rows read and pages, per resource
    assert "models: build (" in drawn and "/" in drawn
    assert "emit: identify" in drawn and "emit: track" in drawn

    piped = run_cli("transform", env={**sandbox.env(), "DODO_SEGMENT_PROGRESS_SECONDS": "0"})
    assert piped.returncode in (0, 3), piped.stderr
    assert "━" not in piped.stderr
    assert "models: build" in piped.stderr and "built" in piped.stderr
