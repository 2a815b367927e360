"""load_isolated: the same answer as load, from a warm worker process that a commit can neither freeze nor
bloat; a worker that times out, runs out of memory or dies gives one Problem and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from reconciler import isolate
from reconciler.isolate import load_isolated
from reconciler.load import Tree, load, read_worktree

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def worker() -> Iterator[None]:
    yield
    isolate.shutdown()


def template() -> dict[str, bytes]:
    return dict(read_worktree(TEMPLATE))


def unknown_keys(count: int) -> bytes:
    head = b"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {name: junk, namespace: shop}\nspec:\n"
    return head + b"".join(b"  k%07d: 1\n" % i for i in range(count))


def slow_junk(docs: int = 7, keys: int = 9_500) -> bytes:
    """Just under a megabyte that takes a while to load: Services with as many unknown keys each as one
    mapping may hold (one wider mapping is refused at once, before composing)."""
    return b"---\n".join(
        b"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {name: junk%d, namespace: shop}\nspec:\n" % d
        + b"".join(b"  k%07d: 1\n" % i for i in range(keys)) for d in range(docs))


SLOW_JUNK_ERRORS = 7 * 9_502
"""Every unknown key of slow_junk(), and the two required fields of each Service."""


def wide_values() -> bytes:
    """Half a million values in lists as wide as allowed: the most nodes one file can hold."""
    inner = b"[" + b"1," * 8_999 + b"1]"
    return b"[" + b",".join([inner] * 55) + b"]\n"


def worker_pid() -> int:
    process = isolate._loader._process
    assert process is not None
    return process.proc.pid


def test_the_answer_is_the_one_load_gives() -> None:
    files = template()
    reviews = (TEMPLATE / "routes.yaml").read_bytes().split(b"---\n")[1]
    files["extra.yaml"] = reviews.replace(b"name: reviews", b"name: x")  # a second Route for one service
    mine, theirs = load_isolated(files), load(files)
    assert mine.intent is None and [str(p) for p in mine.problems] == [str(p) for p in theirs.problems]
    good = load_isolated(template())
    expected = load(template())
    assert good.ok and good.intent == expected.intent
    assert good.resources == expected.resources and good.warnings == expected.warnings
    assert [good.where(r, ("spec", "http", 0)) for r in good.resources] == [
        expected.where(r, ("spec", "http", 0)) for r in expected.resources]
    assert [d.data for d in good.origins] == [d.data for d in expected.origins]


def test_an_unchanged_resource_comes_back_as_the_same_object() -> None:
    files = template()
    first = load_isolated(files)
    again = load_isolated(files)
    assert all(a is b for a, b in zip(first.resources, again.resources, strict=True))
    files["routes.yaml"] = files["routes.yaml"].replace(b"weight: 100\n", b"weight: 50\n").replace(
        b"weight: 0\n", b"weight: 50\n")
    changed = load_isolated(files)
    assert changed.ok
    same = [a is b for a, b in zip(first.resources, changed.resources, strict=True)]
    assert same.count(False) == 1  # the reviews Route, and nothing else
    # a new worker sends everything again; the caller keeps its objects all the same
    os.kill(worker_pid(), signal.SIGKILL)
    after = load_isolated(files)
    assert all(a is b for a, b in zip(changed.resources, after.resources, strict=True))


def test_the_worker_stays_warm() -> None:
    load_isolated(template())
    pid = worker_pid()
    started = time.monotonic()
    for _ in range(20):
        assert load_isolated(template()).ok
    assert worker_pid() == pid
    assert (time.monotonic() - started) / 20 < 0.1  # about a millisecond; generous for a busy machine


def test_a_load_that_takes_too_long_is_stopped_and_the_worker_replaced() -> None:
    load_isolated(template())
    pid = worker_pid()
    started = time.monotonic()
    loaded = load_isolated({**template(), "junk.yaml": slow_junk()}, timeout=0.2)
    assert time.monotonic() - started < 2
    assert [str(p) for p in loaded.problems] == [".:0: loading took more than 0.2s: the revision is refused"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert worker_pid() != pid
    assert load_isolated(template()).ok


def test_a_load_that_needs_too_much_memory_is_refused() -> None:
    loaded = load_isolated({**template(), "flat.yaml": wide_values()}, memory=80)
    assert len(loaded.problems) == 1 and loaded.problems[0].path == "." and loaded.problems[0].line == 0
    assert "used more than 80 MiB" in loaded.problems[0].message
    assert load_isolated(template(), memory=80).ok


def test_a_worker_killed_mid_load_is_replaced_and_asked_again() -> None:
    load_isolated(template())
    pid = worker_pid()
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    loaded = load_isolated({**template(), "junk.yaml": slow_junk()})
    assert worker_pid() != pid
    assert loaded.error_count == SLOW_JUNK_ERRORS  # killed by someone else: the revision is not to blame


def test_a_worker_that_keeps_dying_gives_one_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate.shutdown()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", "/bin/false")  # a worker that exits at once, every time
        loaded = load_isolated(template())
    assert [str(p) for p in loaded.problems] == [
        ".:0: loading used more than 2048 MiB or crashed (the loader process died: exit status 1): the revision is "
        "refused"]
    isolate.shutdown()
    assert load_isolated(template()).ok


def test_a_worker_killed_between_loads_is_replaced() -> None:
    load_isolated(template())
    os.kill(worker_pid(), signal.SIGKILL)
    time.sleep(0.1)
    assert load_isolated(template()).ok


def test_hostile_input_through_the_worker_leaves_the_caller_small() -> None:
    load_isolated(template())
    process = psutil.Process()
    before = process.memory_info().rss
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{b}: &{b} [" + ",".join([f"*{a}"] * 9) + "]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))
    files = {**template(), "bomb.yaml": bomb.encode(), "deep.yaml": b"a: " + b"[" * 10_000 + b"]" * 10_000,
             "junk.yaml": slow_junk(), "huge.yaml": unknown_keys(1_700_000)}
    loaded = load_isolated(files)
    assert [(p.path, p.line) for p in loaded.problems[:3]] == [("bomb.yaml", 7), ("deep.yaml", 1), ("huge.yaml", 0)]
    assert str(loaded.problems[-1]).endswith("more error(s) not shown")
    assert (process.memory_info().rss - before) / MiB < 100


def test_refusals_of_a_tree_travel_to_the_worker() -> None:
    loaded = load_isolated(Tree(template(), refused={"link.yaml": "a symbolic link"}))
    assert [str(p) for p in loaded.problems] == ["link.yaml:0: a symbolic link"]


def test_it_does_not_block_the_event_loop() -> None:
    async def main() -> float:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        loaded = await asyncio.to_thread(load_isolated, {**template(), "junk.yaml": slow_junk()})
        done.set()
        await tick
        assert loaded.error_count == SLOW_JUNK_ERRORS
        return max(gaps)

    load_isolated(template())
    assert asyncio.run(main()) < 0.25
