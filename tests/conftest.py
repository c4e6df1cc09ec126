"""Shared fixtures: an isolated environment and the embedded sandbox (simulator + collector)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipelines.config import AppConfig, load_config
from pipelines.sandbox.business import Business, generate_business
from pipelines.sandbox.collector import SegmentCollector
from pipelines.sandbox.simulator import DodoSimulator
from tests.cli_forkserver import ForkServer, text

API_KEY = "test_dodo_key_5f1c2a9e"
WRITE_KEY = "test_write_key_8b3d7e01"
CONTRACT_ENV = (
    "DODO_PAYMENTS_API_KEY",
    "DODO_PAYMENTS_ENVIRONMENT",
    "DODO_PAYMENTS_BASE_URL",
    "DODO_SEGMENT_DB",
    "SEGMENT_WRITE_KEY",
    "SEGMENT_HOST",
)
REPO = Path(__file__).resolve().parents[1]
_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember the outcome for pytest_unconfigure."""
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process after pytest's summary, with its exit status.

    DuckDB's native bindings print pages of "nanobind: leaked instance" lines during interpreter
    teardown (harmless, but they bury the summary line that CI reads). An xdist worker ends the
    same way once it has reported to the controller.
    """
    for server in _FORK_SERVERS:
        if server is not None:
            server.close()
    if _EXIT_STATUS and not os.environ.get("DODO_SEGMENT_FULL_TEARDOWN"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: tests go one by one to the next free worker, except that a module
    marked `xdist_group` goes whole to one worker, so its module-scoped setup is built once.

    xdist's own loadgroup leaves every test alone under pytest 9 (the group suffix it writes to
    `item._nodeid` no longer reaches the node ids the controller schedules), so the grouping is
    done here: the controller sees node ids only, so a module's mark is read from its source.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    tests = Path(__file__).resolve().parent
    grouped = {p.name for p in tests.glob("test_*.py") if "xdist_group" in p.read_text()}

    class SharedSetupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in grouped else nodeid

    return SharedSetupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tests first: on two workers a long test started last would run alone at the end.
    (Ordering the longest modules first was measured worse: 8 min 40 s against 8 min 5 s.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The fast tier stays fast: a test (or a fixture it sets up) that starts a subprocess (the
    real CLI, a wheel build, a notebook kernel, a browser) must be marked `slow`. (Heavy
    in-process scenarios, several job runs each, are marked `slow` by hand, from `--durations`.)"""
    if item.get_closest_marker("slow"):
        yield
        return
    popen_init = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{item.nodeid} starts a subprocess ({args!r}): mark it slow")

    subprocess.Popen.__init__ = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config leaks in: fresh cwd (no .dlt/), no contract variables, no telemetry."""
    for name in CONTRACT_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(("SOURCES__", "SEGMENT__", "EVENTS__", "WAREHOUSE__")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.chdir(tmp_path)


@dataclass
class Sandbox:
    """A running simulator and collector, plus the settings that point the job at them."""

    business: Business
    simulator: DodoSimulator
    collector: SegmentCollector
    db: str
    wall: datetime

    def flags(self, **overrides: Any) -> dict[str, Any]:
        """Job settings (by dlt path) aimed at this sandbox, with fast retries."""
        flags: dict[str, Any] = {
            "warehouse.path": self.db,
            "sources.dodo.api_key": API_KEY,
            "sources.dodo.base_url": self.simulator.base_url,
            "sources.dodo.environment": "test_mode",
            "sources.dodo.requests_per_minute": 0,
            "sources.dodo.max_retries": 4,
            "sources.dodo.timeout_seconds": 5,
            # retries wait 50 ms, 100 ms, ... instead of 1 s, 2 s, ...: the count is what's tested
            "sources.dodo.backoff_seconds": 0.05,
            "segment.write_key": WRITE_KEY,
            "segment.host": self.collector.base_url,
            "segment.max_retries": 2,
            "segment.timeout_seconds": 5,
            # the sandbox's clock: a run reads the business as of its simulated "now"
            "sources.dodo.as_of": self.business.now.isoformat(),
        }
        flags.update({k.replace("__", "."): v for k, v in overrides.items()})
        return flags

    def config(self, **overrides: Any) -> AppConfig:
        """An AppConfig for this sandbox."""
        return load_config(self.flags(**overrides))

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for driving the real CLI as a subprocess against this sandbox."""
        env = {k: v for k, v in os.environ.items() if k not in CONTRACT_ENV}
        env.update(
            {
                "DODO_PAYMENTS_API_KEY": API_KEY,
                "DODO_PAYMENTS_BASE_URL": self.simulator.base_url,
                "DODO_PAYMENTS_ENVIRONMENT": "test_mode",
                "DODO_SEGMENT_DB": self.db,
                "SEGMENT_WRITE_KEY": WRITE_KEY,
                "SEGMENT_HOST": self.collector.base_url,
                "SOURCES__DODO__REQUESTS_PER_MINUTE": "0",
                "SOURCES__DODO__MAX_RETRIES": "3",
                "SOURCES__DODO__TIMEOUT_SECONDS": "5",
                "SOURCES__DODO__BACKOFF_SECONDS": "0.05",
                "SEGMENT__MAX_RETRIES": "2",
                "SEGMENT__TIMEOUT_SECONDS": "5",
                "SOURCES__DODO__AS_OF": self.business.now.isoformat(),
                "RUNTIME__DLTHUB_TELEMETRY": "false",
            }
        )
        env.update(extra)
        return env


