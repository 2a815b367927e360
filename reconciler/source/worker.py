"""One thread for every Git operation of a running lockgate, each with a deadline.

Git work (reading trees, committing, pushing notes and write-backs) is blocking I/O, and a remote that
accepts a connection and never answers can hold it for a long time. None of it may run on the event loop,
which also serves the control planes, rotates certificates and judges rollouts. A libgit2 repository
object must not be used from two threads at once, so operations on one source run one at a time, in
order, on a single worker thread; the caller awaits each with a timeout. A timed-out operation keeps the
worker until libgit2 gives up (its own network timeouts bound that), while the loop goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import TypeVar

from reconciler.source.base import GitError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 60.0


async def finished(future: asyncio.Future[T], timeout: float) -> T:
    """`future`'s result, waited for up to `timeout` seconds (TimeoutError then), leaving it running. Not
    `wait_for`: on Python 3.11 it returns the result when a cancel lands as the future finishes, so a stop
    was lost (the remote watch polled on; a test's teardown waited for it for 300 s)."""
    async with asyncio.timeout(timeout):
        return await asyncio.shield(future)


class GitTimeout(GitError):
    """A Git operation did not finish within its deadline (it may still finish in the background)."""


class GitWorker:
    def __init__(self, *, name: str = "git") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], /, *args: object, timeout: float = DEFAULT_TIMEOUT_S,
                   **kwargs: object) -> T:
        """`fn(*args, **kwargs)` on the worker thread; GitTimeout after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        try:
            return await finished(future, timeout)
        except TimeoutError:
            name = getattr(fn, "__name__", repr(fn))
            raise GitTimeout(f"git {name} did not finish within {timeout:.0f}s (the remote may be unreachable); "
                             "lockgate goes on serving and will try again") from None

    def close(self) -> None:
        """Stop taking work; a running operation is left to finish on its own (never waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
