"""`dodo-segment backup PATH`: a consistent, owner-only copy of a live warehouse.

How: take the run lock (no run writes meanwhile), open the warehouse read-write (DuckDB's own
file lock then keeps notebooks and shells out too), `CHECKPOINT` (the write-ahead log is folded
into the file and emptied), and copy the file's bytes while that connection still holds it.
Why a file copy rather than `ATTACH ... ; COPY FROM DATABASE`: the copy is byte-for-byte the
warehouse (same storage version, every schema, sequence, view and dlt's state tables, no
re-encoding), it needs no second database engine pass over every table, and after a CHECKPOINT
under an exclusive lock the single file *is* the database. The copy is written to a temporary
file beside PATH, fsync'd, renamed over PATH and its folder fsync'd, so PATH is always either the
previous backup or the new one, whole. It is then opened read-only and every table read back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines import lock, warehouse
from pipelines.commands.common import Subcommands, add_command, add_common, load_command_config
from pipelines.config import AppConfig, ConfigError
from pipelines.durable import replace_file
from pipelines.logs import complain, say

COPY_CHUNK = 8 * 1024 * 1024


def _copy(source: Path, target: Path) -> None:
    """Copy source over target whole or not at all (0600, fsync'd, renamed, folder fsync'd)."""
    with open(source, "rb") as src:
        replace_file(target, lambda out: shutil.copyfileobj(src, out, COPY_CHUNK))


def backup_warehouse(config: AppConfig, target: str) -> int:
    """Copy the warehouse to `target` consistently; 0 when the copy reads back whole.

    The caller holds the run lock. Raises ConfigError for a path that cannot be a backup and
    WarehouseError when the copy cannot be written (a full disk: the previous backup stays).
    """
    source = config.warehouse_path
    if source.startswith("md:"):
        raise ConfigError("a MotherDuck warehouse is backed up by MotherDuck, not by this command")
    if not os.path.exists(source):
        raise ConfigError(f"there is no warehouse at {source} to back up")
    destination = Path(target).expanduser().resolve()
    if destination == Path(source).expanduser().resolve():
        raise ConfigError("the backup path is the warehouse itself: choose another file")
    if destination.is_dir():
        raise ConfigError(f"{target} is a folder: give the backup file's path")
    destination.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with warehouse.connect(source) as con:
            con.execute("CHECKPOINT")
            _copy(Path(source), destination)
    except OSError as exc:
        raise warehouse.WarehouseError(
            f"could not write the backup {target}: {exc.strerror or exc}; "
            "the warehouse is untouched and an earlier backup at that path is kept"
        ) from None
    with warehouse.connect(str(destination), read_only=True) as copy:
        version = warehouse.schema_version(copy)
        tables, rows = warehouse.read_every_table(copy)
    size = destination.stat().st_size
    say(
        f"backup: {target} ({size / 1e6:.1f} MB, schema version {version}, {tables} tables, "
        f"{rows} rows read back); continue from it with `dodo-segment run --db {target}` or "
        "copy it over the warehouse",
        backup=str(target),
        bytes=size,
        tables=tables,
        rows=rows,
    )
    return 0


def backup(config: AppConfig, target: str, wait: bool = False) -> int:
    """Take the run lock, then back up (a run in progress: skip with exit 1 unless `wait`)."""
    try:
        with lock.run_lock(config.warehouse_path, "backup", wait=wait):
            return backup_warehouse(config, target)
    except lock.LockBusy as exc:
        complain(
            f"dodo-segment: a run is in progress (pid {exc.holder.pid}); no backup taken: "
            "try again after it, or with --wait"
        )
        return 1


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`backup PATH` and its flags."""
    parser = add_command(
        commands, "backup", summary,
        "Take the run lock, checkpoint DuckDB and copy the warehouse file to PATH (replaced "
        "atomically, mode 0600), then read every table of the copy back. `run --db PATH` "
        "continues from the copy; copy it over the warehouse to restore. Exit 1 when a run "
        "holds the lock (unless --wait) or the copy cannot be written.",
        lambda args: backup(load_command_config(args), args.path, wait=args.wait),
        "example:\n  dodo-segment backup /backups/dodo_segment-$(date +%%F).duckdb",
    )  # fmt: skip
    add_common(parser)
    parser.add_argument("path", metavar="PATH", help="the backup file to write")
    parser.add_argument(
        "--wait", action="store_true", help="wait for a run in progress instead of giving up"
    )