def make_sandbox(tmp_path: Path, customers: int = 120, page_cap: int = 100) -> Iterator[Sandbox]:
    """Start a sandbox whose business ends a week ago, so advance_time can bring it to now."""
    wall = datetime.now(UTC).replace(microsecond=0)
    business = generate_business(seed=11, customers=customers, now=wall - timedelta(days=7))
    with (
        DodoSimulator(business, api_key=API_KEY, page_cap=page_cap) as simulator,
        SegmentCollector(write_key=WRITE_KEY) as collector,
    ):
        yield Sandbox(business, simulator, collector, str(tmp_path / "warehouse.duckdb"), wall)


@pytest.fixture()
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A small business (120 customers) behind a simulator, and an empty collector."""
    yield from make_sandbox(tmp_path)


_FORK_SERVERS: list[ForkServer | None] = []


def fork_server() -> ForkServer | None:
    """This process's CLI fork server, started at the first call (None: exec every call)."""
    if not _FORK_SERVERS:
        server = None
        if not os.environ.get("DODO_SEGMENT_TEST_EXEC"):
            import tempfile

            try:
                server = ForkServer(Path(tempfile.mkdtemp(prefix="dodo-cli-")))
            except (OSError, RuntimeError) as exc:  # e.g. a socket path over 107 bytes
                warnings.warn(f"CLI fork server unavailable, every call execs: {exc}", stacklevel=2)
        _FORK_SERVERS.append(server)
    return _FORK_SERVERS[0]


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 180, umask: int | None = None
) -> subprocess.CompletedProcess:
    """Run the `dodo-segment` console script in its own process: a warm fork of a process that
    has imported it already (tests/cli_forkserver.py), or a real exec of the installed script
    when the environment changes how Python starts. `umask`: the process's umask before the CLI
    sets its own."""
    exe = str(Path(sys.executable).with_name("dodo-segment"))
    server = fork_server()
    if server is not None and server.accepts(env):
        code, out, err = server.run(exe, list(args), env, timeout, umask)
        return subprocess.CompletedProcess([exe, *args], code, text(out), text(err))
    return subprocess.run(
        [exe, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )  # fmt: skip


@pytest.fixture(scope="session")
def synced_sandbox_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warehouse after two runs on an 80-customer sandbox (a first sync sending the last 60
    days of events, then a week later): shared by the notebook and report tests, read-only."""
    from dataclasses import replace

    from pipelines.job import RunOptions, run_job

    tmp = tmp_path_factory.mktemp("synced-sandbox")
    sandboxes = make_sandbox(tmp, customers=80)
    sandbox = next(sandboxes)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp)
            config = sandbox.config()
            business = sandbox.business
            first = run_job(
                replace(config, extract=replace(config.extract, as_of=business.now)),
                RunOptions(events_since=business.now - timedelta(days=60)),
            )
            assert first.exit_code in (0, 3), first.error
            business.advance_time(until=sandbox.wall)
            second = run_job(config, RunOptions())
            assert second.exit_code in (0, 3), second.error
    finally:
        sandboxes.close()
    return Path(sandbox.db)
