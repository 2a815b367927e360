"""Delivery of rollout notifications: one queue and one sender task per sink, off the controller's tick.

A sink that is down, slow or refusing never holds a decision: `send` only enqueues; each delivery has the
sink's own short timeout and is not retried (the next decision follows); a full queue drops the oldest
event. Every outcome is counted (`sent`, `failed`, `dropped`, `lastError`) and handed to `on_result`,
which the controller writes into the rollout's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rollouts.intent import NotificationSpec
from rollouts.notify import payload

log = logging.getLogger("lockgate.rollouts.notify")
QUEUE = 100
"""Events waiting per sink; beyond that the oldest is dropped (and counted)."""

Key = tuple[str, str]


@dataclass
class SinkStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str | None = None
    last_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped, "lastError": self.last_error,
                "lastAt": self.last_at}


@dataclass
class _Sink:
    spec: NotificationSpec
    queue: asyncio.Queue[dict[str, Any]]
    task: asyncio.Task[None] | None = None
    stats: SinkStats = field(default_factory=SinkStats)


@dataclass
class Notifier:
    on_result: Callable[[Key, str, SinkStats], None] = lambda _key, _name, _stats: None
    _sinks: dict[tuple[Key, str], _Sink] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    def send(self, key: Key, sinks: list[NotificationSpec], body: dict[str, Any]) -> None:
        """Queue `body` for every sink of the rollout; returns at once (call it on the event loop)."""
        for spec in sinks:
            sink = self._sink(key, spec)
            if sink.queue.full():
                sink.queue.get_nowait()
                sink.queue.task_done()
                sink.stats.dropped += 1
                self.on_result(key, spec.name, sink.stats)
            sink.queue.put_nowait(body)

    def stats(self, key: Key) -> dict[str, SinkStats]:
        return {name: s.stats for (k, name), s in self._sinks.items() if k == key}

    def _sink(self, key: Key, spec: NotificationSpec) -> _Sink:
        sink = self._sinks.get((key, spec.name))
        if sink is not None and sink.spec != spec:  # changed in Git: a new sender, the counters kept
            if sink.task is not None:
                sink.task.cancel()
            sink = _Sink(spec=spec, queue=sink.queue, stats=sink.stats)
        if sink is None:
            sink = _Sink(spec=spec, queue=asyncio.Queue(QUEUE))
        if sink.task is None or sink.task.done():
            sink.task = asyncio.get_running_loop().create_task(self._deliver(key, sink),
                                                               name=f"notify {key[0]}/{key[1]} {spec.name}")
        self._sinks[(key, spec.name)] = sink
        return sink

    async def _deliver(self, key: Key, sink: _Sink) -> None:
        while True:
            body = await sink.queue.get()
            try:
                await self._post(sink.spec, payload(sink.spec, body))
                sink.stats.sent += 1
                sink.stats.last_error = None
            except TimeoutError:
                sink.stats.failed += 1
                sink.stats.last_error = f"Timeout: no answer within {sink.spec.timeout}"
                log.warning("rollout %s/%s: notification %s failed: %s", *key, sink.spec.name, sink.stats.last_error)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                sink.stats.failed += 1
                sink.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("rollout %s/%s: notification %s failed: %s", *key, sink.spec.name, sink.stats.last_error)
            sink.stats.last_at = time.time()
            sink.queue.task_done()
            self.on_result(key, sink.spec.name, sink.stats)

    async def _post(self, spec: NotificationSpec, body: dict[str, Any]) -> None:
        if self._session is None:
            # trust_env off: a loopback sink is never reached through an HTTP_PROXY from the environment.
            self._session = aiohttp.ClientSession(trust_env=False)
        timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        async with self._session.post(spec.url, json=body, timeout=timeout) as resp:
            if resp.status >= 300:
                raise ValueError(f"HTTP {resp.status}")
            await resp.read()

    def forget(self, key: Key) -> None:
        """The Rollout is gone: stop its senders."""
        for k in [k for k in self._sinks if k[0] == key]:
            sink = self._sinks.pop(k)
            if sink.task is not None:
                sink.task.cancel()

    async def close(self, timeout: float = 2.0) -> None:
        """Events already queued get `timeout` seconds in all; a stuck sink does not hold the stop."""
        live = [s.queue.join() for s in self._sinks.values() if s.task is not None and not s.task.done()]
        if live:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*live)
        tasks = [s.task for s in self._sinks.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
