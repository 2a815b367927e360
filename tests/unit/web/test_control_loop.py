"""rollback, suspend and resume on the reconcile loop itself (FakeRuntime, a real Git repository, real
control-plane caches): what is served after each, what Git holds, and what a restart keeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh.xds.snapshot import Snapshot
from reconciler.loop import Reconciler, RollbackRefused, UpConfig
from reconciler.source.git import Pygit2Source, init_repo
from reconciler.state import SUSPENDED_FILE
from tests.fixtures.intents import TEMPLATE
from tests.fixtures.routes import outbound_vhost
from tests.fixtures.runtime import FakeRuntime
from tests.fixtures.waiting import until

USER = ("dev", "dev@example.org")
FRONTEND = "east/shop/frontend-v1-0"
SPLIT = (TEMPLATE / "routes.yaml").read_text().replace("          weight: 100", "          weight: 50").replace(
    "weight: 0", "weight: 50")  # reviews (the frontend's own `weight: 100` stays)


def weights(rec: Reconciler) -> list[tuple[str, int]]:
    snap = rec.planes["east"].cache.get(FRONTEND)
    assert isinstance(snap, Snapshot)
    vhost = outbound_vhost(snap, "reviews.shop")
    action: dict[str, Any] = next(r for r in vhost["routes"] if r["name"] == "default")["route"]
    if "weighted_clusters" in action:
        return [(c["name"].rsplit("|", 1)[1], c["weight"]) for c in action["weighted_clusters"]["clusters"]]
    return [(action["cluster"].rsplit("|", 1)[1], 100)]


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    source = Pygit2Source.open(str(repo))
    return source.commit(files={k: v.encode() for k, v in files.items()}, message=message,
                         parent=source.head() or "", author=USER)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    init_repo(tmp_path / "repo", template=TEMPLATE)
    assert "weight: 0" in (TEMPLATE / "routes.yaml").read_text()  # the template's reviews is v1 100, v2 0
    return tmp_path / "repo"


def reconciler(repo: Path, state: Path) -> Reconciler:
    return Reconciler(config=UpConfig(repo=str(repo), state_dir=state), source=Pygit2Source.open(str(repo)),
                      runtime=FakeRuntime(), announced=True)


def test_rollback_undoes_the_last_human_change_one_at_a_time_and_refuses_what_it_cannot(
        repo: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        rec = reconciler(repo, tmp_path / "state")
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop))
        try:
            first = rec.source.head()
            await until("the first revision", lambda: rec.applied == first)
            split = commit(repo, {"routes.yaml": SPLIT}, "reviews: 50/50")
            # served: the render lands in the caches a moment after `applied` moves (it runs off the loop)
            await until("the split", lambda: rec.applied == split and rec.planes["east"].applied == split)
            assert weights(rec) == [("v1", 50), ("v2", 50)]

            with pytest.raises(RollbackRefused, match="cannot resolve revision 'nope'"):
                await rec.rollback("nope")
            done = await rec.rollback()
            assert done["undid"] == split and done["to"] == first and rec.applied == done["sha"]
            assert weights(rec) == [("v1", 100)]  # served at once
            assert first is not None and rec.source.read_tree(done["sha"]) == rec.source.read_tree(first)
            info = rec.source.log(done["sha"], limit=1)[0]
            assert info.author_name == "lockgate" and "Lockgate-Decision: rollback" in info.message
            assert info.message.startswith(f"rollback: undo {split[:10]} (reviews: 50/50)")

            # the next rollback goes one human change further back: here, the first commit, which has no parent
            with pytest.raises(RollbackRefused, match="is the first commit"):
                await rec.rollback()
            # to a named revision: the split again, then it is already there
            again = await rec.rollback(split[:12])
            assert again["to"] == split and weights(rec) == [("v1", 50), ("v2", 50)]
            with pytest.raises(RollbackRefused, match="nothing to roll back"):
                await rec.rollback(split)
        finally:
            stop.set()
            await task
            await rec.close()

    asyncio.run(scenario())


def test_nothing_applied_nothing_to_roll_back(repo: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        rec = reconciler(repo, tmp_path / "state")
        try:
            with pytest.raises(RollbackRefused, match="nothing is applied"):
                await rec.rollback()
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_suspended_heads_are_noticed_not_applied_and_a_restart_stays_suspended(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def first_run() -> tuple[str, str]:
        rec = reconciler(repo, state)
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop))
        try:
            first = rec.source.head()
            assert first is not None
            await until("the first revision", lambda: rec.applied == first)
            rec.suspend()
            assert rec.status()["lockgate"]["suspended"] is True and (state / SUSPENDED_FILE).is_file()
            split = commit(repo, {"routes.yaml": SPLIT}, "reviews: 50/50")
            await until("the head noticed", lambda: rec.head == split)
            await asyncio.sleep(0.2)
            assert rec.applied == first and weights(rec) == [("v1", 100)]
            assert rec.status()["revision"]["head"] == split and rec.status()["revision"]["applied"] == first
            return first, split
        finally:
            stop.set()
            await task
            await rec.close()

    async def second_run(first: str, split: str) -> None:
        rec = reconciler(repo, state)  # a restart: the state dir says suspended
        assert rec.suspended
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop))
        try:
            await until("the head noticed", lambda: rec.head == split)
            assert rec.applied == first and weights(rec) == [("v1", 100)]  # what it served when suspended
            await rec.resume()
            assert rec.applied == split and weights(rec) == [("v1", 50), ("v2", 50)]
            assert not rec.suspended and not (state / SUSPENDED_FILE).exists()
            assert rec.status()["lockgate"]["suspended"] is False
        finally:
            stop.set()
            await task
            await rec.close()

    first, split = asyncio.run(first_run())
    asyncio.run(second_run(first, split))
