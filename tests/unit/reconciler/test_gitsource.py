"""Pygit2Source against real repositories made with the git CLI (no mocks of git)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reconciler.source import watch
from reconciler.source.git import GitError, Pygit2Source, StaleParent, init_repo
from tests.fixtures.git import bare_remote, commit_all, git, mesh_repo, write
from tests.fixtures.processes import inotify_fds


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working-tree repository on main with two commits and a nested file."""
    return mesh_repo(tmp_path / "work", "services/shop/reviews.yaml")


# -- reading -----------------------------------------------------------------------------------------


def test_read_tree_returns_committed_content_not_the_working_tree(work: Path) -> None:
    write(work, "mesh.yaml", "kind: Edited\n")
    write(work, "untracked.yaml", "x: 1\n")
    (work / "services/shop/reviews.yaml").unlink()
    source = Pygit2Source.open(str(work))
    assert source.read_tree("HEAD") == {
        "mesh.yaml": b"kind: Mesh\n",
        "services/shop/reviews.yaml": b"kind: Service\n",
    }
    assert source.read_tree("HEAD~1") == {"mesh.yaml": b"kind: Mesh\n"}


def test_resolve_accepts_shas_branches_and_relative_revs(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    tip, first = git(work, "rev-parse", "HEAD"), git(work, "rev-parse", "HEAD~1")
    assert source.resolve("main") == tip
    assert source.resolve(tip[:8]) == tip
    assert source.resolve("HEAD~1") == first
    assert source.resolve(first) == first


def test_resolve_of_a_bad_rev_names_it(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    for bad in ("no-such-branch", "HEAD~99", "deadbeef" * 5):
        with pytest.raises(GitError, match=re.escape(bad)) as err:
            source.resolve(bad)
        assert "sha" in str(err.value)  # says what to give instead


def test_head_follows_a_custom_branch(work: Path) -> None:
    main_tip = git(work, "rev-parse", "HEAD")
    git(work, "checkout", "-q", "-b", "team/canary")
    write(work, "rollout.yaml", "kind: Rollout\n")
    canary_tip = commit_all(work, "canary")
    git(work, "checkout", "-q", "main")

    assert Pygit2Source.open(str(work)).head() == main_tip  # default: the branch HEAD points at
    canary = Pygit2Source.open(str(work), branch="team/canary")
    assert canary.head() == canary_tip
    assert canary.resolve("HEAD") == canary_tip  # HEAD means the watched branch
    assert "rollout.yaml" in canary.read_tree("HEAD")
    assert Pygit2Source.open(str(work), branch="not-yet").head() is None


def test_head_after_git_pack_refs(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    git(work, "pack-refs", "--all")
    assert not (work / ".git/refs/heads/main").exists()
    assert source.head() == git(work, "rev-parse", "HEAD")


def test_log_is_newest_first_with_authors(work: Path) -> None:
    entries = Pygit2Source.open(str(work)).log("HEAD", limit=10)
    assert [e.message.strip() for e in entries] == ["second", "first"]
    assert entries[0].sha == git(work, "rev-parse", "HEAD")
    assert (entries[0].author_name, entries[0].author_email) == ("t", "t@t")
    assert abs(entries[0].time - time.time()) < 600
    assert len(Pygit2Source.open(str(work)).log("HEAD", limit=1)) == 1


def test_open_refuses_a_non_repository(tmp_path: Path) -> None:
    with pytest.raises(GitError, match="not a git repository"):
        Pygit2Source.open(str(tmp_path))
    with pytest.raises(GitError, match="cache directory"):
        Pygit2Source.open("file:///nowhere")


# -- writing -----------------------------------------------------------------------------------------


def test_commit_with_a_stale_parent_raises(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    old = git(work, "rev-parse", "HEAD~1")
    with pytest.raises(StaleParent) as err:
        source.commit(files={"x.yaml": b"x"}, message="late", parent=old)
    assert err.value.expected == old and err.value.actual == source.head()
    assert git(work, "rev-parse", "HEAD") == err.value.actual
    assert not (work / ".git/refs/heads/main.lock").exists()  # the lock was released


def test_commit_on_a_clean_checkout_updates_index_and_working_tree(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    parent = source.head()
    assert parent is not None
    sha = source.commit(
        files={
            "mesh.yaml": b"kind: Mesh\nspec: {}\n",
            "services/shop/reviews.yaml": None,
            "new/a.yaml": b"a",
        },
        message="rollout reviews: promote v2\n\nweight 100",
        parent=parent,
        author=("rollout-controller", "rollouts@lockgate"),
    )
    assert git(work, "rev-parse", "HEAD") == sha == source.head()
    assert git(work, "status", "--porcelain") == ""
    assert (work / "mesh.yaml").read_text() == "kind: Mesh\nspec: {}\n"
    assert (work / "new/a.yaml").read_text() == "a"
    assert not (work / "services/shop/reviews.yaml").exists()
    assert git(work, "log", "-1", "--format=%an <%ae>|%cn|%s|%P") == (
        f"rollout-controller <rollouts@lockgate>|lockgate|rollout reviews: promote v2|{parent}"
    )
    # The user's next commit builds on ours instead of silently reverting it.
    write(work, "user.yaml", "u")
    commit_all(work, "user change")
    assert git(work, "show", "HEAD:mesh.yaml") == "kind: Mesh\nspec: {}"


def test_commit_leaves_a_dirty_working_tree_alone(work: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(work, "services/shop/reviews.yaml", "kind: Service  # user edit in progress\n")
    source = Pygit2Source.open(str(work))
    parent = source.head()
    assert parent is not None
    with caplog.at_level(logging.WARNING, logger="reconciler.source.git"):
        sha = source.commit(files={"mesh.yaml": b"kind: Mesh\nv: 2\n"}, message="bot", parent=parent)
    assert git(work, "rev-parse", "HEAD") == sha
    assert git(work, "show", "HEAD:mesh.yaml") == "kind: Mesh\nv: 2"
    assert (work / "mesh.yaml").read_text() == "kind: Mesh\n"  # untouched on disk
    assert (work / "services/shop/reviews.yaml").read_text().endswith("in progress\n")
    assert any("uncommitted changes" in r.getMessage() for r in caplog.records)


def test_commit_keeps_the_executable_bit_and_refuses_escaping_paths(work: Path) -> None:
    write(work, "hook.sh", "#!/bin/sh\n")
    (work / "hook.sh").chmod(0o755)
    parent = commit_all(work, "hook")
    source = Pygit2Source.open(str(work))
    source.commit(files={"hook.sh": b"#!/bin/sh\nexit 0\n"}, message="edit hook", parent=parent)
    assert git(work, "ls-tree", "HEAD", "hook.sh").startswith("100755")
    for bad in ("../x", "/etc/passwd", "a/./b", ".git/config", ""):
        with pytest.raises(ValueError, match="invalid path"):
            source.commit(files={bad: b"x"}, message="bad", parent=source.head() or "")


def test_add_note_is_readable_with_git_notes(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    source.add_note("HEAD", message="rollout reviews: step 2, weight 20, success rate 0.998")
    source.add_note("HEAD", message="rollout reviews: promoted")
    shown = git(work, "notes", "--ref", "lockgate", "show", "HEAD")
    assert shown == "rollout reviews: step 2, weight 20, success rate 0.998\n\nrollout reviews: promoted"


def test_init_repo_commits_the_template(tmp_path: Path) -> None:
    template = tmp_path / "template"
    write(template, "mesh.yaml", "kind: Mesh\n")
    write(template, "services/.gitkeep", "")
    write(template, ".gitignore", "*.yaml\n")  # ignored or not, every template file is committed
    target = tmp_path / "intent"
    sha = init_repo(target, template=template)
    assert git(target, "rev-parse", "HEAD") == sha
    assert git(target, "status", "--porcelain") == ""
    assert git(target, "log", "--format=%an", "-1") == "lockgate"
    assert sorted(git(target, "ls-files").splitlines()) == [".gitignore", "mesh.yaml", "services/.gitkeep"]
    assert git(target, "branch", "--show-current") == "main"


def test_init_repo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    template = tmp_path / "template"
    write(template, "mesh.yaml", "kind: Mesh\n")
    target = tmp_path / "taken"
    write(target, "notes.txt", "mine")
    with pytest.raises(GitError, match="not empty"):
        init_repo(target, template=template)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    init_repo(tmp_path / "empty", template=template, branch="trunk")
    assert git(tmp_path / "empty", "branch", "--show-current") == "trunk"


# -- remote mirror -----------------------------------------------------------------------------------


@pytest.fixture
def remote(tmp_path: Path, work: Path) -> Path:
    """A bare remote that `work` pushes to."""
    return bare_remote(work, tmp_path / "remote.git")


def test_remote_mirror_reads_fetches_and_pushes(tmp_path: Path, work: Path, remote: Path) -> None:
    url = f"file://{remote}"
    source = Pygit2Source.open(url, cache_dir=tmp_path / "cache")
    assert source.is_remote and source.branch == "main"
    assert source.head() == git(work, "rev-parse", "HEAD")
    assert source.git_dir.parent == tmp_path / "cache"

    write(work, "later.yaml", "x")
    later = commit_all(work, "later")
    git(work, "push", "-q", "origin", "main")
    assert source.head() != later
    assert source.refresh() == later
    assert "later.yaml" in source.read_tree(later)

    sha = source.commit(files={"bot.yaml": b"b"}, message="bot", parent=later)
    assert git(remote, "rev-parse", "main") == sha  # pushed
    source.add_note(sha, message="why")
    assert git(remote, "notes", "--ref", "lockgate", "show", sha) == "why"

    # The remote moves under us: the push is refused, the mirror is put back, the caller rebases.
    git(work, "pull", "-q", "--no-rebase", "origin", "main")
    write(work, "human.yaml", "h")
    commit_all(work, "human")
    git(work, "push", "-q", "origin", "main")
    with pytest.raises(StaleParent):
        source.commit(files={"bot.yaml": b"c"}, message="bot again", parent=sha)
    assert source.head() == sha  # local mirror restored, not left ahead of the remote
    reopened = Pygit2Source.open(url, cache_dir=tmp_path / "cache")  # reuses the mirror
    assert reopened.git_dir == source.git_dir and reopened.head() == git(work, "rev-parse", "HEAD")


def test_remote_default_branch_is_the_remotes_head(tmp_path: Path, work: Path) -> None:
    bare = tmp_path / "trunk.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "trunk", str(bare))
    git(work, "push", "-q", str(bare), "main", "main:trunk", "main:zeta")
    source = Pygit2Source.open(f"file://{bare}", cache_dir=tmp_path / "cache")
    assert source.branch == "trunk"
    assert Pygit2Source.open(f"file://{bare}", branch="zeta", cache_dir=tmp_path / "cache").branch == "zeta"


def test_remote_fetch_errors_name_the_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/missing.git"
    with pytest.raises(GitError, match=r"missing\.git") as err:
        Pygit2Source.open(url, cache_dir=tmp_path / "cache")
    assert "fetching" in str(err.value)


# -- watching ----------------------------------------------------------------------------------------


async def _next(it: AsyncIterator[str], timeout: float = 5.0) -> str:
    return await asyncio.wait_for(anext(it), timeout)




def test_watch_local_notices_a_git_commit_quickly(work: Path) -> None:
    source = Pygit2Source.open(str(work))
    ref_file = work / ".git/refs/heads/main"

    def cli_commit(n: int) -> None:
        write(work, f"c{n}.yaml", str(n))
        commit_all(work, f"c{n}")

    async def scenario() -> list[float]:
        latencies: list[float] = []
        fds_before = inotify_fds()
        gen = source.watch(poll_interval=60.0)  # the safety poll cannot be what notices
        async with contextlib.aclosing(gen):
            assert await _next(gen) == source.head()
            assert inotify_fds() == fds_before + 1  # the watch holds one
            for n in range(5):
                task = asyncio.create_task(asyncio.to_thread(cli_commit, n))
                seen = await _next(gen)
                seen_at = time.time()
                await task
                assert seen == git(work, "rev-parse", "HEAD")
                latencies.append(seen_at - ref_file.stat().st_mtime)
        assert inotify_fds() == fds_before  # inotify fd closed with the generator
        return latencies

    latencies = asyncio.run(scenario())
    ms = [x * 1000 for x in latencies]
    print(
        f"\nlocal watch detection latency (ref written -> yielded): median {statistics.median(ms):.1f} ms,"
        f" max {max(ms):.1f} ms over {len(ms)} commits"
    )


def test_watch_coalesces_a_burst_of_commits_while_the_consumer_is_busy(work: Path) -> None:
    """A burst of commits during one apply yields the newest head once, not every commit in turn: the
    reconciler never applies a revision that is already stale, and a single commit waits for nothing."""
    source = Pygit2Source.open(str(work))

    async def scenario() -> list[str]:
        seen: list[str] = []
        gen = source.watch(poll_interval=60.0)
        async with contextlib.aclosing(gen):
            seen.append(await _next(gen))

            def burst() -> None:
                for n in range(5):
                    write(work, f"b{n}.yaml", str(n))
                    commit_all(work, f"burst {n}")

            await asyncio.to_thread(burst)  # the consumer is "busy applying" while all five land
            seen.append(await _next(gen))
            with contextlib.suppress(TimeoutError):
                seen.append(await _next(gen, timeout=0.5))  # nothing more should come
        return seen

    _initial, *rest = asyncio.run(scenario())
    assert rest == [git(work, "rev-parse", "HEAD")], rest


def test_watch_local_sees_a_new_branch_in_a_new_subdirectory(work: Path) -> None:
    source = Pygit2Source.open(str(work), branch="team/canary")

    async def scenario() -> str:
        gen = source.watch(poll_interval=60.0)
        async with contextlib.aclosing(gen):
            first = asyncio.ensure_future(_next(gen))
            await asyncio.sleep(0.1)
            assert not first.done()  # no commit on the branch yet: nothing to yield
            await asyncio.to_thread(git, work, "branch", "team/canary")
            return await first

    assert asyncio.run(scenario()) == git(work, "rev-parse", "team/canary")


def test_watch_falls_back_to_stat_polling(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_inotify(**_kwargs: object) -> None:
        raise OSError(24, "Too many open files")  # what inotify_init1 says when out of instances

    monkeypatch.setattr(watch.inotify_simple, "INotify", no_inotify)
    source = Pygit2Source.open(str(work))

    async def scenario() -> tuple[str, str]:
        gen = source.watch(poll_interval=60.0)
        async with contextlib.aclosing(gen):
            first = await _next(gen)
            write(work, "p.yaml", "p")
            await asyncio.to_thread(commit_all, work, "polled")
            return first, await _next(gen, 2.0)

    first, second = asyncio.run(scenario())
    assert first != second == git(work, "rev-parse", "HEAD")


def test_watch_remote_notices_a_push(tmp_path: Path, work: Path, remote: Path) -> None:
    source = Pygit2Source.open(f"file://{remote}", cache_dir=tmp_path / "cache")

    async def scenario() -> tuple[str, str, str]:
        gen = source.watch(poll_interval=0.2)
        async with contextlib.aclosing(gen):
            first = await _next(gen)
            write(work, "pushed.yaml", "p")
            pushed = await asyncio.to_thread(commit_all, work, "pushed")
            await asyncio.to_thread(git, work, "push", "-q", "origin", "main")
            return first, await _next(gen), pushed

    first, seen, pushed = asyncio.run(scenario())
    assert first != seen == pushed


def test_watch_remote_survives_fetch_errors(
    tmp_path: Path, work: Path, remote: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{remote}"
    source = Pygit2Source.open(url, cache_dir=tmp_path / "cache")
    hidden = tmp_path / "hidden.git"

    async def scenario() -> tuple[str, str]:
        gen = source.watch(poll_interval=0.05)
        async with contextlib.aclosing(gen):
            first = await _next(gen)
            remote.rename(hidden)  # the remote goes away: errors are logged and retried
            pending = asyncio.ensure_future(_next(gen))  # keep the generator running meanwhile
            await asyncio.sleep(0.5)
            assert not pending.done()
            write(work, "back.yaml", "b")
            pushed = await asyncio.to_thread(commit_all, work, "back")
            await asyncio.to_thread(git, work, "push", "-q", str(hidden), "main")
            hidden.rename(remote)
            seen = await pending
            assert seen == pushed
            return first, seen

    with caplog.at_level(logging.WARNING, logger="reconciler.source.git"):
        first, seen = asyncio.run(scenario())
    assert first != seen
    errors = [r.getMessage() for r in caplog.records if "fetching" in r.getMessage()]
    assert errors and all(url in e for e in errors)
    shutil.rmtree(tmp_path / "cache")
