"""Fault injection for the Dodo simulator: error statuses, slow or broken responses, bad items."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("status", "timeout", "reset", "malformed_json", "mutate")


@dataclass
class PageContext:
    """What a `mutate` hook sees besides the page's items (deep copies)."""

    path: str
    query: dict[str, str]
    page_number: int
    page_size: int
    ordered: list[dict[str, Any]]
    """Every item matching the filter, in serving order (read-only: do not edit)."""


Mutator = Callable[[list[dict[str, Any]], PageContext], list[dict[str, Any]]]


@dataclass
class Fault:
    """One injected fault; consumed `times` times by matching requests, in injection order."""

    kind: str = "status"
    path: str | None = None
    status: int = 500
    retry_after: float | None = None
    delay: float = 5.0
    mutate: Mutator | None = None
    match: Callable[[dict[str, str]], bool] | None = None
    times: int = 1
    hits: int = 0
    body: dict[str, Any] = field(default_factory=dict)

    def matches(self, path: str, query: dict[str, str]) -> bool:
        """Whether this fault applies to a request and has uses left."""
        if self.hits >= self.times or (self.path is not None and self.path != path):
            return False
        return self.match is None or self.match(query)


# --- ready-made mutators ----------------------------------------------------------------------


def drop_field(name: str) -> Mutator:
    """Remove a field from every item of the page."""

    def hook(items: list[dict[str, Any]], ctx: PageContext) -> list[dict[str, Any]]:
        for item in items:
            item.pop(name, None)
        return items

    return hook


def set_field(name: str, value: Any, first_only: bool = False) -> Mutator:
    """Set a field (e.g. an unknown field, or an unknown enum value) on the page's items."""

    def hook(items: list[dict[str, Any]], ctx: PageContext) -> list[dict[str, Any]]:
        for item in items[:1] if first_only else items:
            item[name] = value
        return items

    return hook


def huge_metadata(kilobytes: int = 40) -> Mutator:
    """Give the first item of the page a metadata object of about `kilobytes` KB."""
    blob = {f"k{i:04d}": "x" * 90 for i in range(kilobytes * 1024 // 100)}
    return set_field("metadata", blob, first_only=True)


def shift_page(by: int = 1) -> Mutator:
    """Serve the page as if `by` rows were inserted before it (repeats the previous page's tail)."""

    def hook(items: list[dict[str, Any]], ctx: PageContext) -> list[dict[str, Any]]:
        start = max(0, ctx.page_number * ctx.page_size - by)
        return [dict(item) for item in ctx.ordered[start : start + ctx.page_size]]

    return hook
