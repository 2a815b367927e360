"""Git access for lockgate, split into a reader and a writer (as fluxcd's git client is).

The reconciler only reads (head, resolve, read_tree, log, watch); the rollout controller and the CLI write
(commit, add_note) so that every automated decision lands in ``git log``. ``Pygit2Source`` is the one
implementation; everything else depends on the protocols so tests can use a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import shutil
import struct
import sys
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import pygit2
import tenacity
from pygit2.enums import CheckoutStrategy, FetchPrune, FileMode, FileStatus, RepositoryOpenFlag, SortMode

__all__ = [
    "DEFAULT_AUTHOR",
    "NOTES_REF",
    "CommitInfo",
    "GitError",
    "GitReader",
    "GitWriter",
    "Pygit2Source",
    "StaleParent",
    "init_repo",
]

log = logging.getLogger(__name__)

DEFAULT_AUTHOR: tuple[str, str] = ("lockgate", "lockgate@localhost")
NOTES_REF = "refs/notes/lockgate"

_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_STAT_POLL_S = 0.05
# The mirror takes branches, tags and notes from the remote; the remote is the truth, so force.
_MIRROR_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+refs/notes/*:refs/notes/*")


class GitError(Exception):
    """A Git failure the user can act on; the message says what happened and what to do."""


class StaleParent(GitError):
    """The branch moved since the caller read it: refresh, rebase the change onto the new tip, retry."""

    def __init__(self, *, branch: str, expected: str, actual: str | None) -> None:
        self.branch = branch
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"branch {branch!r} is at {actual or 'another commit'}, not at the expected parent {expected}:"
            " refresh, re-apply the change on the new tip and commit again"
        )


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """One commit as ``lockgate history`` shows it."""

    sha: str
    author_name: str
    author_email: str
    time: int
    """Commit time, seconds since the epoch (when it landed, which orders the log)."""
    message: str


class GitReader(Protocol):
    """Read-only view of the watched branch of an intent repository."""

    def head(self) -> str | None:
        """Sha of the watched branch tip; None while the branch has no commit."""
        ...

    def resolve(self, rev: str) -> str:
        """Full sha of any revision (sha, short sha, HEAD~1, branch, tag); GitError otherwise."""
        ...

    def read_tree(self, rev: str) -> dict[str, bytes]:
        """Every blob of the commit's tree: posix relative path -> content (never the working tree)."""
        ...

    def log(self, rev: str, *, limit: int) -> list[CommitInfo]:
        """Up to ``limit`` commits reachable from ``rev``, newest first."""
        ...

    def refresh(self) -> str | None:
        """Fetch (remote) or re-read the ref (local); returns the current head."""
        ...

    def watch(self, *, poll_interval: float = 5.0) -> AsyncGenerator[str, None]:
        """The head, then every new head; never the same sha twice in a row. Close it (aclose) when done."""
        ...


class GitWriter(Protocol):
    """Writes to the watched branch: automated decisions become commits and notes."""

    def commit(
        self,
        *,
        files: Mapping[str, bytes | None],
        message: str,
        parent: str,
        author: tuple[str, str] = DEFAULT_AUTHOR,
    ) -> str:
        """New commit on the branch with ``files`` set (None deletes); StaleParent if tip != parent."""
        ...

    def add_note(self, rev: str, *, message: str, ref: str = NOTES_REF) -> None:
        """Attach ``message`` to a commit (appended to any note already there)."""
        ...


def _is_url(location: str) -> bool:
    return "://" in location or bool(_SCP_LIKE.match(location))


def _signature(who: tuple[str, str]) -> pygit2.Signature:
    name, email = who
    return pygit2.Signature(name, email)


def _clean_path(path: str) -> str:
    """Tree paths come from callers; refuse anything that could escape the tree or touch .git."""
    pure = PurePosixPath(path)
    parts = pure.parts
    if (
        not path
        or pure.is_absolute()
        or "\\" in path
        or any(p in ("", ".", "..") for p in path.split("/"))
        or any(p.lower() == ".git" for p in parts)
    ):
        raise ValueError(f"invalid path in commit: {path!r} (want a relative posix path without . or ..)")
    return pure.as_posix()


