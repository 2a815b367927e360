"""Local ref watching: branches in subdirectories made after the watch starts, packed-refs, the fallback."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import inotify_simple  # type: ignore[import-untyped]
import pytest

from reconciler.source import watch
from reconciler.source.git import Pygit2Source
from tests.fixtures.git import commit_file as commit
from tests.fixtures.git import git, new_repo
from tests.fixtures.processes import open_fds

NO_SAFETY_POLL = 60.0  # longer than any test waits: only the watcher can be what notices


@pytest.fixture
def work(tmp_path: Path) -> Path:
    root = new_repo(tmp_path / "work")
    commit(root, "mesh.yaml")
    return root


async def _next(it: AsyncIterator[str], timeout: float = 5.0) -> str:
    return await asyncio.wait_for(anext(it), timeout)




@pytest.mark.parametrize("branch", ["feature/x", "feature/deep/x"])
def test_a_slashed_branch_created_after_the_watch_starts_is_noticed_and_followed(work: Path, branch: str) -> None:
    assert not (work / ".git/refs/heads/feature").exists()
    source = Pygit2Source.open(str(work), branch=branch)

    async def scenario() -> list[str]:
        gen = source.watch(poll_interval=NO_SAFETY_POLL)
        async with contextlib.aclosing(gen):
            first = asyncio.ensure_future(_next(gen))
            await asyncio.sleep(0.1)
            assert not first.done()  # the branch does not exist yet
            await asyncio.to_thread(git, work, "checkout", "-q", "-b", branch)
            seen = [await first]
            # The next commit moves a ref file in the new directory: only its own watch can see that.
            for name in ("a.yaml", "b.yaml"):
                pending = asyncio.ensure_future(_next(gen))
                await asyncio.to_thread(commit, work, name)
                seen.append(await pending)
            return seen

    created, *later = asyncio.run(scenario())
    assert created == git(work, "rev-parse", "HEAD~2")
    assert later == [git(work, "rev-parse", "HEAD~1"), git(work, "rev-parse", "HEAD")]


def test_a_branch_next_to_another_in_an_existing_directory_is_noticed(work: Path) -> None:
    git(work, "branch", "feature/other")
    source = Pygit2Source.open(str(work), branch="feature/x")

    async def scenario() -> str:
        gen = source.watch(poll_interval=NO_SAFETY_POLL)
        async with contextlib.aclosing(gen):
            pending = asyncio.ensure_future(_next(gen))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(git, work, "branch", "feature/x")
            return await pending

    assert asyncio.run(scenario()) == git(work, "rev-parse", "feature/x")


def test_a_branch_that_moves_in_packed_refs_only_is_noticed(work: Path) -> None:
    git(work, "pack-refs", "--all")
    assert not (work / ".git/refs/heads/main").exists()
    tree = git(work, "rev-parse", "HEAD^{tree}")
    old = git(work, "rev-parse", "HEAD")
    new = git(work, "commit-tree", tree, "-p", old, "-m", "packed only")
    packed = work / ".git/packed-refs"
    source = Pygit2Source.open(str(work))

    def rewrite_packed_refs() -> None:
        """As git does: write packed-refs.lock, rename it over packed-refs; no loose ref file is touched."""
        lock = packed.with_name("packed-refs.lock")
        lock.write_text(packed.read_text().replace(old, new))
        os.replace(lock, packed)

    async def scenario() -> tuple[str, str]:
        gen = source.watch(poll_interval=NO_SAFETY_POLL)
        async with contextlib.aclosing(gen):
            first = await _next(gen)
            pending = asyncio.ensure_future(_next(gen))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(rewrite_packed_refs)
            return first, await pending

    assert asyncio.run(scenario()) == (old, new)
    assert git(work, "rev-parse", "main") == new


def test_the_watcher_ignores_files_that_cannot_move_a_branch(work: Path) -> None:
    """Every `git add` rewrites .git/index and every ref update takes a .lock first: no head re-read for those."""
    common = work / ".git"
    watcher = watch.RefWatcher.open(common)
    assert watcher is not None
    try:
        (common / "index").write_bytes((common / "index").read_bytes())
        (common / "COMMIT_EDITMSG").write_text("x")
        assert watcher.drain() is False
        (common / "refs/heads/main.lock").write_text("0" * 40 + "\n")
        assert watcher.drain() is False
        (common / "refs/heads/main.lock").unlink()
        assert watcher.drain() is False
        (common / "refs/heads/topic/deeper").mkdir(parents=True)
        assert watcher.drain() is True  # a new directory: a ref may have been renamed in before its watch
        (common / "refs/heads/topic/deeper/x").write_text(git(work, "rev-parse", "HEAD") + "\n")
        assert watcher.drain() is True
        (common / "packed-refs").write_text("# pack-refs with: peeled fully-peeled sorted\n")
        assert watcher.drain() is True
    finally:
        watcher.close()


class _NoWatches(inotify_simple.INotify):  # type: ignore[misc]
    """An inotify instance that cannot add watches, as when the user's watch limit is used up."""

    def add_watch(self, path: Any, mask: int) -> int:
        raise OSError(28, "No space left on device")


def test_without_watches_it_falls_back_to_polling_and_leaks_no_fd(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch.inotify_simple, "INotify", _NoWatches)
    assert watch.RefWatcher.open(work / ".git") is None
    source = Pygit2Source.open(str(work))

    async def scenario() -> tuple[str, str]:
        fds = open_fds()
        gen = source.watch(poll_interval=NO_SAFETY_POLL)
        async with contextlib.aclosing(gen):
            first = await _next(gen)
            second = await asyncio.to_thread(commit, work, "polled.yaml")
            assert await _next(gen, 2.0) == second
        assert open_fds() == fds
        return first, second

    first, second = asyncio.run(scenario())
    assert first != second
