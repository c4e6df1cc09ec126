"""`dodo-segment init [DIR]`: a project folder the user keeps in their own git (like `dbt init`).

The templates are package data (`project_template/`); names that git or the package build would
treat specially are stored without their dot (`dlt/` -> `.dlt/`, `gitignore` -> `.gitignore`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.commands.common import Subcommands, add_command
from pipelines.logs import complain, say

TEMPLATE_DIR = Path(__file__).resolve().parent / "project_template"
"""The files `init` writes, as shipped in the package."""

SECRETS = Path(".dlt") / "secrets.toml"
"""Written owner-only (0600)."""

USAGE_ERROR = 2


DESCRIPTION = (
    "Create DIR (default: the current folder) with .dlt/config.toml (every setting, commented), "
    ".dlt/secrets.toml (key placeholders, owner-only), .gitignore, models/ with an example custom "
    "trait and custom event, and a README. Run dodo-segment from that folder to use them. "
    "Existing files are never overwritten without --force (exit 2)."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`init` and its arguments."""
    parser = add_command(
        commands, "init", summary, DESCRIPTION,
        lambda args: init_project(args.dir, force=args.force),
        "example:\n  dodo-segment init my-sync && cd my-sync && dodo-segment demo",
    )  # fmt: skip
    parser.add_argument("dir", nargs="?", default=".", metavar="DIR", help="the project folder")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def _target(relative: Path) -> Path:
    """Where a template file goes in the project folder."""
    parts = list(relative.parts)
    if parts[0] == "dlt":
        parts[0] = ".dlt"
    if parts == ["gitignore"]:
        parts = [".gitignore"]
    return Path(*parts)


def project_files() -> dict[Path, Path]:
    """Project path (relative) -> template file, for every file `init` writes."""
    return {
        _target(path.relative_to(TEMPLATE_DIR)): path
        for path in sorted(TEMPLATE_DIR.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def init_project(directory: str = ".", force: bool = False) -> int:
    """Write the project's files into `directory`; refuse (exit 2, nothing written) when one
    exists already, unless `force`. Exit 0 when written."""
    root = Path(directory).expanduser()
    files = project_files()
    existing = [str(rel) for rel in files if (root / rel).exists()]
    if existing and not force:
        complain(
            f"{root} already has {', '.join(existing)}: nothing was written "
            "(dodo-segment init --force overwrites them)"
        )
        return USAGE_ERROR
    for relative, template in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(template.read_bytes())
        if relative == SECRETS:
            os.chmod(target, 0o600)  # keys: owner-only whatever the umask
    say(
        f"Created a dodo-segment project in {root.resolve()}: "
        + ", ".join(str(rel) for rel in files)
        + f"\nNext: cd {directory} && dodo-segment demo   (the sandbox, with your models/), then"
        " put your keys in .dlt/secrets.toml and run dodo-segment doctor",
        files=[str(rel) for rel in files],
    )
    return 0
