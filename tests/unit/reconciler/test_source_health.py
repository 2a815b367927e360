"""Source health: a remote that cannot be fetched shows in status instead of going quiet."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pygit2
import pytest

from reconciler.source import git as gitsource
from reconciler.source.base import FETCH_IO_TIMEOUT_S, SourceHealth
from reconciler.source.git import GitError, Pygit2Source
from tests.fixtures.git import bare_remote, git, new_repo
from tests.fixtures.git import commit_file as commit


@pytest.fixture
def work(tmp_path: Path) -> Path:
    root = new_repo(tmp_path / "work")
    commit(root, "mesh.yaml")
    return root


@pytest.fixture
def remote(tmp_path: Path, work: Path) -> Path:
    return bare_remote(work, tmp_path / "remote.git")


@pytest.fixture
def libgit2_timeouts() -> Iterator[None]:
    """The libgit2 timeouts are process-wide: put back whatever a test changed."""
    before = (pygit2.settings.server_connect_timeout, pygit2.settings.server_timeout)
    yield
    pygit2.settings.server_connect_timeout, pygit2.settings.server_timeout = before


def _mirror_of(url: str, tmp_path: Path) -> Pygit2Source:
    """A mirror whose origin is ``url``, built without the first fetch open() would make."""
    repo = pygit2.init_repository(str(tmp_path / "mirror.git"), bare=True)
    repo.remotes.create("origin", url, "+refs/heads/*:refs/heads/*")
    return Pygit2Source(repo, branch="main", location=url, url=url)


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _next(it: AsyncIterator[str], timeout: float = 5.0) -> str:
    return await asyncio.wait_for(anext(it), timeout)


def test_a_local_source_is_reachable(work: Path) -> None:
    health = Pygit2Source.open(str(work)).health()
    assert health == SourceHealth(remote=False, reachable=True)
    assert health.to_json() == {
        "remote": False,
        "reachable": True,
        "lastFetchAt": None,
        "lastError": None,
        "lastAttemptAt": None,
    }


def test_a_mirror_never_fetched_is_unknown(tmp_path: Path) -> None:
    health = _mirror_of(f"file://{tmp_path}/x.git", tmp_path).health()
    assert health.remote and health.reachable is None and health.last_attempt_at is None


def test_refresh_records_a_failed_fetch_then_the_recovery(tmp_path: Path, work: Path, remote: Path) -> None:
    url = f"file://{remote}"
    before = time.time()
    source = Pygit2Source.open(url, cache_dir=tmp_path / "cache")
    opened = source.health()
    assert opened.reachable is True and opened.last_error is None
    assert opened.last_fetch_at is not None and before <= opened.last_fetch_at <= time.time()

    hidden = remote.rename(tmp_path / "hidden.git")
    with pytest.raises(GitError, match="fetching"):
        source.refresh()
    failed = source.health()
    assert failed.reachable is False
    assert failed.last_error is not None and url in failed.last_error
    assert failed.last_fetch_at == opened.last_fetch_at  # the last success is kept
    assert failed.last_attempt_at is not None and failed.last_attempt_at >= opened.last_fetch_at
    assert failed.to_json()["lastError"] == failed.last_error and failed.to_json()["reachable"] is False

    hidden.rename(remote)
    assert source.refresh() == git(work, "rev-parse", "HEAD")
    back = source.health()
    assert back.reachable is True and back.last_error is None
    assert back.last_fetch_at is not None and back.last_fetch_at > opened.last_fetch_at


def test_a_closed_port_is_unreachable(tmp_path: Path, libgit2_timeouts: None) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the with ends: nothing listens there
    source = _mirror_of(f"http://127.0.0.1:{port}/intent.git", tmp_path)
    with pytest.raises(GitError):
        source.refresh()
    health = source.health()
    assert health.reachable is False and health.last_fetch_at is None
    assert health.last_error is not None and f"127.0.0.1:{port}" in health.last_error


def test_a_remote_that_accepts_and_never_answers_times_out(tmp_path: Path, libgit2_timeouts: None) -> None:
    pygit2.settings.server_timeout = 300  # a process's own choice is kept; 30 s would make a slow test
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel completes the handshake; nobody ever reads or writes
        source = _mirror_of(f"http://127.0.0.1:{silent.getsockname()[1]}/intent.git", tmp_path)
        started = time.monotonic()
        with pytest.raises(GitError, match="timed out"):
            source.refresh()
        assert time.monotonic() - started < 5
    assert source.health().reachable is False
    assert pygit2.settings.server_timeout == 300


def test_unset_libgit2_timeouts_are_bounded_before_a_fetch(tmp_path: Path, libgit2_timeouts: None) -> None:
    pygit2.settings.server_connect_timeout = 0
    pygit2.settings.server_timeout = 0  # libgit2's default: wait forever
    with pytest.raises(GitError):
        _mirror_of(f"file://{tmp_path}/missing.git", tmp_path).refresh()
    expected = int(FETCH_IO_TIMEOUT_S * 1000)
    assert (pygit2.settings.server_connect_timeout, pygit2.settings.server_timeout) == (expected, expected)


def test_the_watch_records_every_attempt_and_recovers(tmp_path: Path, work: Path, remote: Path) -> None:
    url = f"file://{remote}"
    source = Pygit2Source.open(url, cache_dir=tmp_path / "cache")
    hidden = tmp_path / "hidden.git"

    async def scenario() -> None:
        gen = source.watch(poll_interval=0.05)
        async with contextlib.aclosing(gen):
            await _next(gen)
            await _until(lambda: (source.health().last_attempt_at or 0) > (source.health().last_fetch_at or 0) - 1)
            ok_at = source.health().last_fetch_at
            remote.rename(hidden)
            pending = asyncio.ensure_future(_next(gen))
            await _until(lambda: source.health().reachable is False)
            down = source.health()
            assert down.last_error is not None and url in down.last_error and "fetching" in down.last_error
            assert down.last_fetch_at is not None and ok_at is not None and down.last_fetch_at >= ok_at
            first_failure = down.last_attempt_at
            await _until(lambda: (source.health().last_attempt_at or 0) > (first_failure or 0))  # retried
            assert source.health().reachable is False

            pushed = await asyncio.to_thread(commit, work, "back.yaml")
            await asyncio.to_thread(git, work, "push", "-q", str(hidden), "main")
            hidden.rename(remote)
            assert await asyncio.wait_for(pending, 5.0) == pushed
            up = source.health()
            assert up.reachable is True and up.last_error is None
            assert up.last_fetch_at is not None and down.last_attempt_at is not None
            assert up.last_fetch_at >= down.last_attempt_at

    asyncio.run(scenario())


def test_a_fetch_past_the_deadline_is_reported_and_never_duplicated(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"file://{remote}"
    opened = Pygit2Source.open(url, cache_dir=tmp_path / "cache")
    source = Pygit2Source(
        pygit2.Repository(str(opened.git_dir)), branch="main", location=url, url=url, fetch_deadline=0.1
    )
    release = threading.Event()
    calls: list[float] = []
    real_fetch = gitsource._fetch

    def hung_fetch(repo: pygit2.Repository, url: str, credentials: object = None) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            release.wait(10)  # a remote that accepted the connection and went quiet
        real_fetch(repo, url)

    monkeypatch.setattr(gitsource, "_fetch", hung_fetch)
    threads: list[int] = []
    real_attempt = source._fetch_in_thread

    def attempt() -> None:
        threads.append(threading.get_ident())  # before the source's lock, which the hung fetch holds
        real_attempt()

    monkeypatch.setattr(source, "_fetch_in_thread", attempt)

    async def scenario() -> None:
        gen = source.watch(poll_interval=0.02)
        async with contextlib.aclosing(gen):
            await _next(gen)
            pending = asyncio.ensure_future(_next(gen, 10.0))  # the generator only runs while pulled
            try:
                await _until(lambda: source.health().reachable is False)
                stalled = source.health()
                assert stalled.last_error is not None and "not finished after" in stalled.last_error
                assert url in stalled.last_error
                await asyncio.sleep(0.4)  # several deadlines and polls go by
                assert len(threads) == len(calls) == 1  # one hung thread, not one per poll
            finally:
                release.set()
            await _until(lambda: source.health().reachable is True)
            await _until(lambda: len(calls) >= 2)  # polling resumed once the hung fetch ended
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending

    asyncio.run(scenario())
    assert source.health().last_error is None