def _common_dir(git_dir: Path) -> Path:
    """Refs and packed-refs live in the common dir, which differs from the git dir in linked worktrees."""
    pointer = git_dir / "commondir"
    if pointer.is_file():
        return (git_dir / pointer.read_text().strip()).resolve()
    return git_dir


class _PushReport(pygit2.RemoteCallbacks):
    """Collects the remote's per-ref rejections, which libgit2 reports only through this callback."""

    def __init__(self) -> None:
        super().__init__()
        self.rejected: dict[str, str] = {}

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejected[refname] = message


class Pygit2Source(GitReader, GitWriter):
    """A local repository (working tree or bare) or a bare mirror of a remote, watched on one branch."""

    def __init__(self, repo: pygit2.Repository, *, branch: str, location: str, url: str | None) -> None:
        self._repo = repo
        self._branch = branch
        self._ref = f"refs/heads/{branch}"
        self._location = location
        self._url = url
        self._git_dir = Path(repo.path)
        # Serialises fetches with commit+push on a mirror, so a fetch cannot reset a ref mid-push.
        self._lock = threading.RLock()

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, location: str, *, branch: str | None = None, cache_dir: Path | None = None) -> Pygit2Source:
        """Open a local repository path, or mirror a URL into ``cache_dir`` and fetch it once."""
        if branch is not None:
            branch = branch.removeprefix("refs/heads/")
            if not pygit2.reference_is_valid_name(f"refs/heads/{branch}"):
                raise GitError(f"{branch!r} is not a valid branch name")
        if _is_url(location):
            if cache_dir is None:
                raise GitError(f"{location} is a remote URL: pass a cache directory to hold its mirror")
            return cls._open_remote(location, branch=branch, cache_dir=cache_dir)
        return cls._open_local(location, branch=branch)

    @classmethod
    def _open_local(cls, location: str, *, branch: str | None) -> Pygit2Source:
        path = Path(location)
        if not path.exists():
            raise GitError(f"{location} does not exist: create it with `lockgate init {location}`")
        try:
            repo = pygit2.Repository(str(path), RepositoryOpenFlag.NO_SEARCH)
        except pygit2.GitError as exc:
            raise GitError(
                f"{location} is not a git repository ({exc}): pass the repository's top directory,"
                f" or create one with `lockgate init`"
            ) from None
        if branch is None:
            head = repo.lookup_reference("HEAD")
            target = head.target
            if not isinstance(target, str) or not target.startswith("refs/heads/"):
                raise GitError(f"HEAD of {location} is detached: say which branch to watch")
            branch = target.removeprefix("refs/heads/")
        return cls(repo, branch=branch, location=location, url=None)

    @classmethod
    def _open_remote(cls, url: str, *, branch: str | None, cache_dir: Path) -> Pygit2Source:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        tail = re.sub(r"[^\w.-]+", "-", url.rstrip("/").rsplit("/", 1)[-1]).strip("-.")[:40] or "repo"
        mirror = cache_dir / f"{tail}-{digest}.git"
        try:
            if (mirror / "HEAD").is_file():
                repo = pygit2.Repository(str(mirror), RepositoryOpenFlag.NO_SEARCH | RepositoryOpenFlag.BARE)
            else:
                mirror.mkdir(parents=True, exist_ok=True)
                repo = pygit2.init_repository(str(mirror), bare=True)
        except (pygit2.GitError, OSError) as exc:
            raise GitError(f"cannot create the mirror of {url} in {mirror}: {exc}") from None
        # Not remotes.delete(): with mirror refspecs libgit2 would delete every branch along with the remote.
        if "origin" in list(repo.remotes.names()):
            repo.remotes.set_url("origin", url)
        else:
            repo.remotes.create("origin", url, _MIRROR_REFSPECS[0])
        have = set(repo.remotes["origin"].fetch_refspecs)
        for spec in _MIRROR_REFSPECS:
            if spec not in have:
                repo.remotes.add_fetch("origin", spec)
        _fetch(repo, url)
        if branch is None:
            branch = _remote_default_branch(repo, url)
        source = cls(repo, branch=branch, location=url, url=url)
        # A bare mirror's HEAD is only cosmetic, but `git log` in the cache dir should show the branch.
        repo.references.create("HEAD", source._ref, force=True)
        return source

    # -- reading -------------------------------------------------------------------------------------

    @property
    def branch(self) -> str:
        return self._branch

    @property
    def location(self) -> str:
        return self._location

    @property
    def is_remote(self) -> bool:
        return self._url is not None

    @property
    def git_dir(self) -> Path:
        return self._git_dir

    def __repr__(self) -> str:
        return f"Pygit2Source({self._location!r}, branch={self._branch!r})"

    def head(self) -> str | None:
        ref = self._repo.references.get(self._ref)
        if ref is None:
            return None
        return str(ref.resolve().target)

    def refresh(self) -> str | None:
        if self._url is not None:
            with self._lock:
                _fetch(self._repo, self._url)
        return self.head()

    def _anchor(self, rev: str) -> str:
        """HEAD means the watched branch here, not whatever a working tree or a mirror has checked out."""
        if rev == "HEAD" or rev.startswith(("HEAD~", "HEAD^", "HEAD@")):
            return self._ref + rev[len("HEAD") :]
        return rev

    def _commit(self, rev: str) -> pygit2.Commit:
        try:
            obj = self._repo.revparse_single(self._anchor(rev))
        except (KeyError, ValueError, pygit2.GitError) as exc:
            detail = str(exc).strip("'\"") or type(exc).__name__
            raise GitError(
                f"cannot resolve revision {rev!r} in {self._location} ({detail}):"
                f" use a commit sha, a branch or tag name, or HEAD~N (HEAD is branch {self._branch!r})"
            ) from None
        try:
            commit = obj.peel(pygit2.Commit)
        except (ValueError, pygit2.GitError):
            kind = obj.type_str
            raise GitError(f"revision {rev!r} in {self._location} is a {kind}, not a commit") from None
        assert isinstance(commit, pygit2.Commit)
        return commit

    def resolve(self, rev: str) -> str:
        return str(self._commit(rev).id)

    def read_tree(self, rev: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        self._collect(self._commit(rev).tree, "", out)
        return out

    def _collect(self, tree: pygit2.Tree, prefix: str, out: dict[str, bytes]) -> None:
        for entry in tree:
            path = f"{prefix}{entry.name}"
            if isinstance(entry, pygit2.Tree):
                self._collect(entry, f"{path}/", out)
            elif isinstance(entry, pygit2.Blob):
                out[path] = entry.data
            # Submodule entries (commits) have no content in this repository: skipped.

    def log(self, rev: str, *, limit: int) -> list[CommitInfo]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        walker = self._repo.walk(self._commit(rev).id, SortMode.TOPOLOGICAL | SortMode.TIME)
        out: list[CommitInfo] = []
        for commit in walker:
            out.append(
                CommitInfo(
                    sha=str(commit.id),
                    author_name=commit.author.name,
                    author_email=commit.author.email,
                    time=commit.commit_time,
                    message=commit.message,
                )
            )
            if len(out) >= limit:
                break
        return out

    # -- writing -------------------------------------------------------------------------------------

    def commit(
        self,
        *,
        files: Mapping[str, bytes | None],
        message: str,
        parent: str,
        author: tuple[str, str] = DEFAULT_AUTHOR,
    ) -> str:
        if not _FULL_SHA.match(parent):
            raise ValueError(f"parent must be a full sha (from head()), got {parent!r}")
        changes = {_clean_path(path): data for path, data in files.items()}
        repo = self._repo
        committer = _signature(DEFAULT_AUTHOR)
        checked_out = False
        with self._lock:
            try:
                with repo.transaction() as txn:
                    try:
                        txn.lock_ref(self._ref)  # compare-and-swap: nobody moves the branch until we are done
                    except pygit2.GitError as exc:
                        raise GitError(
                            f"cannot lock branch {self._branch!r} in {self._git_dir} ({exc}):"
                            " another git process is writing it; retry in a moment"
                        ) from None
                    current = self.head()
                    if current != parent:
                        raise StaleParent(branch=self._branch, expected=parent, actual=current)
                    parent_commit = self._commit(parent)
                    tree_id = self._write_tree(parent_commit.tree, changes)
                    new_id = repo.create_commit(
                        None, _signature(author), committer, message, tree_id, [parent_commit.id]
                    )
                    checked_out = self._update_worktree(new_id, changes)
                    # No reflog signature: pygit2 1.21 hands cffi Signature._pointer (bytes) and raises
                    # TypeError; libgit2 falls back to the repo's identity. No explicit txn.commit() either:
                    # __exit__ commits, and committing twice makes libgit2 double-free (the process aborts).
                    first_line = message.splitlines()[0] if message else ""
                    txn.set_target(self._ref, new_id, message=f"lockgate commit: {first_line}")
            except pygit2.GitError as exc:
                if checked_out:
                    _checkout(repo, parent_commit, CheckoutStrategy.FORCE)
                raise GitError(f"cannot update branch {self._branch!r}: {exc}") from None
            sha = str(new_id)
            if self._url is not None:
                # Still under the lock: a background fetch must not reset the mirror's ref before the push.
                self._push_commit(sha, parent=parent)
        return sha

    def _write_tree(self, base: pygit2.Tree, changes: Mapping[str, bytes | None]) -> pygit2.Oid:
        """Build the new tree in an in-memory index, so the user's index and working tree are untouched."""
        index = pygit2.Index()
        index.read_tree(base)
        for path, data in changes.items():
            if data is None:
                if path in index:
                    index.remove(path)
                continue
            mode = index[path].mode if path in index else FileMode.BLOB
            index.add(pygit2.IndexEntry(path, self._repo.create_blob(data), mode))
        return index.write_tree(self._repo)

    def _update_worktree(self, new_id: pygit2.Oid, changes: Mapping[str, bytes | None]) -> bool:
        """Bring a clean checkout of the branch along, or the user's next commit would revert ours.

        Runs while the branch is locked and before it moves: HEAD still names the parent, so a SAFE
        checkout of the new commit touches exactly the files that changed (and the index).
        """
        repo = self._repo
        if repo.is_bare or repo.head_is_detached:
            return False
        head = repo.lookup_reference("HEAD").target
        if head != self._ref:
            return False
        dirty = sorted(
            path
            for path, flags in repo.status(untracked_files="no").items()
            if flags not in (FileStatus.CURRENT, FileStatus.IGNORED)
        )
        if dirty:
            log.warning(
                "%s has uncommitted changes (%s): committed to %s without touching the working tree;"
                " run `git status` and `git stash` / `git checkout` to catch up",
                repo.workdir,
                ", ".join(dirty[:5]) + (" ..." if len(dirty) > 5 else ""),
                self._branch,
            )
            return False
        try:
            _checkout(repo, repo[new_id], CheckoutStrategy.SAFE)
        except pygit2.GitError as exc:
            # libgit2 checks for conflicts (e.g. an untracked file in the way) before writing anything.
            log.warning(
                "could not update the working tree %s to the new commit (%s); changed paths: %s",
                repo.workdir,
                exc,
                ", ".join(sorted(changes)),
            )
            return False
        return True

    def _push_commit(self, sha: str, *, parent: str) -> None:
        """A mirror's commit only counts once the remote has it; if the remote moved, undo and say so."""
        assert self._url is not None
        try:
            self._push(f"{self._ref}:{self._ref}")
        except GitError as exc:
            with self._lock:
                ref = self._repo.references.get(self._ref)
                if ref is not None and str(ref.target) == sha:
                    ref.set_target(pygit2.Oid(hex=parent), "lockgate: push rejected, undo local commit")
            text = str(exc).lower()
            if "fast" in text or "not present locally" in text or "fetch first" in text:
                raise StaleParent(branch=self._branch, expected=parent, actual=None) from None
            raise

    def _push(self, refspec: str) -> None:
        assert self._url is not None
        report = _PushReport()
        with self._lock:
            try:
                self._repo.remotes["origin"].push([refspec], callbacks=report)
            except pygit2.GitError as exc:
                raise GitError(f"pushing {refspec} to {self._url} failed: {exc}") from None
        if report.rejected:
            reasons = "; ".join(f"{ref}: {why}" for ref, why in report.rejected.items())
            raise GitError(f"{self._url} rejected the push ({reasons}): refresh and retry")

    def add_note(self, rev: str, *, message: str, ref: str = NOTES_REF) -> None:
        sha = self.resolve(rev)
        sig = _signature(DEFAULT_AUTHOR)
        with self._lock:
            try:
                existing: str | None = self._repo.lookup_note(sha, ref).message
            except KeyError:
                existing = None
            text = message if existing is None else f"{existing.rstrip()}\n\n{message}"
            self._repo.create_note(text, sig, sig, sha, ref, True)  # positional only, whatever the stub says
        if self._url is not None:
            self._push(f"{ref}:{ref}")

    # -- watching ------------------------------------------------------------------------------------

    async def watch(self, *, poll_interval: float = 5.0) -> AsyncGenerator[str, None]:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        observed = self._remote_heads(poll_interval) if self._url else self._local_heads(poll_interval)
        last: str | None = None
        async with contextlib.aclosing(observed):
            async for head in observed:
                if head is not None and head != last:
                    last = head
                    yield head

    async def _local_heads(self, poll_interval: float) -> AsyncGenerator[str | None, None]:
        """Heads read after each inotify event on the ref files, and at least every poll_interval."""
        common = _common_dir(self._git_dir)
        notifier = _Inotify.open(common=common)
        if notifier is None:
            async for head in self._stat_polled_heads(common, poll_interval):
                yield head
            return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_readable() -> None:
            if notifier.drain():
                wake.set()

        loop.add_reader(notifier.fd, on_readable)
        try:
            while True:
                wake.clear()  # before reading, so an event during the read wakes the next round
                yield self.head()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_interval)
        finally:
            loop.remove_reader(notifier.fd)
            notifier.close()

    async def _stat_polled_heads(
        self, common: Path, poll_interval: float
    ) -> AsyncGenerator[str | None, None]:
        """Fallback without inotify: stat the ref files every 50 ms, re-read on change or every poll."""
        files = (common / self._ref, common / "packed-refs")

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
        yield self.head()
        while True:
            await asyncio.sleep(_STAT_POLL_S)
            now = stamp()
            if now != seen or time.monotonic() - read_at >= poll_interval:
                seen, read_at = now, time.monotonic()
                yield self.head()

    async def _remote_heads(self, poll_interval: float) -> AsyncGenerator[str | None, None]:
        """The mirror's head now, then after each fetch; fetch errors are logged and retried, never raised."""
        yield self.head()
        while True:
            retrying = tenacity.AsyncRetrying(
                wait=tenacity.wait_exponential(multiplier=poll_interval, max=poll_interval * 4),
                retry=tenacity.retry_if_exception_type(Exception),
                before_sleep=tenacity.before_sleep_log(log, logging.WARNING),
            )
            async for attempt in retrying:
                with attempt:
                    await asyncio.to_thread(self._fetch_in_thread)
            yield self.head()
            await asyncio.sleep(poll_interval)

    def _fetch_in_thread(self) -> None:
        """A libgit2 repository object must not be shared across threads: fetch through a second one."""
        assert self._url is not None
        with self._lock:
            repo = pygit2.Repository(str(self._git_dir), RepositoryOpenFlag.NO_SEARCH)
            try:
                _fetch(repo, self._url)
            finally:
                repo.free()


