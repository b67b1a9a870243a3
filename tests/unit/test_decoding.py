"""The decode queue: admission charged in decoded pixels per lane, and small images never
waiting behind large ones."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.batching import Overloaded
from serve.decoding import DecodeQueue

SMALL_PIXELS, BUDGET = 10, 100


@pytest.fixture
def queue():
    decoder = DecodeQueue(1, small_image_pixels=SMALL_PIXELS, max_decode_pixels=BUDGET)
    yield decoder
    decoder.close()


def test_admission_is_refused_over_the_budget_of_its_lane(queue: DecodeQueue):
    first = queue.admit([60, 20])
    with pytest.raises(Overloaded, match="max_decode_pixels"):
        queue.admit([30])  # 80 large pixels pending + 30 > 100
    small = queue.admit([SMALL_PIXELS] * 10)  # the small lane has its own budget
    with pytest.raises(Overloaded):
        queue.admit([SMALL_PIXELS])
    first.close()
    small.close()
    assert queue.pending_pixels == [0, 0]
    queue.admit([BUDGET]).close()  # an empty lane admits any request


def test_a_lane_with_nothing_pending_admits_a_request_over_the_budget(queue: DecodeQueue):
    with queue.admit([2 * BUDGET]):
        assert queue.pending_pixels[1] == 2 * BUDGET


def test_small_images_pass_a_busy_large_lane_and_charges_return(queue: DecodeQueue):
    release = threading.Event()
    order: list[str] = []

    def large(name: str) -> str:
        release.wait(10)
        order.append(name)
        return name

    def small() -> str:
        order.append("small")
        return "small"

    async def scenario() -> list[str]:
        with queue.admit([50]) as a, queue.admit([40]) as b, queue.admit([5]) as c:
            first = asyncio.ensure_future(a.decode(lambda: large("large 1")))
            second = asyncio.ensure_future(b.decode(lambda: large("large 2")))
            await asyncio.sleep(0.05)  # the one general thread is busy with "large 1"
            assert await asyncio.wait_for(c.decode(small), 5) == "small"
            assert queue.pending_pixels == [0, 90]
            release.set()
            results = [await first, await second]
        assert queue.pending_pixels == [0, 0]
        return results

    assert asyncio.run(scenario()) == ["large 1", "large 2"]
    assert order == ["small", "large 1", "large 2"]


def test_a_failed_decode_fails_its_request_and_returns_its_charge(queue: DecodeQueue):
    def broken() -> None:
        raise ValueError("not an image")

    async def scenario() -> None:
        with queue.admit([50, 30]) as admission, pytest.raises(ValueError, match="not an image"):
            await admission.decode(broken)

    asyncio.run(scenario())
    assert queue.pending_pixels == [0, 0]
