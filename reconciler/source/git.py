"""Pygit2Source: the one implementation of the reader and writer protocols, with pygit2 kept at this edge.

A source is a local repository (work tree or bare), or a bare mirror of a remote URL kept in a cache
directory; it watches one branch. ``reading()`` gives a short-lived source for one command, mirroring a URL
into a temporary directory. The protocols, errors and constants live in ``base`` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pygit2
from pygit2.enums import (
    CheckoutStrategy,
    CredentialType,
    FetchPrune,
    FileMode,
    FileStatus,
    RepositoryOpenFlag,
    SortMode,
)

from reconciler.source.base import (
    DEFAULT_AUTHOR,
    FETCH_DEADLINE_S,
    FETCH_IO_TIMEOUT_S,
    NOTES_REF,
    CommitInfo,
    CommitSignature,
    GitError,
    GitReader,
    GitWriter,
    SourceHealth,
    StaleParent,
)
from reconciler.source.signatures import ssh_sign
from reconciler.source.watch import local_heads, remote_heads

if TYPE_CHECKING:
    from reconciler.load import Tree

__all__ = [
    "DEFAULT_AUTHOR",
    "NOTES_REF",
    "CommitInfo",
    "GitError",
    "GitReader",
    "GitWriter",
    "HttpCredentials",
    "Pygit2Source",
    "SourceHealth",
    "StaleParent",
    "init_repo",
    "reading",
]

log = logging.getLogger(__name__)

_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
# The mirror takes branches, tags and notes from the remote; the remote is the truth, so force.
_MIRROR_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+refs/notes/*:refs/notes/*")


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


_MAX_TREE_OBJECT_BYTES = 16 << 20
"""A directory listing larger than this (some 300,000 entries) is refused before it is inflated."""


def _entry_problem(raw_name: bytes, path: str) -> str | None:
    """Why a tree entry cannot be taken as the path it spells. Git never writes these names; a tree that
    holds one was crafted, and skipping it quietly would apply a revision that is not what it seems."""
    from reconciler.load import path_problem

    if (why := path_problem(path)) is not None:
        return why
    if b"/" in raw_name:
        return "a '/' inside one name (a crafted tree entry that would pass for another path)"
    return None


def _common_dir(git_dir: Path) -> Path:
    """Refs and packed-refs live in the common dir, which differs from the git dir in linked worktrees."""
    pointer = git_dir / "commondir"
    if pointer.is_file():
        return (git_dir / pointer.read_text().strip()).resolve()
    return git_dir


@dataclass(frozen=True)
class HttpCredentials:
    """A username and password (or token) for an http(s) remote: a GitSource's secretRef, say."""

    username: str
    password: str = field(repr=False)


def credentials_problem(url: str, credentials: HttpCredentials | None) -> str | None:
    """Why `credentials` must not be sent to `url`, or None. Basic auth travels in clear over http://, so
    only https:// (or a loopback address, which never leaves this machine) may carry it."""
    if credentials is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and parts.hostname is not None:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return None
        if parts.hostname == "localhost":
            return None
    return f"credentials are sent only over https:// (or to a loopback address), not to {url}"


class _Auth(pygit2.RemoteCallbacks):
    """Answers libgit2's credential requests with the source's username and password, once per request:
    a refusal is a refusal, not a loop of retries with the same secret."""

    def __init__(self, credentials: HttpCredentials | None) -> None:
        super().__init__()
        self._credentials = credentials

    def credentials(self, url: str, username_from_url: str | None, allowed_types: Any) -> Any:
        if self._credentials is None or not allowed_types & CredentialType.USERPASS_PLAINTEXT:
            raise GitError(f"{url} asks for credentials this source does not have")
        return pygit2.UserPass(self._credentials.username, self._credentials.password)


class _PushReport(_Auth):
    """Collects the remote's per-ref rejections, which libgit2 reports only through this callback."""

    def __init__(self, credentials: HttpCredentials | None = None) -> None:
        super().__init__(credentials)
        self.rejected: dict[str, str] = {}

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejected[refname] = message


