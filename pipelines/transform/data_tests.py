"""Data tests in SQL next to the models: parse `<model>.tests.sql`, run them, quarantine rows.

Format of `sql/<layer>/<model>.tests.sql`: blocks, each starting with header comments

    -- test: lifecycle_events_unknown_customer
    -- severity: warn            (error | warn)
    -- quarantine: event_id      (optional; event_id | user_id: the query's column to set aside)
    select event_id, customer_id from analytics.lifecycle_events where ...

The query returns the offending rows; zero rows = pass. An `error` failure blocks emission; a
`warn` failure is reported, and with `quarantine:` its keys go to `analytics.quarantined_rows`,
which the outbox models exclude.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from pipelines import dodo_contract

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
SEVERITIES = ("error", "warn")
QUARANTINE_KINDS = ("event_id", "user_id")
SAMPLE_SIZE = 20

_BLOCK_START = re.compile(r"^\s*--\s*test\s*:\s*([a-z0-9_]+)\s*$", re.IGNORECASE | re.MULTILINE)
_HEADER = re.compile(r"^\s*--\s*(severity|quarantine)\s*:\s*([a-z_]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DataTest:
    """One data test: a query returning offending rows of `model`."""

    name: str
    model: str
    severity: str
    quarantine: str | None
    sql: str
    path: Path


@dataclass
class DataTestResult:
    """Outcome of one data test: failing row count, a sample of them, rows quarantined."""

    name: str
    model: str
    severity: str
    failures: int
    quarantined: int = 0
    sample: list[dict[str, object]] = field(default_factory=list)
    touched_only: bool = False
    """Run over the touched keys' rows of a delta build (`scoped_tests`), not whole tables."""

    def __str__(self) -> str:
        return f"{self.name} ({self.model}, {self.severity}): {self.failures} offending row(s)"

    @property
    def passed(self) -> bool:
        """True when the test found no offending row."""
        return self.failures == 0


def parse_data_tests(path: Path) -> list[DataTest]:
    """The tests of one `<model>.tests.sql` file."""
    model = path.name.removesuffix(".tests.sql")
    text = path.read_text()
    starts = list(_BLOCK_START.finditer(text))
    tests: list[DataTest] = []
    for i, start in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        block = text[start.end() : end]
        headers: dict[str, str] = {}
        body: list[str] = []
        for line in block.splitlines():
            match = _HEADER.match(line)
            if match and not body:
                headers[match.group(1).lower()] = match.group(2).lower()
            elif line.strip() and not line.lstrip().startswith("--"):
                body.append(line)
            elif body:
                body.append(line)
        severity = headers.get("severity", "error")
        quarantine = headers.get("quarantine")
        if severity not in SEVERITIES:
            raise ValueError(f"{path}: test {start.group(1)}: unknown severity {severity!r}")
        if quarantine is not None and quarantine not in QUARANTINE_KINDS:
            raise ValueError(f"{path}: test {start.group(1)}: unknown quarantine {quarantine!r}")
        sql = "\n".join(body).strip().rstrip(";")
        tests.append(DataTest(start.group(1), model, severity, quarantine, sql, path))
    return tests


def load_data_tests(sql_dir: Path, model_names: set[str]) -> list[DataTest]:
    """Every data test under `sql_dir`, each attached to the model its file is named after."""
    tests: list[DataTest] = []
    for path in sorted(Path(sql_dir).glob("*/*.tests.sql")):
        model = path.name.removesuffix(".tests.sql")
        if model not in model_names:
            raise ValueError(f"{path}: no model named {model!r} to attach these tests to")
        tests.extend(parse_data_tests(path))
    names = [t.name for t in tests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate data test names: {duplicates}")
    return tests


def reset_quarantine(con: duckdb.DuckDBPyConnection) -> datetime:
    """Recreate `analytics.quarantined_rows` empty (rebuilt every run); return the run time."""
    con.execute(f"create schema if not exists {SCHEMA}")
    con.execute(
        f"create or replace table {SCHEMA}.quarantined_rows ("
        "test_name VARCHAR, key_kind VARCHAR, key VARCHAR, detected_at TIMESTAMPTZ)"
    )
    row = con.execute("select current_timestamp").fetchone()
    assert row is not None
    return row[0]


def offending_rows(
    con: duckdb.DuckDBPyConnection, test: DataTest, sql: str
) -> tuple[int, list[dict[str, object]]]:
    """How many rows `sql` (the test's query, or a narrowed copy of it) returns, and a sample
    of them (read only when there are some)."""
    try:
        count_row = con.execute(f"select count(*) from ({sql})").fetchone()
        assert count_row is not None
        sample: list[dict[str, object]] = []
        if count_row[0]:
            rel = con.execute(f"select * from ({sql}) limit {SAMPLE_SIZE}")
            columns = [d[0] for d in rel.description or []]
            sample = [dict(zip(columns, row, strict=True)) for row in rel.fetchall()]
    except duckdb.Error as exc:
        raise ValueError(f"{test.path}: data test {test.name} failed to run: {exc}") from exc
    return int(count_row[0]), sample


def run_data_test(
    con: duckdb.DuckDBPyConnection, test: DataTest, run_at: datetime
) -> DataTestResult:
    """Run one test; quarantine its keys when it is a failing `warn` test with `quarantine:`."""
    failures, sample = offending_rows(con, test, test.sql)
    result = DataTestResult(test.name, test.model, test.severity, failures, sample=sample)
    if result.failures and test.severity == "warn" and test.quarantine:
        con.execute(
            f"insert into {SCHEMA}.quarantined_rows "
            f"select distinct ?, ?, cast({test.quarantine} as varchar), ? "
            f"from ({test.sql}) where {test.quarantine} is not null",
            [test.name, test.quarantine, run_at],
        )
        quarantined = con.execute(
            f"select count(*) from {SCHEMA}.quarantined_rows where test_name = ?",
            [test.name],
        ).fetchone()
        result.quarantined = int(quarantined[0]) if quarantined else 0
    return result


def save_data_test_results(
    con: duckdb.DuckDBPyConnection, results: list[DataTestResult], run_at: datetime
) -> None:
    """Write this run's outcomes to `analytics.data_test_results` (replaced every run)."""
    con.execute(
        f"create or replace table {SCHEMA}.data_test_results ("
        "test_name VARCHAR, model VARCHAR, severity VARCHAR, failures BIGINT, "
        "quarantined BIGINT, status VARCHAR, run_at TIMESTAMPTZ)"
    )
    rows = [
        (
            r.name,
            r.model,
            r.severity,
            r.failures,
            r.quarantined,
            "pass" if r.passed else ("fail" if r.severity == "error" else "warn"),
            run_at,
        )
        for r in results
    ]
    if rows:
        con.executemany(
            f"insert into {SCHEMA}.data_test_results values (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
