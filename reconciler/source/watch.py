"""Watching a branch for new commits, as async generators of heads (``Pygit2Source.watch`` dedupes them).

Local repositories: inotify on the files a branch tip lives in, so a ``git commit`` is noticed in about a
millisecond, with stat polling where inotify is unavailable. Remotes: fetch in a worker thread (libgit2
blocks) every poll interval, backing off on errors, and never waiting on one fetch past a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from reconciler.source.worker import finished

try:
    import inotify_simple
except ImportError:  # no fcntl/termios (not a Unix): stat polling only
    inotify_simple = None

__all__ = ["RefWatcher", "local_heads", "remote_heads", "stat_polled_heads"]

log = logging.getLogger(__name__)

STAT_POLL_S = 0.05
"""How often the fallback stats the ref files: a commit is noticed within this, at the cost of a few syscalls."""

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ISDIR = 0x40000000
# Git writes a ref as <name>.lock and renames it into place (MOVED_TO); CLOSE_WRITE catches tools that write
# in place; CREATE/DELETE see directories for branch names with slashes come and go.
_WATCH_MASK = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE


class RefWatcher:
    """inotify on the common git dir (packed-refs), refs/ (in case heads/ is recreated) and refs/heads/**."""

    def __init__(self, notify: Any, *, common: Path) -> None:
        self._notify = notify
        self._common = common
        self._refs = common / "refs"
        self._heads = common / "refs" / "heads"
        self._dirs: dict[int, Path] = {}

    @classmethod
    def open(cls, common: Path) -> RefWatcher | None:
        """None when inotify is unavailable (not Linux, out of instances or watches): the caller polls."""
        if inotify_simple is None:
            return None
        try:
            notify = inotify_simple.INotify(nonblocking=True)
        except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify_init1
            log.info("inotify unavailable (%s): polling the ref files instead", exc)
            return None
        watcher = cls(notify, common=common)
        if not (watcher._add(common) and watcher._add(watcher._refs)):
            watcher.close()
            return None
        watcher._add_tree(watcher._heads)
        return watcher

    @property
    def fd(self) -> int:
        return int(self._notify.fileno())

    def _add(self, path: Path) -> bool:
        try:
            wd = int(self._notify.add_watch(path, _WATCH_MASK))
        except OSError as exc:
            log.info("inotify cannot watch %s (%s): changes there are seen by the safety poll only", path, exc)
            return False
        self._dirs[wd] = path
        return True

    def _add_tree(self, root: Path) -> None:
        """Branch names with slashes live in subdirectories, which git creates and removes on demand."""
        for dirpath, _dirnames, _files in os.walk(root):
            self._add(Path(dirpath))

    def _under_heads(self, path: Path) -> bool:
        return path == self._heads or self._heads in path.parents

    def drain(self) -> bool:
        """Read every pending event and watch new directories under refs/heads; True if a ref may have moved.

        A directory's watch starts after the directory exists, so a ref renamed into it meanwhile makes no
        event: the caller re-reads the head after drain() returns, which is after the watch was added.
        """
        try:
            events = self._notify.read(timeout=0)
        except OSError as exc:
            log.warning("reading inotify events failed (%s): re-reading the head", exc)
            return True
        moved = False
        for event in events:
            wd, mask, name = int(event.wd), int(event.mask), str(event.name)
            if mask & _IN_Q_OVERFLOW:
                self._add_tree(self._heads)  # events were lost, new directories among them
                moved = True
                continue
            if mask & _IN_IGNORED:
                self._dirs.pop(wd, None)
                continue
            parent = self._dirs.get(wd)
            if parent is None:
                continue
            path = parent / name
            if mask & _IN_ISDIR:
                if self._under_heads(path):
                    if mask & (_IN_CREATE | _IN_MOVED_TO):
                        self._add_tree(path)
                    moved = True
            elif self._under_heads(parent):
                moved = moved or not name.endswith(".lock")  # the lock is taken, the ref not yet moved
            elif parent == self._common and name == "packed-refs":
                moved = True
        return moved

    def close(self) -> None:
        self._notify.close()


async def local_heads(
    *, common: Path, ref: str, head: Callable[[], str | None], poll_interval: float
) -> AsyncGenerator[str | None, None]:
    """The head after each inotify event on the ref files, and at least every poll_interval."""
    watcher = RefWatcher.open(common)
    if watcher is None:
        async with contextlib.aclosing(
            stat_polled_heads(files=(common / ref, common / "packed-refs"), head=head, poll_interval=poll_interval)
        ) as polled:
            async for tip in polled:
                yield tip
        return
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def on_readable() -> None:
        if watcher.drain():
            wake.set()

    loop.add_reader(watcher.fd, on_readable)
    try:
        while True:
            wake.clear()  # before reading, so an event during the read wakes the next round
            yield head()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):  # not wait_for: it can swallow a cancellation on 3.11
                    await wake.wait()
    finally:
        loop.remove_reader(watcher.fd)
        watcher.close()


async def stat_polled_heads(
    *, files: tuple[Path, ...], head: Callable[[], str | None], poll_interval: float
) -> AsyncGenerator[str | None, None]:
    """Fallback without inotify: stat the ref files every 50 ms, re-read on change or every poll."""

    def stamp() -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in files:
            try:
                st = path.stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    seen = stamp()
    read_at = time.monotonic()
    yield head()
    while True:
        await asyncio.sleep(STAT_POLL_S)
        now = stamp()
        if now != seen or time.monotonic() - read_at >= poll_interval:
            seen, read_at = now, time.monotonic()
            yield head()


def _backoff(poll_interval: float, failures: int) -> float:
    """Wait before the next fetch: the poll interval, doubling per failure in a row up to four times it."""
    if failures == 0:
        return poll_interval
    return float(min(poll_interval * 2 ** (failures - 1), poll_interval * 4))


def _retrieve(task: asyncio.Future[None]) -> None:
    """A fetch abandoned by a closed watch may still fail: take its exception so asyncio does not warn."""
    if not task.cancelled():
        task.exception()


async def remote_heads(
    *,
    fetch: Callable[[], None],
    head: Callable[[], str | None],
    on_stall: Callable[[float], None],
    label: str,
    poll_interval: float,
    deadline: float,
    wake: asyncio.Event | None = None,
) -> AsyncGenerator[str | None, None]:
    """The mirror's head now, then after each successful fetch; errors are logged and retried, never raised.

    ``fetch`` runs in a worker thread and records its own outcome. A thread cannot be cancelled, so a fetch
    still running at ``deadline`` is reported through ``on_stall`` and waited for again on the next round,
    never duplicated: a hung remote costs one thread, not one per poll. Setting ``wake`` (a verified
    webhook) ends the wait for the next poll at once; one set during a fetch brings another fetch right
    after it, since the push it announces may have landed after that fetch began.
    """
    yield head()
    failures = 0
    pending: asyncio.Future[None] | None = None
    try:
        while True:
            if pending is None:
                if wake is not None:
                    wake.clear()  # this fetch answers every wake-up so far
                pending = asyncio.ensure_future(asyncio.to_thread(fetch))
            try:
                await finished(pending, deadline)
            except TimeoutError:
                failures += 1
                on_stall(deadline)
                log.warning(
                    "fetching %s has not finished after %.0fs; still waiting, next check in %.1fs",
                    label,
                    deadline,
                    _backoff(poll_interval, failures),
                )
            except Exception as exc:  # any failure is the remote's: keep watching
                pending = None
                failures += 1
                log.warning("%s; retrying in %.1fs", exc, _backoff(poll_interval, failures))
            else:
                pending = None
                failures = 0
                yield head()
            if wake is None:
                await asyncio.sleep(_backoff(poll_interval, failures))
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_backoff(poll_interval, failures)):  # not wait_for (3.11)
                        await wake.wait()
    finally:
        if pending is not None:
            pending.add_done_callback(_retrieve)
