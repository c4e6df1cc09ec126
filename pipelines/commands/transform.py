"""`dodo-segment transform`: build the models and run the data tests only; `--list` shows them;
`--verify` compares the warehouse's models with a full build."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.common import (
    Subcommands,
    add_command,
    add_common,
    add_wait,
    load_command_config,
    with_lock,
)
from pipelines.config import AppConfig, ModelsConfig
from pipelines.logs import complain
from pipelines.transform import ModelError, list_models, verify_against_full_build

DESCRIPTION = (
    "Rebuild analytics.* from the raw tables and run the data tests; nothing is read from the "
    "API and nothing is sent. Exit 3 when rows were quarantined, 4 when an error test failed."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`transform` and its flags."""
    parser = add_command(commands, "transform", summary, DESCRIPTION, handle)
    add_common(parser)
    add_wait(parser)
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the models in build order, the user's (`[models] paths`) marked, and exit",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="rebuild a scratch copy in full and compare every analytics table with this "
        "warehouse's; exit 7 and show the differing keys when they drift",
    )


def handle(args: argparse.Namespace) -> int:
    """List the models, or build them in full under the run lock."""
    from pipelines.commands.run import run_and_report
    from pipelines.job import RunOptions

    config = load_command_config(args)
    if args.list:
        return show_models(config)
    if args.verify:
        return with_lock(config, "transform", args.wait, lambda: verify_models(config))
    options = RunOptions(only_emit=True, skip_emit=True, command="transform")
    return with_lock(config, "transform", args.wait, lambda: run_and_report(config, options))


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def show_models(config: AppConfig) -> int:
    """Print one line per model: name, materialization, origin (product, user, user replacing
    the product's model of that name). Exit 0."""
    user = config.models or ModelsConfig()
    try:
        models = list_models(user_paths=user.paths)
    except ModelError as exc:
        complain(str(exc))
        return 1
    width = max(len(m.name) for m in models)
    for model in models:
        if model.replaces:
            origin = f"user, replaces the product's model: {_shown(model.path)}"
        elif model.layer == "user":
            origin = f"user: {_shown(model.path)}"
        else:
            origin = f"product ({model.layer})"
        print(f"{model.name:<{width}}  {model.materialized:<5}  {origin}")
    if not user.paths:
        print("(no user models: add SQL files to models/ or set [models] paths)")
    return 0


MODELS_DRIFTED = 7
"""Exit code of `transform --verify` when the warehouse differs from a full build."""


def verify_models(config: AppConfig) -> int:
    """`transform --verify`: rebuild a scratch copy of the warehouse in full and compare every
    analytics table with the warehouse's. Exit 0 when equal, MODELS_DRIFTED (the differing
    tables and a sample of their keys printed) when not, 1 when the build fails."""
    from pipelines.job import full_build

    if not Path(config.warehouse_path).exists():
        complain(f"no warehouse at {config.warehouse_path}: run `dodo-segment run` first")
        return 1
    try:
        drifts = verify_against_full_build(
            config.warehouse_path, lambda con: full_build(config, con, incremental=False)
        )
    except ModelError as exc:
        complain(str(exc))
        return 1
    if not drifts:
        print("models verified: every analytics table equals a full build")
        return 0
    print(f"models drifted: {len(drifts)} table(s) differ from a full build")
    for drift in drifts:
        print(f"  {drift}")
    print("repair: `dodo-segment transform` rebuilds every model in full")
    return MODELS_DRIFTED
