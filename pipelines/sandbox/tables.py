"""The sandbox business's storage: one table per resource, and who is told of its changes."""

from __future__ import annotations

import bisect
from array import array
from typing import Any, Protocol

from pipelines.dodo_contract import PRIMARY_KEYS
from pipelines.sandbox.records import parse_iso

Item = dict[str, Any]


class Watcher(Protocol):
    """Told of every change made through the Business (`webhooks.Snapshot` is one)."""

    def changing(self, resource: str, item: Item) -> None:
        """`item`, which existed, is about to be edited in place."""

    def created(self, resource: str, item: Item) -> None:
        """`item` was just added."""


class Table:
    """One resource's items sorted by created_at, with their microsecond keys (a compact array,
    8 bytes a key) and an id index."""

    __slots__ = ("resource", "pk", "items", "keys", "by_id")

    def __init__(self, resource: str, rows: list[tuple[int, Item]], index: bool = True) -> None:
        self.resource, self.pk = resource, PRIMARY_KEYS[resource]
        self.items: list[Item] = [item for _, item in rows]
        self.keys = array("q", [key for key, _ in rows])
        self.by_id: dict[str, Item] | None = (
            {item[self.pk]: item for item in self.items} if index else None
        )

    def add(self, item: Item, created_us: int | None = None) -> None:
        """Insert an item at its created_at position."""
        key = parse_iso(item["created_at"]) if created_us is None else created_us
        at = bisect.bisect_right(self.keys, key)
        self.keys.insert(at, key)
        self.items.insert(at, item)
        if self.by_id is not None:
            self.by_id[item[self.pk]] = item

    def get(self, item_id: str) -> Item | None:
        """The item with this primary key, or None."""
        if self.by_id is not None:
            return self.by_id.get(item_id)
        return next((item for item in self.items if item[self.pk] == item_id), None)
