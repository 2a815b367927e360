"""`convergedRevision` (status --json) means every proxy holds what the mesh wants now, not only a render
of that revision: a workload that becomes ready re-renders the same revision (its endpoint is added), and
until that render lands and is ACKed, a caller that trusts convergence would send the first request to a
proxy that cannot reach it yet (`lockgate demo` counted a 503 on its first request so).

Driven through `Reconciler.run` on a real repository, with the runtime's readiness and the proxies' ACKs
played by hand (`cache.applied`, what the ADS server records for an ACK)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from reconciler.loop import Reconciler, UpConfig
from reconciler.source.git import Pygit2Source, init_repo
from tests.fixtures.intents import TEMPLATE
from tests.fixtures.runtime import FakeRuntime, ack_all
from tests.fixtures.waiting import until

REVIEWS = "east/shop/reviews-v1-0"


def converged(rec: Reconciler) -> str | None:
    (cluster,) = rec.status()["clusters"]
    value = cluster["convergedRevision"]
    assert value is None or isinstance(value, str)
    return value


def test_a_workload_that_became_ready_holds_convergence_until_its_render_is_acked(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = init_repo(repo, template=TEMPLATE)
    runtime = FakeRuntime(unready={REVIEWS})

    async def scenario() -> None:
        rec = Reconciler(config=UpConfig(repo=str(repo), state_dir=tmp_path / "state"),
                         source=Pygit2Source.open(str(repo)), runtime=runtime, announced=True)
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop))
        try:
            await until("the first revision applied with its proxies", lambda: rec.applied == first
                        and bool(rec.planes) and bool(next(iter(rec.planes.values())).cache.nodes()), timeout=20.0)
            await rec.settled()
            ack_all(rec)
            assert converged(rec) == first  # every proxy ACKed the render with reviews unready

            plane = next(iter(rec.planes.values()))
            before = {n: plane.cache.get(n) for n in plane.cache.nodes()}
            runtime.set_ready(REVIEWS, True)  # the probe found it: the loop is told, a push is scheduled
            assert converged(rec) is None  # asked for, not yet rendered: the old ACKs are not of it
            await rec.settled()
            after = {n: plane.cache.get(n) for n in before}
            assert any(a is not None and b is not None and a.version_all != b.version_all
                       for a, b in zip(after.values(), before.values(), strict=True))  # its endpoint is new
            assert rec.applied == first  # the same revision, a new render of it
            assert converged(rec) is None  # landed, not ACKed: those proxies still hold the old endpoints
            ack_all(rec)
            assert converged(rec) == first
        finally:
            stop.set()
            await task
            await rec.close()

    asyncio.run(scenario())
