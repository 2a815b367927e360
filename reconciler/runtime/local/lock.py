"""One `lockgate up` per state dir.

Two of them on one state dir would adopt, record and stop each other's Envoys and workloads: stopping the
second would stop the first one's data plane. The first takes an exclusive `flock` on STATE/lock and
writes its PID there; a second one is refused with that PID. The kernel drops a flock with the last file
descriptor on it, so a lockgate killed with SIGKILL leaves a file that blocks nobody, and the descriptor
is close-on-exec so that the children that outlive lockgate (Envoys, workloads) never hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

import psutil

LOCK_FILE = "lock"


class StateDirBusy(Exception):
    """Another process (a running `lockgate up`) holds the state dir."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.state_dir, self.pid = state_dir, pid
        if pid == os.getpid():
            what = "this very process already holds it (the lock was taken twice)"
        elif pid is not None:
            what = (f"`lockgate up` (PID {pid}) is using it: stop that one first (Ctrl-C where it runs, or "
                    f"`kill {pid}`), or give this one another --state-dir")
        else:
            what = (f"another process holds {state_dir / LOCK_FILE} (its PID is not in it): stop the other "
                    "`lockgate up` first, or give this one another --state-dir")
        super().__init__(f"state dir {state_dir} is busy: {what}")


class StateDirLock:
    """Held while the open descriptor is: `close()` (or leaving the `with` block) or the process's death
    releases it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent). The file stays: removing it would let a process that opened the
        old file lock it while a third one locks a new file of the same name."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no PID of a lockgate that is gone for `status` or the next one to show
        os.close(fd)

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def lock_state_dir(state_dir: Path) -> StateDirLock:
    """Take STATE/lock exclusively without waiting, or raise StateDirBusy naming the holder's PID."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise StateDirBusy(state_dir, holder) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)  # releases the lock too
        raise
    return StateDirLock(path, fd)


def _holder_pid(fd: int) -> int | None:
    """The PID in the lock file. A holder that has just taken the lock may not have written its PID over
    the one a killed lockgate left yet: a PID that names no live process is read again, briefly."""
    for _ in range(20):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        except OSError:
            return None
        if text.isdigit() and psutil.pid_exists(int(text)):
            return int(text)
        time.sleep(0.005)
    return None
