"""One folder of a repository as the whole intent (Flux's `spec.path`): a wrapper over any source.

Reads see only the files under the folder, with paths relative to it, so `file:line` errors and the
loader's limits are about the intent alone; write-back commits land under the folder again. Heads are
the repository's: a commit outside the folder is a new head whose intent did not change (the loop
applies it as the same configuration, which changes nothing served).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from reconciler.source.base import DEFAULT_AUTHOR, NOTES_REF, CommitInfo, CommitSignature, SourceHealth


def normalise(path: str) -> str:
    """`./a/b/` -> `a/b`; `.` or empty -> `` (the root). ValueError for an absolute path or `..`."""
    parts = [p for p in PurePosixPath(path).parts if p not in (".", "")]
    if path.startswith("/") or ".." in parts:
        raise ValueError(f"path {path!r} must be a folder inside the repository")
    return "/".join(parts)


@dataclass
class SubdirSource:
    inner: Any
    """A GitSource (reader and writer of one repository)."""
    path: str
    """The folder, normalised (`normalise`); `` is the whole repository."""

    @property
    def branch(self) -> str:
        return str(self.inner.branch)

    def _under(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def read_tree(self, rev: str) -> dict[str, bytes]:
        files: dict[str, bytes] = self.inner.read_tree(rev)
        if not self.path:
            return files
        prefix = self.path + "/"
        return {name[len(prefix):]: data for name, data in files.items() if name.startswith(prefix)}

    def commit(self, *, files: Mapping[str, bytes | None], message: str, parent: str,
               author: tuple[str, str] = DEFAULT_AUTHOR) -> str:
        sha: str = self.inner.commit(files={self._under(k): v for k, v in files.items()}, message=message,
                                     parent=parent, author=author)
        return sha

    def head(self) -> str | None:
        head: str | None = self.inner.head()
        return head

    def resolve(self, rev: str) -> str:
        return str(self.inner.resolve(rev))

    def log(self, rev: str, *, limit: int) -> list[CommitInfo]:
        found: list[CommitInfo] = self.inner.log(rev, limit=limit)
        return found

    def refresh(self) -> str | None:
        head: str | None = self.inner.refresh()
        return head

    def watch(self, *, poll_interval: float = 5.0) -> AsyncGenerator[str, None]:
        heads: AsyncGenerator[str, None] = self.inner.watch(poll_interval=poll_interval)
        return heads

    def health(self) -> SourceHealth:
        health: SourceHealth = self.inner.health()
        return health

    def commit_signature(self, rev: str) -> CommitSignature:
        signature: CommitSignature = self.inner.commit_signature(rev)
        return signature

    def add_note(self, rev: str, *, message: str, ref: str = NOTES_REF) -> None:
        self.inner.add_note(rev, message=message, ref=ref)
