"""`dodo-segment transform --list`: the models in build order, the user's marked."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import AppConfig, ModelsConfig
from pipelines.logs import complain
from pipelines.transform import ModelError, list_models


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