def _checkout(
    repo: pygit2.Repository, treeish: pygit2.Object | pygit2.Commit, strategy: CheckoutStrategy
) -> None:
    repo.checkout_tree(treeish, strategy=strategy)  # type: ignore[no-untyped-call]


def _fetch(repo: pygit2.Repository, url: str) -> None:
    try:
        repo.remotes["origin"].fetch(prune=FetchPrune.PRUNE, message=f"lockgate: fetch {url}")
    except (pygit2.GitError, OSError) as exc:
        raise GitError(f"fetching {url} failed: {exc}. check the URL, network and credentials") from None


def _remote_default_branch(repo: pygit2.Repository, url: str) -> str:
    """The branch the remote's HEAD names (as `git clone` picks it); main or master if it does not say."""
    try:
        # One more round trip: after a fetch libgit2 no longer has the advertised symrefs.
        heads = repo.remotes["origin"].list_heads()
    except pygit2.GitError:
        heads = []
    for head in heads:
        if head.name == "HEAD" and head.symref_target and head.symref_target.startswith("refs/heads/"):
            return head.symref_target.removeprefix("refs/heads/")
    local = set(repo.branches.local)
    for name in ("main", "master"):
        if name in local:
            return name
    if len(local) == 1:
        return next(iter(local))
    raise GitError(f"cannot tell the default branch of {url}: say which branch to watch")


