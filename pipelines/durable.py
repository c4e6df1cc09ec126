"""Files replaced whole or not at all: a temporary file, fsync, rename over, fsync of the folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new link) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(target: Path, write: Callable[[BinaryIO], None], mode: int = 0o600) -> None:
    """Write `target` through `write(file)` into a temporary file beside it (created with `mode`),
    fsync it, rename it over `target` and fsync the folder: `target` is the old file or the new
    one, whole. On any error (a full disk, say) the temporary file is removed and it raises."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)
