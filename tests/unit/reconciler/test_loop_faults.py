"""Faults around the reconcile loop, on a FakeRuntime: nothing a bug, a slow Git or a stuck loop does
may stop the data plane or go unseen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from reconciler import loop as loop_module
from reconciler.cli.up import serve
from reconciler.loop import LoopLag, Reconciler, UpConfig
from reconciler.source.git import Pygit2Source, init_repo
from tests.fixtures.intents import TEMPLATE
from tests.fixtures.runtime import FakeRuntime


class BrokenRuntime(FakeRuntime):
    """Raises in `apply` the first time: a bug of ours while applying a valid revision."""

    fail: bool = True

    async def apply(self, intent: Any) -> None:
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        await super().apply(intent)


class WatchFails(Pygit2Source):
    """A source whose watch dies after the first head: an internal error of the loop itself."""

    async def watch(self, *, poll_interval: float = 5.0) -> AsyncGenerator[str, None]:
        head = self.head()
        assert head is not None
        yield head
        raise RuntimeError("the watcher broke")


class SlowTree(Pygit2Source):
    def read_tree(self, rev: str) -> dict[str, bytes]:
        time.sleep(2.0)  # a blackholed remote, say
        return super().read_tree(rev)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    init_repo(path, template=TEMPLATE)
    return path


def make(repo: Path, state: Path, runtime: FakeRuntime, source_type: type[Pygit2Source] = Pygit2Source,
         **config: Any) -> Reconciler:
    plain = Pygit2Source.open(str(repo))
    source = source_type(plain._repo, branch=plain.branch, location=str(repo), url=None)
    return Reconciler(config=UpConfig(repo=str(repo), state_dir=state, **config), source=source, runtime=runtime,
                      announced=True)


def test_an_internal_error_while_applying_refuses_that_revision_and_keeps_serving(repo: Path, tmp_path: Path) -> None:
    runtime = BrokenRuntime()

    async def scenario() -> None:
        rec = make(repo, tmp_path / "state", runtime)
        try:
            head = rec.source.head()
            assert head is not None
            stop = asyncio.Event()
            task = asyncio.create_task(rec.run(stop))
            for _ in range(200):
                if rec.failed == head:
                    break
                await asyncio.sleep(0.01)
            assert rec.failed == head and "internal error" in rec.last_error[0], rec.last_error
            assert not task.done()  # the loop goes on: the next commit can fix things
            await rec.apply_revision(head)  # the same revision again (the bug is gone): applied
            assert rec.applied == head
            stop.set()
            await task
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_an_internal_error_of_the_loop_leaves_the_data_plane_running(repo: Path, tmp_path: Path) -> None:
    runtime = FakeRuntime()

    async def scenario() -> int:
        rec = make(repo, tmp_path / "state", runtime, WatchFails)
        return await serve(rec, asyncio.Event())

    assert asyncio.run(scenario()) == 1
    assert runtime.applied and not runtime.closed  # exited non-zero, the proxies and workloads untouched


def test_an_explicit_stop_tears_the_data_plane_down(repo: Path, tmp_path: Path) -> None:
    runtime = FakeRuntime()

    async def scenario() -> int:
        rec = make(repo, tmp_path / "state", runtime)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        return await serve(rec, stop)

    assert asyncio.run(scenario()) == 0
    assert runtime.closed


def test_a_slow_git_never_blocks_the_loop(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_module, "READ_TIMEOUT", 0.3)

    async def scenario() -> None:
        rec = make(repo, tmp_path / "state", FakeRuntime(), SlowTree)
        try:
            lag = LoopLag(interval=0.02)
            watchdog = asyncio.create_task(lag.run())
            head = rec.source.head()
            assert head is not None
            await rec.apply_revision(head)
            assert rec.failed == head and "did not finish within" in rec.last_error[0], rec.last_error
            assert rec.applied is None
            assert lag.worst < 0.25, lag.worst  # the loop ran on while Git hung (generous bound)
            watchdog.cancel()
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_the_watchdog_sees_a_blocked_loop() -> None:
    async def scenario() -> LoopLag:
        lag = LoopLag(interval=0.02)
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # something blocks the loop
        await asyncio.sleep(0.05)
        task.cancel()
        return lag

    lag = asyncio.run(scenario())
    assert lag.worst >= 0.2, lag.worst


def test_status_warns_of_a_certificate_about_to_expire(repo: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        rec = make(repo, tmp_path / "state", FakeRuntime(), cert_ttl=100.0)
        try:
            head = rec.source.head()
            assert head is not None
            await rec.apply_revision(head)
            assert rec.status()["certs"]["warnings"] == []
            later = time.time() + 95  # lockgate was away: past the rotation, near the end
            monkeypatch.setattr(loop_module.time, "time", lambda: later)
            certs = rec.status()["certs"]
            assert certs["warnings"] and all(p["expiringSoon"] for p in certs["proxies"])
        finally:
            monkeypatch.undo()
            await rec.close()

    asyncio.run(scenario())
