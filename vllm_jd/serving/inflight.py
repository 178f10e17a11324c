"""Requests in flight per adapter name, in the API server process (``patch`` counts them around
``AsyncLLM.generate``). Deleting an adapter from the store waits until none of its requests
runs: the engine re-adds a running request's adapter by name every step, so its Σ row must not
be handed to another adapter before then (``rows.RowTable``)."""

from __future__ import annotations

import asyncio
import time


class InFlight:
    def __init__(self):
        self._count: dict[str, int] = {}

    def started(self, name: str | None) -> None:
        if name is not None:
            self._count[name] = self._count.get(name, 0) + 1

    def finished(self, name: str | None) -> None:
        if name is not None:
            left = self._count.get(name, 0) - 1
            if left > 0:
                self._count[name] = left
            else:
                self._count.pop(name, None)

    def count(self, name: str) -> int:
        return self._count.get(name, 0)

    async def drained(self, name: str, timeout: float) -> bool:
        """True once no request of ``name`` is in flight; False if some still are after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.count(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.count(name)


IN_FLIGHT = InFlight()
