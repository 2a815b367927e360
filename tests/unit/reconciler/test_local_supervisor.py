"""Which PIDs lockgate may adopt or signal: real child processes, no mocks of /proc or psutil."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest

from reconciler.runtime.local.supervisor import Supervised, running, runs, start_time, stop_orphan
from tests.fixtures.processes import reap

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start children; each one still running at teardown is killed by its PID and reaped."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str] = SLEEPER) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        reap(started, timeout=5)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def test_running_is_false_for_exited_zombie_thread_and_special_pids(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    child = spawn()
    assert running(child.pid)
    child.kill()
    # Not reaped yet: a zombie, which has exited.
    wait_until("the child is a zombie", lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
    assert not running(child.pid)
    child.wait(5)
    assert not running(child.pid)
    for pid in (0, -1):  # kill(2) would take these for a whole process group, or every process
        assert not running(pid)

    tid: list[int] = []
    release = threading.Event()

    def park() -> None:
        tid.append(threading.get_native_id())
        release.wait(5)

    thread = threading.Thread(target=park)
    thread.start()
    try:
        wait_until("the thread's id", lambda: bool(tid))
        assert Path(f"/proc/{tid[0]}/cmdline").exists()  # /proc answers for a thread's ID too...
        assert not running(tid[0])  # ...but it is no process to adopt or signal
    finally:
        release.set()
        thread.join(5)


def test_runs_needs_the_exact_command_line_and_the_recorded_start(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    child = spawn()
    assert runs(child.pid, SLEEPER)
    assert not runs(child.pid, SLEEPER[:-1])
    assert not runs(child.pid, [*SLEEPER, ""])
    assert not runs(child.pid, [sys.executable, "-c", "import time; time.sleep(61)"])

    started = start_time(child.pid)
    assert started is not None and started == start_time(child.pid)
    assert runs(child.pid, SLEEPER, started=started)
    # The same PID and command line but another start: a later process that got the PID, not ours.
    assert not runs(child.pid, SLEEPER, started=started + 1)
    assert not runs(child.pid, SLEEPER, started=started - 0.01)
    other = spawn()
    other_started = start_time(other.pid)
    assert other_started is not None and other_started >= started

    child.kill()
    child.wait(5)
    assert not runs(child.pid, SLEEPER) and start_time(child.pid) is None


def test_stop_orphan_signals_only_the_recorded_process(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    child = spawn()
    started = start_time(child.pid)
    assert started is not None
    stop_orphan(child.pid, [sys.executable, "-c", "something else"])
    stop_orphan(child.pid, SLEEPER, started=started + 5)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.3)  # neither touched it
    stop_orphan(child.pid, SLEEPER, started=started)
    assert child.wait(5) == -signal.SIGTERM


def test_adopt_checks_the_start_and_stop_ends_the_adopted_process(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    child = spawn()
    started = start_time(child.pid)
    assert started is not None

    async def scenario() -> None:
        sup = Supervised(name="sleeper", argv=SLEEPER, env={}, log_path=tmp_path / "sleeper.log")
        assert not sup.adopt(child.pid, started=started + 1)
        assert (sup.pid, sup.started) == (None, None)
        assert sup.adopt(child.pid, started=started)
        assert (sup.pid, sup.started, sup.info.state) == (child.pid, started, "running")
        await sup.stop(timeout=3)
        assert sup.pid is None and sup.info.state == "stopped"

    asyncio.run(scenario())
    assert child.wait(5) == -signal.SIGTERM


def test_a_started_child_reports_its_start_for_the_record(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = Supervised(name="sleeper", argv=SLEEPER, env={}, log_path=tmp_path / "sleeper.log")
        await sup.start()
        try:
            pid = sup.pid
            assert pid is not None and sup.started is not None
            assert sup.started == start_time(pid)
            assert runs(pid, SLEEPER, started=sup.started)
        finally:
            await sup.stop(timeout=3)
        assert sup.pid is None and sup.started is None

    asyncio.run(scenario())