class Pygit2Source(GitReader, GitWriter):
    """A local repository (working tree or bare) or a bare mirror of a remote, watched on one branch."""

    def __init__(
        self,
        repo: pygit2.Repository,
        *,
        branch: str,
        location: str,
        url: str | None,
        fetch_deadline: float = FETCH_DEADLINE_S,
        signing_key: Path | None = None,
    ) -> None:
        self._repo = repo
        # lockgate's own commits are signed with it (SSH, as git's gpg.format=ssh), so a policy that refuses
        # unsigned heads still applies its write-backs.
        self._signing_key = signing_key
        self._branch = branch
        self._ref = f"refs/heads/{branch}"
        self._location = location
        self._url = url
        self._git_dir = Path(repo.path)
        self._fetch_deadline = fetch_deadline
        # Serialises fetches with commit+push on a mirror, so a fetch cannot reset a ref mid-push.
        self._lock = threading.RLock()
        # Fetches record their outcome from worker threads while the loop reads health(): never behind _lock,
        # which a hung fetch holds.
        self._health_lock = threading.Lock()
        self._health = SourceHealth(remote=True) if url is not None else SourceHealth.local()
        self._fetch_started: float | None = None
        self._credentials: HttpCredentials | None = None
        self._wake: asyncio.Event | None = None
        """Set by wake() to fetch now rather than at the next poll (a remote's watch only)."""
        self._blobs: dict[pygit2.Oid, bytes] = {}
        """The files of the last tree read, by blob id (a blob's content is its id's, forever): the next read
        inflates only blobs it has not seen. Holds one revision's files (what the last read kept), so it is
        bounded as that read was. Measured at 1000 files: a read after a one-file commit 60 ms -> 9-15 ms."""

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, location: str, *, branch: str | None = None, cache_dir: Path | None = None,
        signing_key: Path | None = None, fetch_deadline: float | None = None,
        credentials: HttpCredentials | None = None,
    ) -> Pygit2Source:
        """Open a local repository path (work tree or bare), or mirror a URL into ``cache_dir`` and fetch it once.

        Without ``branch``: the branch HEAD names (for a URL, the remote's HEAD, as `git clone` picks it; for a
        bare repository whose HEAD names a branch that was never pushed: main, master or its only branch).
        With ``signing_key`` (an SSH private key), every commit() is signed with it. ``credentials``: what an
        http(s) remote asks for (never sent over plain http to another machine).
        """
        if branch is not None:
            branch = branch.removeprefix("refs/heads/")
            if not pygit2.reference_is_valid_name(f"refs/heads/{branch}"):
                raise GitError(f"{branch!r} is not a valid branch name")
        if signing_key is not None and not signing_key.is_file():
            raise GitError(f"signing key {signing_key} is not a file: give an SSH private key (ssh-keygen -t ed25519)")
        if _is_url(location):
            if cache_dir is None:
                raise GitError(f"{location} is a remote URL: pass a cache directory to hold its mirror")
            if (why := credentials_problem(location, credentials)) is not None:
                raise GitError(why)
            source = cls._open_remote(location, branch=branch, cache_dir=cache_dir, credentials=credentials)
        else:
            source = cls._open_local(location, branch=branch)
        source._signing_key = signing_key
        if fetch_deadline is not None:
            source._fetch_deadline = fetch_deadline
        return source

    @classmethod
    def _open_local(cls, location: str, *, branch: str | None) -> Pygit2Source:
        path = Path(location)
        if not path.exists():
            raise GitError(f"{location} does not exist: create it with `lockgate init {location}`")
        try:
            # NO_SEARCH: a directory inside some other repository must not silently open that one.
            repo = pygit2.Repository(str(path), RepositoryOpenFlag.NO_SEARCH)
        except pygit2.GitError as exc:
            raise GitError(
                f"{location} is not a git repository ({exc}): pass the repository's top directory"
                " (a work tree or a bare repository), or create one with `lockgate init`"
            ) from None
        if branch is None:
            branch = _local_default_branch(repo, location)
        return cls(repo, branch=branch, location=location, url=None)

    @classmethod
    def _open_remote(cls, url: str, *, branch: str | None, cache_dir: Path,
                     credentials: HttpCredentials | None = None) -> Pygit2Source:
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
        started = time.time()
        _fetch(repo, url, credentials)
        if branch is None:
            branch = _remote_default_branch(repo, url, credentials)
        source = cls(repo, branch=branch, location=url, url=url)
        source._credentials = credentials
        source._health = source._health.after_attempt(started_at=started, finished_at=time.time(), error=None)
        # A bare mirror's HEAD is only cosmetic, but `git log` in the cache dir should show the branch.
        repo.references.create("HEAD", source._ref, force=True)
        return source

    def close(self) -> None:
        """Release libgit2's file handles (packs, indexes) now rather than at garbage collection."""
        self._repo.free()

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

    @property
    def workdir(self) -> Path | None:
        """The checked-out files, or None (bare repository, mirror): then only committed revisions exist."""
        workdir = self._repo.workdir
        return Path(workdir) if workdir else None

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
                self._fetch_recorded(self._repo)
        return self.head()

    def health(self) -> SourceHealth:
        return self._health

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
            hint = f"use a commit sha, a branch or tag name, or HEAD~N (HEAD is branch {self._branch!r})"
            if self.head() is None:
                others = sorted(set(self._repo.branches.local) - {self._branch})
                hint = f"branch {self._branch!r} has no commit yet" + (
                    f"; branches here: {', '.join(others[:10])}" if others else ""
                )
            raise GitError(f"cannot resolve revision {rev!r} in {self._location} ({detail}): {hint}") from None
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
        """The commit's files as a ``reconciler.load.Tree``: a dict of path -> content, whose ``refused`` names
        each entry a checkout would not reproduce as the plain file it claims to be, and each file past the
        limits of ``reconciler.load`` (which reports them as ``path:0`` errors). Hidden directories are not
        intent and not read; files that are not intent are read within the same limits, else left out.
        Bounded in entries, depth and bytes inflated, whatever the commit holds."""
        from reconciler.load import Tree  # the loader's type; imported here so opening a source stays light

        out = Tree()
        seen: dict[pygit2.Oid, bytes] = {}
        self._collect(self._commit(rev).tree_id, out, seen)
        self._blobs = seen  # replaced whole: another thread's read keeps the dict it started with
        return out

    def _collect(self, root: pygit2.Oid, out: Tree, seen: dict[pygit2.Oid, bytes]) -> None:
        """Walk the tree with a stack, not recursion (a crafted commit can nest trees thousands deep), sizing
        every object from its header before it is inflated (a blob of zeros compresses a thousandfold)."""
        from reconciler.load import MAX_DIRECTORY_DEPTH, MAX_ENTRIES, MAX_TOTAL_BYTES, printable

        odb = self._repo.odb
        budget = {True: MAX_TOTAL_BYTES, False: MAX_TOTAL_BYTES}  # intent files, other files
        entries = 0
        stack: list[tuple[pygit2.Oid, str, int]] = [(root, "", 0)]
        while stack:
            oid, prefix, depth = stack.pop()
            where = prefix.rstrip("/") or "."
            try:
                if odb.read_header(oid)[1] > _MAX_TREE_OBJECT_BYTES:
                    out.refused[where] = f"a directory of more than {_MAX_TREE_OBJECT_BYTES >> 20} MiB: not read"
                    continue
                tree = self._repo[oid]
                listing = list(tree) if isinstance(tree, pygit2.Tree) else None
            except Exception as exc:  # a corrupt or missing object: whatever libgit2 raises, it is refused
                out.refused[where] = f"cannot read this directory from the repository: {exc}"
                continue
            if listing is None:
                out.refused[where] = f"a {tree.type_str} where the tree says a directory"
                continue
            for entry in listing:
                entries += 1
                if entries > MAX_ENTRIES:
                    out.refused["."] = f"more than {MAX_ENTRIES} files and directories: not read further"
                    return
                raw = entry.raw_name or b""
                path = prefix + raw.decode("utf-8", "surrogateescape")
                shown = printable(path)
                why = _entry_problem(raw, path)
                if why is not None:
                    out.refused[shown] = why
                    continue
                if raw.startswith(b"."):
                    continue  # hidden: not intent (mesh.intent.is_intent_file), not read
                mode = int(entry.filemode)
                if mode == FileMode.TREE:
                    if depth + 1 > MAX_DIRECTORY_DEPTH:
                        out.refused[shown] = f"directories nested more than {MAX_DIRECTORY_DEPTH} deep: not read"
                    else:
                        stack.append((entry.id, f"{path}/", depth + 1))
                elif mode == FileMode.LINK:
                    out.refused[shown] = (f"a symbolic link{self._link_target(entry.id)}: intent must be plain files "
                                          "(a checkout would follow it, the commit holds only the link)")
                elif mode == FileMode.COMMIT:
                    out.refused[shown] = (f"a submodule (commit {str(entry.id)[:12]}): its files are not in this "
                                          "repository; copy the intent in")
                elif mode & 0o170000 != 0o100000:
                    out.refused[shown] = f"an entry of unknown mode {mode:o}"
                else:
                    self._read_blob(entry.id, path, out, budget, seen)

    def _read_blob(self, oid: pygit2.Oid, path: str, out: Tree, budget: dict[bool, int],
                   seen: dict[pygit2.Oid, bytes]) -> None:
        """One file, sized from its header first: intent past a limit is refused, anything else left out.
        A blob the last read kept is taken from it, with the same checks on its size."""
        from mesh.intent import is_intent_file
        from reconciler.load import MAX_FILE_BYTES, MAX_TOTAL_BYTES

        intent = is_intent_file(path)
        why: str | None = None
        known = self._blobs.get(oid)
        if known is None:
            known = seen.get(oid)  # the same content at two paths of this tree
        try:
            size = len(known) if known is not None else self._repo.odb.read_header(oid)[1]
            if size > MAX_FILE_BYTES:
                why = (f"file is {size} bytes, more than the {MAX_FILE_BYTES >> 20} MiB limit for one intent file: "
                       "split it")
            elif size > budget[intent]:
                why = f"not read: the revision's intent files total more than {MAX_TOTAL_BYTES >> 20} MiB"
            elif known is not None:
                out[path] = seen[oid] = known
                budget[intent] -= size
            else:
                blob = self._repo[oid]
                if isinstance(blob, pygit2.Blob):
                    out[path] = seen[oid] = blob.data
                    budget[intent] -= size
                else:
                    why = f"a {blob.type_str} where the tree says a file"
        except Exception as exc:  # a corrupt or missing object, as above
            why = f"cannot read this file from the repository: {exc}"
        if why is not None and intent:
            out.refused[path] = why

    def _link_target(self, oid: pygit2.Oid) -> str:
        """` (to 'target')`, when the link's blob is small enough to show."""
        try:
            if self._repo.odb.read_header(oid)[1] > 256:
                return ""
            blob = self._repo[oid]
        except Exception:  # only the message's detail is lost
            return ""
        return f" (to {blob.data.decode('utf-8', 'backslashreplace')!r})" if isinstance(blob, pygit2.Blob) else ""

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

    @property
    def signing_key(self) -> Path | None:
        """The SSH key lockgate signs its commits with, or None (unsigned commits)."""
        return self._signing_key

    def commit_signature(self, rev: str) -> CommitSignature:
        sha = rev if _FULL_SHA.match(rev) else self.resolve(rev)
        # The check runs on a worker thread: a handle of its own, as _fetch_in_thread does for fetches.
        repo = pygit2.Repository(str(self._git_dir), RepositoryOpenFlag.NO_SEARCH)
        try:
            try:
                obj = repo.get(sha)
            except ValueError:
                obj = None
            if not isinstance(obj, pygit2.Commit):
                raise GitError(f"{sha} is not a commit in {self._location}")
            signature, payload = obj.gpg_signature
            return CommitSignature(
                sha=sha,
                signature=signature or None,
                payload=payload if signature else obj.read_raw(),
                committer_email=obj.committer.raw_email.decode("utf-8", errors="replace"),
            )
        finally:
            repo.free()

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
                    new_id = self._create_commit(
                        author=_signature(author), committer=committer, message=message, tree=tree_id,
                        parent=parent_commit.id,
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

    def _create_commit(
        self,
        *,
        author: pygit2.Signature,
        committer: pygit2.Signature,
        message: str,
        tree: pygit2.Oid,
        parent: pygit2.Oid,
    ) -> pygit2.Oid:
        """The commit object, signed over its exact bytes when a key is set; no ref moves here."""
        if self._signing_key is None:
            return self._repo.create_commit(None, author, committer, message, tree, [parent])
        content: object = self._repo.create_commit_string(author, committer, message, tree, [parent])
        if not isinstance(content, str):  # the stub says Oid; pygit2 1.21 returns the commit's text
            raise GitError(f"cannot sign: pygit2 built a {type(content).__name__}, not the commit's text")
        signature = ssh_sign(content.encode("utf-8"), key=self._signing_key)
        return self._repo.create_commit_with_signature(content, signature)

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
        _bound_network_waits()
        report = _PushReport(self._credentials)
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
        if self._url is not None:
            self._wake = asyncio.Event()
            observed = remote_heads(
                fetch=self._fetch_in_thread,
                head=self.head,
                on_stall=self._note_stall,
                label=self._url,
                poll_interval=poll_interval,
                deadline=self._fetch_deadline,
                wake=self._wake,
            )
        else:
            observed = local_heads(
                common=_common_dir(self._git_dir), ref=self._ref, head=self.head, poll_interval=poll_interval
            )
        last: str | None = None
        async with contextlib.aclosing(observed):
            async for head in observed:
                if head is not None and head != last:
                    last = head
                    yield head

    def wake(self) -> None:
        """Fetch now instead of at the next poll (a verified webhook announced a push); polling goes on as
        before. Call it on the event loop that runs ``watch``. A local repository is watched by inotify
        already: nothing to do."""
        if self._wake is not None:
            self._wake.set()

    def _fetch_in_thread(self) -> None:
        """A libgit2 repository object must not be shared across threads: fetch through a second one."""
        with self._lock:
            repo = pygit2.Repository(str(self._git_dir), RepositoryOpenFlag.NO_SEARCH)
            try:
                self._fetch_recorded(repo)
            finally:
                repo.free()

    def _fetch_recorded(self, repo: pygit2.Repository) -> None:
        """Fetch, and record the attempt in health() whatever the outcome."""
        assert self._url is not None
        started = time.time()
        with self._health_lock:
            self._fetch_started = started
        error: str | None = None
        try:
            _fetch(repo, self._url, self._credentials)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            raise
        finally:
            with self._health_lock:
                self._fetch_started = None
                self._health = self._health.after_attempt(started_at=started, finished_at=time.time(), error=error)

    def _note_stall(self, waited: float) -> None:
        """The watch gave up waiting on a fetch that is still running: report it before it ends."""
        with self._health_lock:
            started = self._fetch_started
            if started is None:
                return  # it ended meanwhile and recorded its own outcome
            self._health = self._health.after_attempt(
                started_at=started,
                finished_at=time.time(),
                error=f"fetching {self._url} has not finished after {waited:.0f}s: the remote is not answering",
            )


def _checkout(
    repo: pygit2.Repository, treeish: pygit2.Object | pygit2.Commit, strategy: CheckoutStrategy
) -> None:
    repo.checkout_tree(treeish, strategy=strategy)  # type: ignore[no-untyped-call]


def _bound_network_waits() -> None:
    """libgit2 waits forever on a server that accepts the connection and never answers; bound each wait.

    These are process-wide libgit2 options and apply to every transport that talks to a socket (http(s), ssh,
    git://): a connect or any single read/write silent for FETCH_IO_TIMEOUT_S fails the fetch or push.
    Only unset (zero) values are filled in, so a process that chose its own keeps them.
    """
    ms = int(FETCH_IO_TIMEOUT_S * 1000)
    settings = pygit2.settings
    if settings.server_connect_timeout == 0:
        settings.server_connect_timeout = ms
    if settings.server_timeout == 0:
        settings.server_timeout = ms


def _fetch(repo: pygit2.Repository, url: str, credentials: HttpCredentials | None = None) -> None:
    _bound_network_waits()
    try:
        repo.remotes["origin"].fetch(prune=FetchPrune.PRUNE, message=f"lockgate: fetch {url}",
                                     callbacks=_Auth(credentials))
    except (pygit2.GitError, OSError) as exc:
        raise GitError(f"fetching {url} failed: {exc}. check the URL, network and credentials") from None


def _fallback_branch(repo: pygit2.Repository) -> str | None:
    """main, master, or the only branch: what a repository means when its HEAD says nothing useful."""
    local = set(repo.branches.local)
    for name in ("main", "master"):
        if name in local:
            return name
    if len(local) == 1:
        return next(iter(local))
    return None


def _local_default_branch(repo: pygit2.Repository, location: str) -> str:
    """The branch HEAD names. In a bare repository HEAD is often stale (`git init --bare` names master or
    init.defaultBranch, whatever is pushed later), so an unborn or detached HEAD falls back to a real branch."""
    target = repo.lookup_reference("HEAD").target
    named = target.removeprefix("refs/heads/") if isinstance(target, str) and target.startswith("refs/heads/") else None
    if repo.is_bare and (named is None or repo.references.get(f"refs/heads/{named}") is None):
        fallback = _fallback_branch(repo)
        if fallback is not None:
            return fallback
    if named is None:
        raise GitError(f"HEAD of {location} is detached: say which branch to watch")
    return named


def _remote_default_branch(repo: pygit2.Repository, url: str, credentials: HttpCredentials | None = None) -> str:
    """The branch the remote's HEAD names (as `git clone` picks it); main or master if it does not say."""
    _bound_network_waits()
    try:
        # One more round trip: after a fetch libgit2 no longer has the advertised symrefs.
        heads = repo.remotes["origin"].list_heads(callbacks=_Auth(credentials))
    except pygit2.GitError:
        heads = []
    for head in heads:
        if head.name == "HEAD" and head.symref_target and head.symref_target.startswith("refs/heads/"):
            return head.symref_target.removeprefix("refs/heads/")
    fallback = _fallback_branch(repo)
    if fallback is None:
        raise GitError(f"cannot tell the default branch of {url}: say which branch to watch")
    return fallback


@contextlib.contextmanager
def reading(location: str, *, branch: str | None = None) -> Iterator[Pygit2Source]:
    """A source for one command (validate, plan): a local work tree or bare repository opened in place, or a
    URL (file://, https://, ssh) mirrored into a temporary directory that is removed on exit.

    Without ``branch``: the branch the repository's HEAD names (for a URL, the remote's HEAD).
    """
    if not _is_url(location):
        source = Pygit2Source.open(location, branch=branch)
        try:
            yield source
        finally:
            source.close()
        return
    with tempfile.TemporaryDirectory(prefix="lockgate-mirror-") as tmp:
        source = Pygit2Source.open(location, branch=branch, cache_dir=Path(tmp))
        try:
            yield source
        finally:
            source.close()  # before the directory goes: libgit2 may hold its packs open


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
