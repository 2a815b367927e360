"""Processes that lockgate runs: spawn, watch, restart, stop, and adopt after a crash of lockgate.

What serves traffic (Envoys, workloads) must outlive a crash of lockgate itself: they run in their own
session, untied to lockgate's life, and a restarted `lockgate up` adopts them by PID (after checking the
PID still runs the very command line recorded for it) instead of starting them again. Processes that
serve no traffic (Prometheus) run under `setpriv --pdeathsig TERM`, so the kernel ends them with
lockgate. A graceful stop (Ctrl-C, SIGTERM, an error) stops everything, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
_SETPRIV = shutil.which("setpriv")


@dataclass
class ProcessInfo:
    """What status shows about one child."""

    name: str
    pid: int | None = None
    state: str = "starting"
    """starting | running | crashed | stopped"""
    restarts: int = 0
    last_exit: int | None = None


@dataclass
class Supervised:
    """One child process, restarted with backoff when it exits unless we asked it to stop."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    on_exit: Callable[[Supervised], None] = lambda _s: None
    on_start: Callable[[Supervised], None] = lambda _s: None
    dies_with_lockgate: bool = False
    """True for what serves no traffic: the kernel ends it when lockgate dies (no orphans to adopt)."""
    info: ProcessInfo = field(init=False)
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _adopted: int | None = field(default=None, init=False)
    """The PID of a process started by an earlier lockgate and taken over (not our child: polled)."""
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.info = ProcessInfo(name=self.name)

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted if running(self._adopted) else None
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        self._stopping = False  # (re)started: a later exit is a crash again, to be restarted
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise {self.name}")

    def adopt(self, pid: int) -> bool:
        """Take over a process an earlier lockgate started, if `pid` still runs exactly our command line."""
        if not runs(pid, self.argv):
            return False
        self._adopted = pid
        self.info.pid, self.info.state = pid, "running"
        self.on_start(self)
        self._task = asyncio.create_task(self._watch(), name=f"supervise {self.name}")
        return True

    async def _wait_exit(self) -> int:
        if self._adopted is not None:
            while running(self._adopted):
                await asyncio.sleep(0.2)
            self._adopted = None
            return -1  # not our child: its exit status is not ours to read
        assert self._proc is not None
        return await self._proc.wait()

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        if _SETPRIV and self.dies_with_lockgate:
            argv = [_SETPRIV, "--pdeathsig", "TERM", "--", *argv]
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, env=dict(self.env), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        self.info.pid = self._proc.pid
        self.info.state = "running"
        self.on_start(self)

    async def _watch(self) -> None:
        delay = 0.2
        while True:
            code = await self._wait_exit()
            if self._stopping:
                return
            self.info.last_exit = code
            self.info.state = "crashed"
            self.info.pid = None
            log.warning("%s exited with %s; restarting in %.1fs (log: %s)", self.name, code, delay, self.log_path)
            self.on_exit(self)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            delay = min(delay * 2, 5.0)
            try:
                await self._spawn()
            except OSError as exc:
                log.error("cannot restart %s: %s", self.name, exc)
                continue
            self.info.restarts += 1

    async def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`. Only ever signals the PID we started."""
        self._stopping = True
        if self._adopted is not None:
            await _stop_pid(self._adopted, timeout)
            self._adopted = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.info.state = "stopped"
        self.info.pid = None


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def runs(pid: int, argv: Sequence[str]) -> bool:
    """`pid` runs exactly `argv`: a recorded PID reused by some other process must never be adopted or
    signalled."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    return running(pid) and cmdline == [a.encode() for a in argv]


def stop_orphan(pid: int, argv: Sequence[str]) -> None:
    """SIGTERM a process an earlier lockgate left, only if it still runs the recorded command line."""
    if runs(pid, argv):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


async def _stop_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + timeout
    while running(pid) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def stop_all(children: Sequence[Supervised], timeout: float = 3.0) -> None:
    await asyncio.gather(*(c.stop(timeout) for c in children), return_exceptions=True)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without proxy settings (ours would loop), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env.update(extra)
    return env
