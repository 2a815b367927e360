"""A cluster dropped from the Mesh: its gateways and control plane go, but only once the other clusters'
proxies hold the revision that routes around it (make before break), and at the latest after
REMOVE_CLUSTER_WAIT_S (a proxy that never ACKs does not keep it running).

Driven through `Reconciler.run` on a real repository, ACKs played by hand (`cache.applied`)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

import reconciler.loop
from reconciler.loop import Reconciler, UpConfig
from reconciler.source.git import Pygit2Source
from tests.fixtures.git import commit_all, new_repo, write
from tests.fixtures.intents import with_clusters
from tests.fixtures.runtime import FakeRuntime, ack_all
from tests.fixtures.waiting import until


def files(clusters: list[str]) -> dict[str, str]:
    return {rel: data.decode() for rel, data in with_clusters(clusters).items()}


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


async def started(repo: Path, tmp_path: Path, runtime: FakeRuntime) -> tuple[Reconciler, asyncio.Task[None],
                                                                                asyncio.Event]:
    rec = Reconciler(config=UpConfig(repo=str(repo), state_dir=tmp_path / "state"),
                     source=Pygit2Source.open(str(repo)), runtime=runtime, announced=True)
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run(stop))
    await until("both clusters applied", lambda: set(rec.planes) == {"east", "west"} and rec.applied is not None,
                timeout=20)
    await rec.settled()
    ack_all(rec)
    return rec, task, stop


def test_a_dropped_cluster_goes_once_the_others_hold_the_revision_without_it(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", files(["east", "west"]))
    runtime = FakeRuntime()

    async def scenario() -> None:
        rec, task, stop = await started(repo, tmp_path, runtime)
        try:
            west_port = rec.planes["west"].port
            assert not refused(west_port)
            for rel, text in files(["east"]).items():
                write(repo, rel, text)
            second = commit_all(repo, "west leaves the mesh")
            await until("the revision without west applied", lambda: rec.applied == second, timeout=20)
            await asyncio.sleep(0.3)
            # East's proxies have not ACKed it: they may still route through west's east-west gateway.
            assert runtime.removed == [] and "west" in rec.planes and not refused(west_port)
            ack_all(rec)
            await until("west removed", lambda: runtime.removed == ["west"] and "west" not in rec.planes, timeout=10)
            assert refused(west_port)  # its control plane is gone with its gateways
            assert [c["name"] for c in rec.status()["clusters"]] == ["east"]
            assert set(rec.planes) == {"east"} and runtime.clusters.keys() == {"east"}
        finally:
            stop.set()
            await task
            await rec.close()

    asyncio.run(scenario())


def test_a_proxy_that_never_acks_does_not_keep_a_dropped_cluster(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciler.loop, "REMOVE_CLUSTER_WAIT_S", 0.5)
    repo = new_repo(tmp_path / "repo", files(["east", "west"]))
    runtime = FakeRuntime()

    async def scenario() -> None:
        rec, task, stop = await started(repo, tmp_path, runtime)
        try:
            for rel, text in files(["east"]).items():
                write(repo, rel, text)
            second = commit_all(repo, "west leaves the mesh")
            await until("west removed without the ACKs", lambda: runtime.removed == ["west"], timeout=20)
            assert rec.applied == second and set(rec.planes) == {"east"}
            # And back in a later commit: a cluster of its own again, control plane and all.
            for rel, text in files(["east", "west"]).items():
                write(repo, rel, text)
            third = commit_all(repo, "west is back")
            await until("west back", lambda: rec.applied == third and "west" in rec.planes, timeout=20)
            assert "west" in runtime.clusters and not refused(rec.planes["west"].port)
        finally:
            stop.set()
            await task
            await rec.close()

    asyncio.run(scenario())
