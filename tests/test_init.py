"""`dodo-segment init`: a project folder whose settings and models the job uses."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from tests.conftest import Sandbox, run_cli

pytestmark = pytest.mark.slow  # every test here drives a subprocess

FILES = (
    ".dlt/config.toml",
    ".dlt/secrets.toml",
    ".gitignore",
    "README.md",
    "models/custom_traits.sql",
    "models/custom_events.sql",
)


def test_init_writes_the_project_and_never_overwrites_without_force(tmp_path: Path) -> None:
    created = run_cli("init", "my-sync", env={})
    assert created.returncode == 0, created.stderr
    project = tmp_path / "my-sync"
    for name in FILES:
        assert (project / name).is_file(), name
    assert stat.S_IMODE((project / ".dlt/secrets.toml").stat().st_mode) == 0o600
    assert ".dlt/secrets.toml" in (project / ".gitignore").read_text().splitlines()
    config = (project / ".dlt/config.toml").read_text()
    for knob in ("requests_per_minute", "lookback_days", "excluded_fields", "catalog", "skip",
                 "rename", "paths", "skip_unchanged", "memory_limit", "host"):  # fmt: skip
        assert f"# {knob} = " in config, knob
    assert all(
        line.startswith("#") or line.startswith("[") or not line.strip()
        for line in config.splitlines()
    )  # every knob commented: defaults apply until the user says otherwise

    (project / "models/custom_traits.sql").write_text("-- mine\n")
    again = run_cli("init", "my-sync", env={})
    assert again.returncode == 2
    assert "already has" in again.stderr and "--force" in again.stderr
    assert (project / "models/custom_traits.sql").read_text() == "-- mine\n"

    forced = run_cli("init", "my-sync", "--force", env={})
    assert forced.returncode == 0, forced.stderr
    assert "latest_plan" in (project / "models/custom_traits.sql").read_text()


def test_the_job_run_from_the_project_uses_its_settings_and_models(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("init", "project", env={}).returncode == 0
    project = tmp_path / "project"
    monkeypatch.chdir(project)  # the CLI runs from the project folder
    config = project / ".dlt/config.toml"
    config.write_text(config.read_text().replace('# skip = ["Payment Failed"]', 'skip = ["Payment Failed"]'))  # fmt: skip

    result = run_cli("run", "--events-since", "2000-01-01", env=sandbox.env())
    assert result.returncode in (0, 3), result.stderr
    identifies = sandbox.collector.identifies()
    plans = {
        s["customer"]["customer_id"]: s["product_name"]
        for s in sorted(sandbox.business.tables["subscriptions"].items, key=lambda s: s["created_at"])
    }  # fmt: skip
    assert plans and all(
        m["traits"].get("latest_plan") == plans.get(m["userId"]) for m in identifies
    )
    sent = Counter(m["event"] for m in sandbox.collector.tracks())
    assert sent["High Value Payment"] > 0
    assert sent["Payment Failed"] == 0 and sent["Payment Completed"] > 0


def test_the_examples_run_on_the_demo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("init", "demo-project", env={}).returncode == 0
    monkeypatch.chdir(tmp_path / "demo-project")
    demo = run_cli("demo", env=dict(os.environ))
    assert demo.returncode == 0, demo.stderr
    assert "High Value Payment" in demo.stdout
    with duckdb.connect("demo.duckdb", read_only=True) as con:
        delivered = con.execute(
            "select count(*) from segment_sync.delivered_events join analytics.custom_events "
            "using (event_id) where status = 'delivered'"
        ).fetchone()
        traits = con.execute(
            "select count(*) from analytics.identify_outbox where traits ->> 'latest_plan' is not null"
        ).fetchone()
    assert delivered and delivered[0] > 0
    assert traits and traits[0] > 0
