"""The first request of a multiplexed id is routed alone, so a burst of a new cluster's requests
lands on one replica. Pure asyncio: no Ray import.

Ray Serve's router learns which replica holds an id from the replica itself: it pushes its ids
every 0.1 s to the controller, which forwards them to every router. Until then a new id has no
replica, and every request of it goes to "a replica with the fewest ids", so a burst (a server
starting under load, the benchmark's warm-up) puts the same cluster on several replicas. With
N·K clusters resident such a duplicate pushes another cluster out of its replica, whose requests
then load it wherever they land, evicting the next one: loads that go on for as long as the
duplicate stays (measured: 16 clusters, K = 8, 2 replicas, ~40 loads per 1,000 requests). Here
the first request of an id is placed (the replica takes the id) and the id's other requests wait
``settle_s`` more, for the routers to learn where it lives, before they are routed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

SETTLE_S = 0.5
"""Seconds after a replica took a new id before its other requests are routed: the push period
(0.1 s) plus the controller's broadcast, with a margin. Paid once per id, by its first requests."""


class FirstPlacement:
    """Ids already placed, and the placement in flight for each id being placed."""

    def __init__(self, settle_s: float = SETTLE_S):
        if settle_s < 0:
            raise ValueError(f"settle_s {settle_s}: expected ≥ 0")
        self.settle_s = settle_s
        self.placed: set[str] = set()
        self._placing: dict[str, asyncio.Future] = {}

    async def ensure(self, model_id: str, place: Callable[[], Awaitable[object]]) -> None:
        """Return once ``model_id`` has a replica that the routers know of: at once if it was
        placed before; else the first caller runs ``place()`` (route one call with that id) and
        waits ``settle_s``, and callers meanwhile wait for it. A failed placement is logged and
        not recorded: the caller's own request then succeeds or fails on its own."""
        if model_id in self.placed:
            return
        if (pending := self._placing.get(model_id)) is not None:
            await asyncio.shield(pending)  # a waiter that is cancelled must not cancel the placement
            return
        pending = asyncio.get_running_loop().create_future()
        self._placing[model_id] = pending
        try:
            await place()
            await asyncio.sleep(self.settle_s)
            self.placed.add(model_id)
        except Exception as e:  # noqa: BLE001 - e.g. the replica died: its request will say so
            logger.warning("vllm-jd: placing %s failed: %s", model_id, e)
        finally:
            del self._placing[model_id]
            pending.set_result(None)

    def forget(self) -> None:
        """A replica failed: the ids it held have no replica any more; place them again."""
        self.placed.clear()
