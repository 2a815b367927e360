"""Processes that lockgate runs: spawn, watch, restart, stop, and adopt after a crash of lockgate.

What serves traffic (Envoys, workloads) must outlive a crash of lockgate itself: they run in their own
session, untied to lockgate's life, and a restarted `lockgate up` adopts them by PID (after checking the
PID still runs the very command line recorded for it and, where its start time was recorded too, is that
very process) instead of starting them again. Processes that serve no traffic (Prometheus) run under
`setpriv --pdeathsig TERM`, so the kernel ends them with lockgate. A graceful stop (Ctrl-C, SIGTERM, an
error) stops everything, in order.
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

import psutil

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
    before_spawn: Callable[[Supervised], None] = lambda _s: None
    """Called before every spawn, the first and each restart (not on adoption): e.g. to write a fresh
    credential into the config the new process reads."""
    dies_with_lockgate: bool = False
    """True for what serves no traffic: the kernel ends it when lockgate dies (no orphans to adopt)."""
    prefix: Sequence[str] = ()
    """Run `argv` under this (e.g. `nsenter --net=... --`: a cluster's network namespace). It must exec
    `argv`, so that the process is `argv` itself: adoption and orphan checks match `argv`, not the prefix."""
    info: ProcessInfo = field(init=False)
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _adopted: psutil.Process | None = field(default=None, init=False)
    """A process started by an earlier lockgate and taken over (not our child: polled). psutil's handle
    knows the process's start time, so a PID reused after it exited is never taken for it."""
    _started: float | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.info = ProcessInfo(name=self.name)

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted.pid if _alive(self._adopted) else None
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def started(self) -> float | None:
        """When the running process started (see `start_time`): record it next to `pid` and pass it to
        `adopt` / `stop_orphan`, so that a PID reused by the same command line is still told apart."""
        return self._started if self.pid is not None else None

    async def start(self) -> None:
        self._stopping = False  # (re)started: a later exit is a crash again, to be restarted
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise {self.name}")

    def adopt(self, pid: int, *, started: float | None = None) -> bool:
        """Take over a process an earlier lockgate started, if `pid` still runs exactly our command line
        (and, given `started` as recorded from `started`/`start_time`, is still that very process)."""
        proc = _matching(pid, self.argv, started)
        if proc is None:
            return False
        self._adopted, self._started = proc, _since_boot(proc)
        self.info.pid, self.info.state = pid, "running"
        self.on_start(self)
        self._task = asyncio.create_task(self._watch(), name=f"supervise {self.name}")
        return True

    async def _wait_exit(self) -> int:
        if self._adopted is not None:
            adopted = self._adopted  # stop() may drop it meanwhile
            while _alive(adopted):
                await asyncio.sleep(0.2)
            self._adopted = None
            return -1  # not our child: its exit status is not ours to read
        assert self._proc is not None
        return await self._proc.wait()

    async def _spawn(self) -> None:
        self.before_spawn(self)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [*self.prefix, *self.argv]
        if _SETPRIV and self.dies_with_lockgate:
            argv = [_SETPRIV, "--pdeathsig", "TERM", "--", *argv]
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, env=dict(self.env), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        self._started = start_time(self._proc.pid)
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
            await _stop_adopted(self._adopted, timeout)
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


_SAME_START_S = 0.005
"""Start times closer than this are the same (the kernel counts them in 10 ms ticks)."""


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has exited: only its exit status is left)."""
    return _process(pid) is not None


def runs(pid: int, argv: Sequence[str], *, started: float | None = None) -> bool:
    """`pid` runs exactly `argv`: a recorded PID reused by some other process must never be adopted or
    signalled. Given `started` (recorded from `start_time` with the PID), the process must also have
    started then: that tells apart even a later process with the same PID and the same command line."""
    return _matching(pid, argv, started) is not None


def start_time(pid: int) -> float | None:
    """When `pid` started, in seconds since boot (None if it is not running).

    Seconds since boot, not psutil's wall-clock `create_time` as such: that one moves when the clock is
    set, and a recorded value must still match after a clock step, or the data plane would be restarted
    and its old processes left running."""
    proc = _process(pid)
    return None if proc is None else _since_boot(proc)


def _process(pid: int) -> psutil.Process | None:
    """The live process `pid`, or None: gone, a zombie, or the ID of a thread (which /proc answers for
    too, with its process's command line)."""
    if pid <= 0 or not psutil.pid_exists(pid):  # 0 and -1 would mean a whole group to kill(2)
        return None
    try:
        proc = psutil.Process(pid)
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def _alive(proc: psutil.Process) -> bool:
    """`proc` still runs, and its PID has not gone to another process since (psutil checks its start)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _since_boot(proc: psutil.Process) -> float | None:
    try:
        # On Linux psutil's create_time is the kernel's start tick plus boot_time: taking boot_time off
        # again leaves a value no clock change moves.
        return round(float(proc.create_time()) - float(psutil.boot_time()), 2)
    except psutil.Error:
        return None


def _matching(pid: int, argv: Sequence[str], started: float | None) -> psutil.Process | None:
    """The process `pid` if it runs exactly `argv` (and started at `started`, when given)."""
    proc = _process(pid)
    if proc is None:
        return None
    try:
        if proc.cmdline() != list(argv):
            return None
    except psutil.Error:
        return None
    if started is not None:
        now = _since_boot(proc)
        if now is None or abs(now - started) > _SAME_START_S:
            return None
    return proc


def stop_orphan(pid: int, argv: Sequence[str], *, started: float | None = None) -> None:
    """SIGTERM a process an earlier lockgate left, only if it still runs the recorded command line (and
    started at `started`, when that was recorded)."""
    proc = _matching(pid, argv, started)
    if proc is None:
        return
    try:
        proc.send_signal(signal.SIGTERM)  # psutil refuses if the PID went to another process meanwhile
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        log.warning("cannot stop pid %d (%s): not ours to signal", pid, " ".join(argv))


def stop_and_wait(procs: Sequence[tuple[int, Sequence[str], float | None]], timeout: float = 3.0) -> None:
    """SIGTERM each (pid, recorded argv, recorded start) that still runs that command, wait for them to
    exit, SIGKILL what is left after `timeout`. Blocking: for start-up, before anything else runs."""
    found = [p for pid, argv, started in procs if (p := _matching(pid, argv, started)) is not None]
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


async def _stop_adopted(proc: psutil.Process, timeout: float) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _alive(proc) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if _alive(proc):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)


async def stop_all(children: Sequence[Supervised], timeout: float = 3.0) -> None:
    await asyncio.gather(*(c.stop(timeout) for c in children), return_exceptions=True)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without proxy settings (ours would loop), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env.update(extra)
    return env
