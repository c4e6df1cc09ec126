"""dlt's pure per-run lookups done once: what a run paid again and again for the same answer.

Profiled on the soak (150 customers, a 5-minute tick), dlt spent ~1 s of CPU a run resolving
the same configuration: whether a config field's type hint is a secret (~26,000 calls a run
from the environment provider, each walking `typing` internals), the type hints of its schema
TypedDicts on every table-hint validation (dlt's own TODO in `dlt.common.validation`: "very
slow and we possibly should cache the result"), and the destination's partial configuration
behind each `capabilities()` call (15 a run, ~40 ms each). All three are functions of values
that do not change while a process runs (a type, a TypedDict class, the destination's explicit
settings and the environment when the pipeline is made), so their answer is kept.

Nothing dlt decides changes: the same functions answer, only once per input. Checked against
dlt 1.31 (`check_dlt_shape` fails loudly if a newer dlt moved what is wrapped).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

_INSTALLED = False


def _memo_on_hashable(fn: Any) -> Any:
    """`fn` with its answers kept per argument; an unhashable argument is simply not kept."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def lookup(hint: Any) -> Any:
        try:
            return cached(hint)
        except TypeError:  # an unhashable hint (rare): ask dlt every time
            return fn(hint)

    lookup.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return lookup


def _type_hints_kept(get_type_hints: Any) -> Any:
    """dlt's `get_type_hints(spec, globalns=...)` for its schema TypedDicts, kept per class.

    A fresh dict is returned each time (the callers only read it, but a kept dict must not be
    shared with a caller that might change it)."""
    kept: dict[Any, dict[str, Any]] = {}

    @functools.wraps(get_type_hints)
    def hints(spec: Any, globalns: Any = None, localns: Any = None, **kwargs: Any) -> Any:
        if localns is not None or kwargs:
            return get_type_hints(spec, globalns=globalns, localns=localns, **kwargs)
        try:
            found = kept.get(spec)
        except TypeError:  # unhashable: not a class
            return get_type_hints(spec, globalns=globalns)
        if found is None:
            found = kept[spec] = get_type_hints(spec, globalns=globalns)
        return dict(found)

    return hints


def install() -> None:
    """Keep the answers of dlt's pure lookups for the life of the process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from dlt.common import validation
    from dlt.common.configuration.providers import environ

    check_dlt_shape()
    environ.is_secret_hint = _memo_on_hashable(environ.is_secret_hint)
    validation.get_type_hints = _type_hints_kept(validation.get_type_hints)
    _INSTALLED = True


def keep_partial_configuration(destination: Any) -> Any:
    """The destination with its partial configuration (what `capabilities()` resolves from the
    environment, with mock credentials, on each of its ~15 calls a run) resolved once.

    Only `configuration(..., accept_partial=True)` is kept, which dlt 1.31 calls from
    `capabilities()` alone; the full resolution behind `client()` (credentials included) is
    untouched. The destination is made per run, so the environment of that run is the one
    read."""
    resolve = destination.configuration
    kept: list[Any] = []

    def configuration(initial_config: Any, accept_partial: bool = False) -> Any:
        if not accept_partial:
            return resolve(initial_config, accept_partial=False)
        if not kept:
            kept.append(resolve(initial_config, accept_partial=True))
        return kept[0]

    destination.configuration = configuration
    return destination


def check_dlt_shape() -> None:
    """Fail loudly if dlt no longer has what `install` wraps (a dlt upgrade moved it)."""
    from dlt.common import validation
    from dlt.common.configuration.providers import environ
    from dlt.common.destination.reference import Destination

    missing = [
        name
        for name, ok in (
            ("environ.is_secret_hint", callable(getattr(environ, "is_secret_hint", None))),
            ("validation.get_type_hints", callable(getattr(validation, "get_type_hints", None))),
            ("Destination.configuration", hasattr(Destination, "configuration")),
        )
        if not ok
    ]
    if missing:
        version = getattr(sys.modules.get("dlt"), "__version__", "?")
        raise RuntimeError(f"dlt {version} no longer has {', '.join(missing)}: update dlt_lookups")
