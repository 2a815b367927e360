"""The webhook's seam in the remote watch: `wake` ends the wait for the next poll at once, a wake during a
fetch brings one more fetch after it, and polling goes on without any wake."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from reconciler.source.watch import remote_heads
from tests.fixtures.waiting import until


class Remote:
    def __init__(self, *, slow: float = 0.0) -> None:
        self.fetches: list[float] = []
        self.slow = slow
        self.head = "a"
        self.lock = threading.Lock()

    def fetch(self) -> None:
        with self.lock:
            self.fetches.append(time.monotonic())
        time.sleep(self.slow)


async def heads(remote: Remote, wake: asyncio.Event | None, *, poll: float) -> tuple[asyncio.Task[None], list[str]]:
    seen: list[str] = []

    async def run() -> None:
        gen = remote_heads(fetch=remote.fetch, head=lambda: remote.head, on_stall=lambda _: None, label="r",
                           poll_interval=poll, deadline=10.0, wake=wake)
        async with contextlib.aclosing(gen):
            async for h in gen:
                seen.append(h or "")

    return asyncio.create_task(run()), seen


@pytest.mark.asyncio
async def test_a_wake_fetches_now_not_at_the_next_poll() -> None:
    remote, wake = Remote(), asyncio.Event()
    task, seen = await heads(remote, wake, poll=30.0)
    try:
        await until("the first fetch", lambda: len(remote.fetches) == 1)  # the first fetch, at once
        await asyncio.sleep(0.1)
        assert len(remote.fetches) == 1  # then it waits for the poll (30 s)
        remote.head = "b"
        t = time.monotonic()
        wake.set()
        await until("the woken fetch's head", lambda: seen[-1] == "b")
        assert time.monotonic() - t < 0.5 and len(remote.fetches) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_wake_during_a_fetch_brings_another_fetch_after_it() -> None:
    remote, wake = Remote(slow=0.3), asyncio.Event()
    task, _ = await heads(remote, wake, poll=30.0)
    try:
        await until("the first fetch", lambda: len(remote.fetches) == 1)
        wake.set()  # the push may have landed after this fetch began
        await until("a second fetch", lambda: len(remote.fetches) == 2, timeout=2.0)
        await asyncio.sleep(0.5)
        assert len(remote.fetches) == 2  # one wake, one more fetch: not a loop
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_polling_goes_on_without_a_wake() -> None:
    remote = Remote()
    task, _ = await heads(remote, asyncio.Event(), poll=0.1)
    try:
        await until("four polls", lambda: len(remote.fetches) >= 4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("hops", range(8))
async def test_a_stop_that_lands_as_a_fetch_finishes_is_not_lost(hops: int) -> None:
    """The remote watch waits for a fetch with `worker.finished` (GitWorker.call too); a stop (the task
    cancelled) that lands in any of the loop's steps around the fetch finishing must still end it, at that
    wait or at the next. With `asyncio.wait_for` on Python 3.11, a stop landing as the fetch finished was
    swallowed (the fetch's result came back instead) and the watch polled on for ever."""
    from reconciler.source.worker import finished

    loop = asyncio.get_running_loop()
    fetch: asyncio.Future[None] = loop.create_future()

    async def watch() -> None:
        await finished(fetch, 10.0)
        await asyncio.sleep(30)  # the wait for the next poll, where a stop that came after the fetch lands

    task = asyncio.create_task(watch())
    await asyncio.sleep(0)  # the watch now waits for the fetch

    def cancel_after(n: int) -> None:
        if n:
            loop.call_soon(cancel_after, n - 1)
        else:
            task.cancel()

    fetch.set_result(None)
    cancel_after(hops)
    done, _ = await asyncio.wait({task}, timeout=5.0)
    task.cancel()  # a lost stop leaves it sleeping: end it either way
    assert done and task.cancelled(), "the stop was lost: the watch went on to wait for the next poll"
