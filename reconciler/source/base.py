"""What the rest of lockgate may assume about an intent repository, without pygit2.

The reconciler only reads (head, resolve, read_tree, commit_signature, log, watch, health); the rollout controller
and the CLI write (commit, add_note) so that every automated decision lands in ``git log``. Everything outside
``reconciler.source`` depends on these protocols, so tests can use a fake and the Git library stays at the edge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEFAULT_AUTHOR",
    "FETCH_DEADLINE_S",
    "FETCH_IO_TIMEOUT_S",
    "NOTES_REF",
    "CommitInfo",
    "CommitSignature",
    "GitError",
    "GitReader",
    "GitWriter",
    "SignatureReader",
    "SourceHealth",
    "StaleParent",
]

DEFAULT_AUTHOR: tuple[str, str] = ("lockgate", "lockgate@localhost")
NOTES_REF = "refs/notes/lockgate"

FETCH_IO_TIMEOUT_S = 30.0
"""Longest a remote may stay silent on connect or on any one read/write before its fetch fails."""
FETCH_DEADLINE_S = 120.0
"""Longest the watch waits for one whole fetch (a remote can trickle bytes under the I/O timeout forever)."""


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


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitSignature:
    """What a signature check needs from one commit, read by the source so the check never touches pygit2."""

    sha: str
    signature: bytes | None
    """The armored signature (the ``gpgsig`` header: SSH or OpenPGP); None for an unsigned commit."""
    payload: bytes
    """The exact bytes that were signed: the raw commit object without its ``gpgsig`` header."""
    committer_email: str
    """The principal an SSH signature must be allowed for, so a trusted key cannot commit as someone else."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceHealth:
    """Whether the source can still reach its repository: a remote that stops answering must show in status,
    since the reconciler otherwise keeps serving the last fetched revision without a word."""

    remote: bool
    reachable: bool | None = None
    """None until the first fetch attempt; a local repository is always reachable."""
    last_fetch_at: float | None = None
    """time.time() when the last successful fetch finished."""
    last_error: str | None = None
    """Why the last attempt failed; cleared by a successful fetch."""
    last_attempt_at: float | None = None
    """time.time() when the last attempt started (a stalled attempt keeps its start time)."""

    @classmethod
    def local(cls) -> SourceHealth:
        return cls(remote=False, reachable=True)

    def after_attempt(self, *, started_at: float, finished_at: float, error: str | None) -> SourceHealth:
        """The health once an attempt that started at ``started_at`` ended, with ``error`` if it failed."""
        if error is None:
            return dataclasses.replace(
                self, reachable=True, last_fetch_at=finished_at, last_error=None, last_attempt_at=started_at
            )
        return dataclasses.replace(self, reachable=False, last_error=error, last_attempt_at=started_at)

    def to_json(self) -> dict[str, object]:
        """The status file's ``source`` object (camelCase, like the rest of the status contract)."""
        return {
            "remote": self.remote,
            "reachable": self.reachable,
            "lastFetchAt": self.last_fetch_at,
            "lastError": self.last_error,
            "lastAttemptAt": self.last_attempt_at,
        }


class SignatureReader(Protocol):
    """The one read a signature check needs (``reconciler.source.signatures``)."""

    def commit_signature(self, rev: str) -> CommitSignature:
        """The commit's signature and signed bytes; GitError if ``rev`` is not a commit. Safe on a worker thread."""
        ...


class GitReader(SignatureReader, Protocol):
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
        """Fetch (remote) or re-read the ref (local); returns the current head. Blocking: not on the loop."""
        ...

    def watch(self, *, poll_interval: float = 5.0) -> AsyncGenerator[str, None]:
        """The head, then every new head; never the same sha twice in a row. Close it (aclose) when done."""
        ...

    def health(self) -> SourceHealth:
        """Reachability of the repository as of the last fetch attempt; cheap, never touches the network."""
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


def trailers(message: str) -> dict[str, str]:
    """The `Lockgate-*: value` trailers of a commit message: how lockgate's own commits say what they did."""
    out = {}
    for line in message.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.startswith("Lockgate-"):
            out[key] = value.strip()
    return out