# -- inotify -----------------------------------------------------------------------------------------

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_IGNORED = 0x00008000
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_WATCH_MASK = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class _Inotify:
    """Minimal inotify through ctypes: watch the git dir (packed-refs) and refs/heads (recursively)."""

    def __init__(self, libc: ctypes.CDLL, fd: int, heads: Path) -> None:
        self._libc = libc
        self.fd = fd
        self._heads = heads
        self._dirs: dict[int, Path] = {}

    @classmethod
    def open(cls, *, common: Path) -> _Inotify | None:
        """None when inotify is unavailable (not Linux, no libc symbol, out of instances or watches)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            init1 = libc.inotify_init1
            add_watch = libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            log.info("inotify unavailable (%s): polling ref files instead", exc)
            return None
        init1.argtypes = [ctypes.c_int]
        init1.restype = ctypes.c_int
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add_watch.restype = ctypes.c_int
        fd = init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            log.info("inotify_init1 failed (%s): polling ref files instead", os.strerror(ctypes.get_errno()))
            return None
        notifier = cls(libc, fd, common / "refs" / "heads")
        if not (notifier._add(common) and notifier._add(common / "refs")):
            notifier.close()
            return None
        notifier._add_tree(notifier._heads)
        return notifier

    def _add(self, path: Path) -> bool:
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), _WATCH_MASK))
        if wd < 0:
            err = ctypes.get_errno()
            log.info("inotify_add_watch(%s) failed: %s", path, os.strerror(err))
            return False
        self._dirs[wd] = path
        return True

    def _add_tree(self, root: Path) -> None:
        """Branch names with slashes live in subdirectories, which git creates and removes on demand."""
        for dirpath, _dirnames, _files in os.walk(root):
            self._add(Path(dirpath))

    def drain(self) -> bool:
        """Read every pending event; watch new directories under refs/heads. True if anything happened."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return seen
            except OSError as exc:
                log.warning("reading inotify events failed: %s", exc)
                return True
            if not data:
                return seen
            seen = True
            for wd, mask, name in self._events(data):
                if mask & _IN_IGNORED:
                    self._dirs.pop(wd, None)
                elif mask & _IN_ISDIR and mask & (_IN_CREATE | _IN_MOVED_TO) and wd in self._dirs:
                    new = self._dirs[wd] / name
                    if new == self._heads or self._heads in new.parents:
                        self._add_tree(new)

    @staticmethod
    def _events(data: bytes) -> Iterator[tuple[int, int, str]]:
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            yield wd, mask, os.fsdecode(raw.rstrip(b"\0"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- lockgate init -----------------------------------------------------------------------------------


def init_repo(path: Path, *, template: Path, branch: str = "main") -> str:
    """`git init` + the template's files as the first commit; returns its sha. Refuses to clobber anything."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise GitError(f"{path} already exists and is not empty: choose a new directory for the intent repo")
    if not template.is_dir():
        raise GitError(f"repo template {template} is not a directory: reinstall lockgate")
    if not pygit2.reference_is_valid_name(f"refs/heads/{branch}"):
        raise GitError(f"{branch!r} is not a valid branch name")
    repo = pygit2.init_repository(str(path), bare=False, initial_head=branch)
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(template):
        src_dir = Path(dirpath)
        dst_dir = path / src_dir.relative_to(template)
        dst_dir.mkdir(parents=True, exist_ok=True)
        # os.walk lists symlinked directories without entering them: commit them as the links they are.
        links = [d for d in dirnames if (src_dir / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d != ".git" and d not in links)
        for name in sorted(filenames + links):
            src, dst = src_dir / name, dst_dir / name
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)
            files.append(dst.relative_to(path).as_posix())
    index = repo.index
    for rel in files:
        index.add(rel)
    index.write()
    sig = _signature(DEFAULT_AUTHOR)
    message = "lockgate init: start from the repo template"
    oid = repo.create_commit(f"refs/heads/{branch}", sig, sig, message, index.write_tree(), [])
    return str(oid)
