"""A backlog of stored webhook deliveries merged a bounded batch at a time (issue 23's flood).

The sandbox's business changes for a few days, the signed webhooks of what changed are stored as
the listener stores them (some twice under the same webhook-id, as Dodo retries), and the merge
reads them a few at a time: the raw tables end as one merge of the whole backlog leaves them,
each delivery is marked merged exactly once, and a batch merged again after a crash (its files
back in pending/) changes nothing.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from pipelines.extract import merge_webhooks
from pipelines.job import RunOptions, run_job
from pipelines.sandbox.webhooks import changes_since, snapshot
from pipelines.webhook_store import WebhookStore, store_folder
from tests.conftest import Sandbox, make_sandbox

pytestmark = pytest.mark.slow  # a first sync and three merges of a backlog: several seconds

OBJECTS = {"payments": "payment_id", "subscriptions": "subscription_id",
           "refunds": "refund_id", "disputes": "dispute_id"}  # fmt: skip


@pytest.fixture()
def backlog(tmp_path: Path) -> Iterator[tuple[Sandbox, int]]:
    """A synced warehouse and a few days of deliveries waiting in its store (unique count)."""
    for sandbox in make_sandbox(tmp_path, customers=40):
        run_job(sandbox.config(), RunOptions(skip_emit=True))
        store = WebhookStore(store_folder(sandbox.db)).ensure()
        rng = random.Random(23)
        unique = 0
        for day in range(3):
            before = snapshot(sandbox.business)
            sandbox.business.advance_time(days=1, seed=day)
            for n, payload in enumerate(changes_since(before, sandbox.business)):
                webhook_id = f"msg_{day}_{n}"
                unique += store.store(webhook_id, payload)
                if rng.random() < 0.1:  # Dodo's retry: the same webhook-id again
                    assert not store.store(webhook_id, payload)
        yield sandbox, unique


def copy_of(sandbox: Sandbox, folder: Path) -> str:
    """The warehouse and its webhook store copied into `folder`; the copy's warehouse path."""
    folder.mkdir()
    db = str(folder / "warehouse.duckdb")
    shutil.copy(sandbox.db, db)
    shutil.copytree(store_folder(sandbox.db), store_folder(db))
    return db


def raw_objects(db: str) -> dict[str, set[tuple]]:
    """Every row of the raw object tables (dlt's load columns left out)."""
    found = {}
    with duckdb.connect(db, read_only=True) as con:
        for table, key in OBJECTS.items():
            columns = [c for (c,) in con.execute(
                "select column_name from information_schema.columns where table_schema = "
                "'dodo_raw' and table_name = ? and column_name not like '\\_dlt%' escape '\\' "
                "order by column_name", [table]).fetchall()]  # fmt: skip
            names = ", ".join(f'"{c}"' for c in columns)
            found[table] = set(con.execute(f"select {names} from dodo_raw.{table}").fetchall())
            assert (
                len(found[table])
                == con.execute(f"select count(distinct {key}) from dodo_raw.{table}").fetchone()[0]
            )  # one row per object
    return found


def test_a_backlog_merged_in_batches_ends_as_one_merge(
    backlog: tuple[Sandbox, int], tmp_path: Path
) -> None:
    sandbox, unique = backlog
    assert unique > 30
    whole_db, batched_db = copy_of(sandbox, tmp_path / "whole"), copy_of(sandbox, tmp_path / "b")
    whole = merge_webhooks(sandbox.config(warehouse__path=whole_db), batch_size=unique + 1)
    batched = merge_webhooks(sandbox.config(warehouse__path=batched_db), batch_size=7)
    assert whole.deliveries == batched.deliveries == unique  # each stored delivery, once
    assert whole.merged and batched.merged
    assert raw_objects(batched_db) == raw_objects(whole_db)
    store = WebhookStore(store_folder(batched_db))
    assert store.pending_count() == 0
    assert len(list(store.merged_dir.iterdir())) == unique


def test_a_batch_merged_again_after_a_crash_changes_nothing(
    backlog: tuple[Sandbox, int], tmp_path: Path
) -> None:
    sandbox, unique = backlog
    pending = WebhookStore(store_folder(sandbox.db)).pending_dir
    kept = tmp_path / "kept"
    shutil.copytree(pending, kept)  # the files as they were before the merge
    merge_webhooks(sandbox.config(), batch_size=10)
    after = raw_objects(sandbox.db)
    # a crash after a batch's commit and before its marking: its files are still pending
    for path in sorted(kept.iterdir())[:10]:
        shutil.copy(path, pending / path.name)
    again = merge_webhooks(sandbox.config(), batch_size=10)
    assert again.deliveries == 10
    assert not again.merged  # every event older than (or as old as) the warehouse's row
    assert again.older_than_warehouse > 0
    assert raw_objects(sandbox.db) == after
    assert WebhookStore(store_folder(sandbox.db)).pending_count() == 0
