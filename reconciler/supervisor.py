"""Child processes that lockgate starts: spawn, watch, restart, and always stop.

Every child runs under `setpriv --pdeathsig TERM`, so even if lockgate itself is killed with SIGKILL
the kernel terminates its children: no Envoy or workload is ever left behind. Children get their own
session, so a Ctrl-C in the terminal reaches lockgate only, which then stops them in order.
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
    info: ProcessInfo = field(init=False)
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.info = ProcessInfo(name=self.name)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise {self.name}")

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        if _SETPRIV:
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
            assert self._proc is not None
            code = await self._proc.wait()
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


async def stop_all(children: Sequence[Supervised], timeout: float = 3.0) -> None:
    await asyncio.gather(*(c.stop(timeout) for c in children), return_exceptions=True)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without proxy settings (ours would loop), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env.update(extra)
    return env
