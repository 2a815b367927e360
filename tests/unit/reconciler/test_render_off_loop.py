"""A push renders in a worker thread: the event loop (ADS streams, webhooks, status, the web view) keeps
running while a big mesh renders (issue 15: 0.4-0.7 s per push at 1000 services stalled it as long).

The render is made slow by wrapping the pipeline call the loop makes (`reconciler.loop.render_mesh`); the
rest is the real loop on a real repository and real control-plane caches (FakeRuntime, no processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import reconciler.loop
from reconciler.loop import Reconciler, UpConfig
from reconciler.pipeline import render_mesh
from reconciler.source.git import Pygit2Source, init_repo
from tests.fixtures.intents import TEMPLATE
from tests.fixtures.runtime import FakeRuntime
from tests.fixtures.waiting import until

USER = ("dev", "dev@example.org")
FRONTEND = "east/shop/frontend-v1-0"
REAL_RENDER = render_mesh


@dataclass
class LandingReconciler(Reconciler):
    """Records the revision of every render as it lands in the caches (one entry per push)."""

    landed: list[str] = field(default_factory=list)

    def _push(self) -> None:
        super()._push()
        assert self._landing is not None
        self.landed.append(self._landing.revision)


@dataclass
class SlowRender:
    """The loop's pipeline call, slowed per revision (seconds of busy CPU, as a real render spends them,
    or of sleep), recording the thread each ran in."""

    spin: dict[str, float] = field(default_factory=dict)
    sleep: dict[str, float] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    threads: list[int] = field(default_factory=list)
    took: list[float] = field(default_factory=list)
    collecting: list[bool] = field(default_factory=list)
    """Whether the cyclic GC was on while each render ran."""

    def __call__(self, **kw: Any) -> Any:
        t0 = time.monotonic()
        self.threads.append(threading.get_ident())
        self.collecting.append(gc.isenabled())
        revision = kw["revision"]
        end = t0 + self.spin.get(revision, 0.0)
        while time.monotonic() < end:  # pure Python: holds the GIL as render does, between switches
            pass
        time.sleep(self.sleep.get(revision, 0.0))
        if revision in self.fail:
            raise ValueError("a render bug")
        out = REAL_RENDER(**kw)
        self.took.append(time.monotonic() - t0)
        return out


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowRender]:
    render = SlowRender()
    monkeypatch.setattr(reconciler.loop, "render_mesh", render)
    yield render


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    init_repo(path, template=TEMPLATE)
    return path


def commit(repo: Path, n: int) -> str:
    source = Pygit2Source.open(str(repo))
    return source.commit(files={"notes.md": f"change {n}\n".encode()}, message=f"change {n}",
                         parent=source.head() or "", author=USER)


def make(repo: Path, tmp_path: Path, **config: Any) -> LandingReconciler:
    return LandingReconciler(config=UpConfig(repo=str(repo), state_dir=tmp_path / "state", **config),
                             source=Pygit2Source.open(str(repo)), runtime=FakeRuntime(), announced=True)


def served(rec: Reconciler) -> str | None:
    snap = rec.planes["east"].cache.get(FRONTEND)
    return snap.revision if snap is not None else None


async def ticking(gaps: list[float], stop: asyncio.Event) -> None:
    """A coroutine that wants to run every 10 ms: the gaps between its wake-ups."""
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


def test_a_slow_render_does_not_stop_the_loop_from_ticking(repo: Path, tmp_path: Path, slow: SlowRender) -> None:
    first = Pygit2Source.open(str(repo)).head()
    assert first is not None
    slow.spin[first] = 0.6

    async def scenario() -> list[float]:
        rec = make(repo, tmp_path)
        gaps: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.create_task(ticking(gaps, stop))
        try:
            await rec.apply_revision(first)
            stop.set()
            await ticker
            assert rec.landed == [first] and served(rec) == first
            assert threading.get_ident() not in slow.threads  # rendered off the loop's thread
            return gaps
        finally:
            await rec.close()

    gaps = asyncio.run(scenario())
    assert slow.took and slow.took[0] >= 0.6
    # The ticker kept running through the render: on the loop, one gap would have been >= 0.6 s. The bound
    # leaves room for a loaded machine (the loop gets the GIL back every 5 ms switch interval).
    assert max(gaps) < 0.2, f"the loop stalled {max(gaps) * 1000:.0f} ms"
    assert len(gaps) >= 20


def test_two_revisions_applied_back_to_back_land_in_order(repo: Path, tmp_path: Path, slow: SlowRender) -> None:
    """The older revision renders slowly, the newer at once: the newer still lands last, and a push the
    runtime asks for while the older renders never lands after the newer (or brings the older back)."""

    async def scenario() -> None:
        rec = make(repo, tmp_path)
        try:
            base = rec.source.head()
            assert base is not None
            await rec.apply_revision(base)
            older, newer = commit(repo, 1), commit(repo, 2)
            slow.sleep[older] = 0.4
            applying = [asyncio.create_task(rec.apply_revision(older)),
                        asyncio.create_task(rec.apply_revision(newer))]
            await until("the older revision rendering", lambda: slow.threads[1:] != [])  # the older one is rendering
            rec.runtime.set_ready("east/shop/reviews-v2-0", False)  # type: ignore[attr-defined]
            await asyncio.gather(*applying)
            await rec.settled()
            order = [base, older, newer]
            assert rec.landed[0] == base and rec.landed[-1] == newer
            assert [order.index(r) for r in rec.landed] == sorted(order.index(r) for r in rec.landed)
            assert older in rec.landed
            assert served(rec) == newer and rec.planes["east"].applied == newer and rec.applied == newer
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_a_render_that_raises_keeps_what_is_served(repo: Path, tmp_path: Path, slow: SlowRender) -> None:
    async def scenario() -> None:
        rec = make(repo, tmp_path)
        try:
            base = rec.source.head()
            assert base is not None
            await rec.apply_revision(base)
            broken = commit(repo, 1)
            slow.fail.add(broken)
            await rec.apply_revision(broken)
            assert rec.push_error is not None and "a render bug" in rec.push_error
            assert served(rec) == base and rec.planes["east"].applied == base
            # Every render ran with the cyclic GC paused, and a render that raised turned it back on.
            assert slow.collecting == [False, False] and gc.isenabled()
            slow.fail.clear()
            await rec.push()  # the next push (a topology change, a rotation) succeeds and clears the error
            assert rec.push_error is None and served(rec) == broken
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_a_render_past_its_timeout_is_abandoned_and_never_lands(repo: Path, tmp_path: Path,
                                                                 slow: SlowRender) -> None:
    async def scenario() -> None:
        rec = make(repo, tmp_path)
        try:
            base = rec.source.head()
            assert base is not None
            await rec.apply_revision(base)
            # The first render lands under the default timeout (a busy machine can take 0.3 s for it too).
            rec.config = dataclasses.replace(rec.config, render_timeout=0.3)
            held = rec.planes["east"].render_cache
            stuck = commit(repo, 1)
            slow.sleep[stuck] = 1.0
            t0 = time.monotonic()
            await rec.apply_revision(stuck)
            assert time.monotonic() - t0 < 0.9  # the push gave up at its timeout, not when the thread ended
            assert rec.push_error is not None and "RenderTimeout" in rec.push_error
            # The abandoned thread keeps the cache it was given; the next render gets a fresh one.
            assert rec.planes["east"].render_cache is not held
            await asyncio.sleep(1.0)  # the abandoned thread ends: its result is dropped
            assert served(rec) == base and rec.landed == [base]
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_certificates_are_issued_on_the_loop_while_the_pipeline_runs_in_a_thread(
        repo: Path, tmp_path: Path, slow: SlowRender, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issuer belongs to the loop (status and the CA watch use it there): the worker thread asks."""

    async def scenario() -> None:
        rec = make(repo, tmp_path)
        issued_in: list[int] = []
        real = rec.issuer.certs_for

        def spy(*args: Any, **kw: Any) -> Any:
            issued_in.append(threading.get_ident())
            return real(*args, **kw)

        monkeypatch.setattr(rec.issuer, "certs_for", spy)
        try:
            sha = rec.source.head()
            assert sha is not None
            await rec.apply_revision(sha)
            assert issued_in == [threading.get_ident()]  # one cluster, issued on the loop's thread
            assert slow.threads and slow.threads[0] != threading.get_ident()
            assert rec.status()["certs"]["proxies"]  # what status shows is what was issued
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_gc_paused_pauses_the_collector_for_the_call_only() -> None:
    seen: list[bool] = []
    assert reconciler.loop.gc_paused(lambda: seen.append(gc.isenabled()) or 7) == 7
    with pytest.raises(ZeroDivisionError):
        reconciler.loop.gc_paused(lambda: seen.append(gc.isenabled()) or 1 // 0)
    assert seen == [False, False] and gc.isenabled()


def test_what_a_push_serves_was_serialised_in_the_render_thread(repo: Path, tmp_path: Path) -> None:
    """The event loop never serialises a resource for a stream: the render thread did (serialise_ahead)."""
    from mesh.xds import wire

    async def scenario() -> None:
        rec = make(repo, tmp_path)
        try:
            head = rec.source.head()
            assert head is not None
            await rec.apply_revision(head)
            snap = rec.planes["east"].cache.get(FRONTEND)
            assert snap is not None
            pending = [(t, name) for t, parts in snap.parts.items() for part in parts for name in part
                       if wire.serialise_once(t, part[name], part.digests[name])]
            assert pending == []
        finally:
            await rec.close()

    asyncio.run(scenario())
