"""Σ rows of one worker: which adapter owns which row, and which rows can take a new adapter.

No vLLM or torch import: the decisions are plain bookkeeping, tested on their own. The layers
hold ``capacity`` Σ rows: the store's adapters at start, the "no adapter" row (all zeros), then
spare rows for adapters registered while serving. A row is taken by an adapter registered later
and given back when that adapter is gone from the store and no vLLM adapter id still points at it
(vLLM re-adds the adapter of a running request from its id, so a row in use is never reused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_jd.store.errors import StoreError

Location = tuple[int, int, int]
"""Where an adapter's Σ lives in the store: (cluster, Σ block, row of the block)."""


@dataclass
class RowTable:
    rows: dict[str, int]
    """adapter name → its Σ row in the layers."""
    loc: dict[str, Location]
    """adapter name → where its Σ came from (a name registered again for other weights moves)."""
    none_row: int
    capacity: int
    cluster_of_row: np.ndarray
    """[capacity] cluster of each row (0 for unused rows: their Σ is zero, so harmless)."""
    used: int = 0
    """Rows ever handed out: [0, used) are taken or free, [used, capacity) never touched."""
    free: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    """Rows left by a name that moved to a new row: free once no vLLM adapter id points at them."""

    @classmethod
    def start(cls, rows: dict[str, int], loc: dict[str, Location], cluster: np.ndarray, none_row: int,
              spare: int, min_capacity: int = 0) -> RowTable:
        capacity = max(none_row + 1 + spare, min_capacity)
        cluster_of_row = np.zeros(capacity, dtype=np.int64)
        cluster_of_row[: len(cluster)] = cluster
        return cls(dict(rows), dict(loc), none_row, capacity, cluster_of_row, used=none_row + 1)

    def current(self, name: str, location: Location) -> int | None:
        """The row already serving ``name`` at ``location`` (None: it needs a row)."""
        row = self.rows.get(name)
        return row if row is not None and self.loc.get(name) == location else None

    def take(self, name: str, in_store: set[str], in_use: set[int]) -> tuple[int, bool]:
        """A row for adapter ``name`` (which needs one, see ``current``): (row, True if it held
        another adapter's Σ and must be zeroed first). When the spare rows are used up, rows are
        reclaimed from names gone from the store (``in_store``: the names it has now) and from
        names that moved, unless a vLLM adapter id still points at them (``in_use``). StoreError
        when none is left."""
        if not self.free and self.used >= self.capacity:
            self._reclaim(name, in_store, in_use)
        if self.free:
            return self.free.pop(), True
        if self.used < self.capacity:
            self.used += 1
            return self.used - 1, False
        raise StoreError(f"no Σ row left for adapter {name!r}: all {self.capacity - self.none_row - 1} spare rows "
                         "hold adapters still in the store or in use (VLLM_JD_SPARE_ADAPTERS, `vllm-jd serve "
                         "--jd-spare-adapters N`, sets how many a restart reserves)")

    def _reclaim(self, name: str, in_store: set[str], in_use: set[int]) -> None:
        for other, row in list(self.rows.items()):
            if (other not in in_store or other == name) and row not in in_use:  # ``name`` itself is moving
                del self.rows[other]
                self.loc.pop(other, None)
                self.free.append(row)
        self.free += [r for r in self.orphans if r not in in_use]
        self.orphans = [r for r in self.orphans if r in in_use]

    def assign(self, name: str, row: int, location: Location) -> None:
        """``name`` is served from ``row`` (its Σ written there) for the adapter at ``location``."""
        old = self.rows.get(name)
        if old is not None and old != row:
            self.orphans.append(old)
        self.rows[name], self.loc[name] = row, location
        self.cluster_of_row[row] = location[0]
