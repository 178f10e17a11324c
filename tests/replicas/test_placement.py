"""The first request of a multiplexed id is placed alone; the id's other requests wait for it."""

from __future__ import annotations

import asyncio

import pytest

from vllm_jd.replicas.placement import FirstPlacement


def test_a_burst_places_each_id_once_and_waits_for_it():
    calls: list[str] = []
    order: list[str] = []

    async def main():
        placement = FirstPlacement(settle_s=0.05)

        async def request(model_id: str, i: int):
            async def place():
                calls.append(model_id)
                await asyncio.sleep(0.05)

            await placement.ensure(model_id, place)
            order.append(f"{model_id}{i}")

        await asyncio.gather(*(request(m, i) for i in range(5) for m in ("c1", "c2")))
        await placement.ensure("c1", lambda: pytest.fail("placed twice"))  # placed: returns at once
        return placement

    placement = asyncio.run(main())
    assert sorted(calls) == ["c1", "c2"] and placement.placed == {"c1", "c2"} and len(order) == 10
    placement.forget()
    assert placement.placed == set()


def test_a_failed_placement_is_not_recorded_and_waiters_go_on():
    async def main():
        placement = FirstPlacement(settle_s=0)

        async def dead():
            await asyncio.sleep(0.01)
            raise RuntimeError("replica died")

        await asyncio.gather(placement.ensure("c", dead), placement.ensure("c", dead))
        return placement

    assert asyncio.run(main()).placed == set()
    with pytest.raises(ValueError, match="settle_s -1"):
        FirstPlacement(settle_s=-1)


def test_a_cancelled_waiter_does_not_cancel_the_placement():
    async def main():
        placement = FirstPlacement(settle_s=0)
        gate = asyncio.Event()

        async def place():
            await gate.wait()

        first = asyncio.create_task(placement.ensure("c", place))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(placement.ensure("c", place))
        await asyncio.sleep(0)
        waiter.cancel()
        gate.set()
        await first
        return placement

    assert asyncio.run(main()).placed == {"c"}
