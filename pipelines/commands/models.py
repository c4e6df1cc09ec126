"""`dodo-segment transform --list`: the models in build order, the user's marked; and
`transform --verify`: the warehouse's models compared with a full build."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb

from pipelines.config import AppConfig, ModelsConfig
from pipelines.logs import complain
from pipelines.transform import ModelError, list_models, run_models, verify_against_full_build


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


def full_build(config: AppConfig) -> Callable[[duckdb.DuckDBPyConnection], None]:
    """A full build of the models with the configuration's catalog, user models and rules."""
    user = config.models or ModelsConfig()

    def build(con: duckdb.DuckDBPyConnection) -> None:
        run_models(
            con,
            event_catalog=config.segment.event_catalog,
            user_paths=user.paths,
            skip_events=user.skip_events,
            rename_events=user.rename_events,
        )

    return build


def verify_models(config: AppConfig) -> int:
    """`transform --verify`: rebuild a scratch copy of the warehouse in full and compare every
    analytics table with the warehouse's. Exit 0 when equal, MODELS_DRIFTED (the differing
    tables and a sample of their keys printed) when not, 1 when the build fails."""
    if not Path(config.warehouse_path).exists():
        complain(f"no warehouse at {config.warehouse_path}: run `dodo-segment run` first")
        return 1
    try:
        drifts = verify_against_full_build(config.warehouse_path, full_build(config))
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
