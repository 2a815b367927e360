"""One `lockgate up` per state dir: a second one, in another process or the same, is refused with the first
one's PID; a lockgate killed with SIGKILL blocks nobody, even while the children it left still run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.runtime.local.lock import LOCK_FILE, StateDirBusy, lock_state_dir
from reconciler.runtime.local.supervisor import running
from tests.fixtures.processes import reap

ROOT = Path(__file__).resolve().parents[3]

TRY_LOCK = """
import sys
from pathlib import Path
from reconciler.runtime.local.lock import StateDirBusy, lock_state_dir
try:
    lock_state_dir(Path(sys.argv[1]))
except StateDirBusy as exc:
    print(exc)
    sys.exit(3)
print("locked")
"""

# Holds the lock, and leaves a child that outlives it (as the Envoys outlive lockgate), started without
# closing inherited descriptors: only close-on-exec keeps the lock from going with it.
HOLD_LOCK = """
import subprocess, sys, time
from pathlib import Path
from reconciler.runtime.local.lock import lock_state_dir
lock = lock_state_dir(Path(sys.argv[1]))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=False,
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """PIDs the test started that must not outlive it: SIGKILLed at teardown, if still running."""
    started: list[int] = []
    try:
        yield started
    finally:
        for pid in started:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_second_process_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    with lock_state_dir(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        other = subprocess.run(python(TRY_LOCK, str(tmp_path)), capture_output=True, text=True, timeout=30,
                               env=ENV, cwd=ROOT)
        assert other.returncode == 3, other.stderr
        assert f"PID {os.getpid()}" in other.stdout
        assert f"state dir {tmp_path} is busy" in other.stdout and "--state-dir" in other.stdout
    assert not lock.held
    after = subprocess.run(python(TRY_LOCK, str(tmp_path)), capture_output=True, text=True, timeout=30, env=ENV,
                           cwd=ROOT)
    assert (after.returncode, after.stdout.strip()) == (0, "locked"), after.stderr


def test_a_sigkilled_holder_blocks_nobody_though_its_children_live_on(
    tmp_path: Path, pids: list[int], spawn_holder: Callable[[Path], tuple[subprocess.Popen[str], int]],
) -> None:
    holder, grandchild = spawn_holder(tmp_path)
    pids += [holder.pid, grandchild]
    with pytest.raises(StateDirBusy, match=rf"`lockgate up` \(PID {holder.pid}\) is using it") as busy:
        lock_state_dir(tmp_path)
    assert busy.value.pid == holder.pid

    holder.send_signal(signal.SIGKILL)
    assert holder.wait(10) == -signal.SIGKILL
    assert running(grandchild)  # what it left still runs (and inherited every descriptor it could)
    assert (tmp_path / LOCK_FILE).read_text() == f"{holder.pid}\n"  # the stale file is still there
    with lock_state_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_taking_it_twice_in_one_process_fails_clearly(tmp_path: Path) -> None:
    first = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateDirBusy, match="this very process already holds it") as busy:
            lock_state_dir(tmp_path)
        assert busy.value.pid == os.getpid()
        assert first.held  # the failed attempt did not release the first lock
    finally:
        first.close()
    first.close()  # idempotent
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no PID left behind
    with lock_state_dir(tmp_path):
        pass


def test_a_stale_or_garbled_file_does_not_block(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("not a pid\n")
    with lock_state_dir(tmp_path / "new") as lock:  # a state dir that does not exist yet is made
        assert lock.path == tmp_path / "new" / LOCK_FILE
    with lock_state_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


@pytest.fixture
def spawn_holder() -> Iterator[Callable[[Path], tuple[subprocess.Popen[str], int]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(state_dir: Path) -> tuple[subprocess.Popen[str], int]:
        proc = subprocess.Popen(python(HOLD_LOCK, str(state_dir)), stdout=subprocess.PIPE, text=True, env=ENV,
                                cwd=ROOT)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the lock is held once the grandchild's PID is printed
        assert line.strip().isdigit(), f"holder failed (exit {proc.poll()})"
        return proc, int(line)

    try:
        yield start
    finally:
        reap(procs, timeout=10)
