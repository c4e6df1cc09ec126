"""Configuration contract: flags win, then environment variables, then .dlt/*.toml files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here drives a subprocess

PROBE = """
import json
from pipelines.config import load_config
c = load_config({"warehouse.path": %r})
print(json.dumps({
    "api_key_set": bool(c.extract.api_key), "api_key_len": len(c.extract.api_key),
    "environment": c.extract.environment, "base_url": c.extract.base_url,
    "warehouse": c.warehouse_path, "host": c.segment.host,
    "write_key_len": len(c.segment.write_key), "lookback": c.extract.lookback_days,
    "memory_limit": c.memory_limit, "delta_memory_limit": c.delta_memory_limit,
    "repr": repr(c),
}))
"""


def probe(cwd: Path, env: dict[str, str], flag_db: str | None = None) -> dict:
    # A fresh interpreter: dlt reads .dlt/ from the working directory once per process.
    base = {"PATH": "/usr/bin:/bin", "RUNTIME__DLTHUB_TELEMETRY": "false"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE % flag_db],
        cwd=cwd, env={**base, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_dlt_files(cwd: Path) -> None:
    (cwd / ".dlt").mkdir()
    (cwd / ".dlt" / "secrets.toml").write_text(
        '[sources.dodo]\napi_key = "file_api_key_123"\n[segment]\nwrite_key = "file_write_key"\n'
    )
    (cwd / ".dlt" / "config.toml").write_text(
        '[sources.dodo]\nenvironment = "test_mode"\nlookback_days = 5\n'
        '[segment]\nhost = "https://events.eu1.segmentapis.com"\n[warehouse]\npath = "from_file.duckdb"\n'
        'memory_limit = "800MB"\n'
    )


def test_defaults_without_any_configuration(tmp_path: Path) -> None:
    found = probe(tmp_path, {})
    assert found["environment"] == "live_mode"
    assert found["base_url"] == "https://live.dodopayments.com"
    assert found["warehouse"] == "dodo_segment.duckdb"
    assert found["host"] == "https://api.segment.io"
    assert found["lookback"] == 3
    assert found["memory_limit"] == "1GB"
    assert found["delta_memory_limit"] == "256MB"
    assert not found["api_key_set"]


def test_dlt_files_are_read(tmp_path: Path) -> None:
    write_dlt_files(tmp_path)
    found = probe(tmp_path, {})
    assert found["api_key_len"] == len("file_api_key_123")
    assert found["write_key_len"] == len("file_write_key")
    assert found["environment"] == "test_mode"
    assert found["base_url"] == "https://test.dodopayments.com"
    assert found["host"] == "https://events.eu1.segmentapis.com"
    assert found["warehouse"] == "from_file.duckdb"
    assert found["lookback"] == 5
    assert found["memory_limit"] == "800MB"
    assert found["delta_memory_limit"] == "256MB"
    assert "file_api_key_123" not in found["repr"] and "file_write_key" not in found["repr"]


def test_environment_beats_files_and_flags_beat_environment(tmp_path: Path) -> None:
    write_dlt_files(tmp_path)
    env = {
        "DODO_PAYMENTS_API_KEY": "env_key_4567",
        "DODO_PAYMENTS_BASE_URL": "http://127.0.0.1:9",
        "DODO_SEGMENT_DB": "from_env.duckdb",
        "SEGMENT_HOST": "http://127.0.0.1:10",
    }
    found = probe(tmp_path, env)
    assert found["api_key_len"] == len("env_key_4567")
    assert found["base_url"] == "http://127.0.0.1:9"
    assert found["warehouse"] == "from_env.duckdb"
    assert found["host"] == "http://127.0.0.1:10"
    assert probe(tmp_path, {**env, "WAREHOUSE__MEMORY_LIMIT": "none"})["memory_limit"] is None
    # a delta build's limit: its own, never above memory_limit; "none": memory_limit's
    limits = {"WAREHOUSE__MEMORY_LIMIT": "200MB", "WAREHOUSE__DELTA_MEMORY_LIMIT": "300MB"}
    assert probe(tmp_path, {**env, **limits})["delta_memory_limit"] == "200MB"
    limits = {"WAREHOUSE__DELTA_MEMORY_LIMIT": "none"}
    assert probe(tmp_path, {**env, **limits})["delta_memory_limit"] == "800MB"
    assert probe(tmp_path, env, flag_db="from_flag.duckdb")["warehouse"] == "from_flag.duckdb"
