"""Where intent comes from: a Git repository, local or remote, read, watched and written back to.

``base`` says what the rest of lockgate may rely on (protocols, errors, health); ``git`` is the pygit2
implementation; ``watch`` notices new commits.
"""

from reconciler.source.base import (
    DEFAULT_AUTHOR,
    NOTES_REF,
    CommitInfo,
    GitError,
    GitReader,
    GitWriter,
    SourceHealth,
    StaleParent,
)
from reconciler.source.git import Pygit2Source, init_repo, reading

__all__ = [
    "DEFAULT_AUTHOR",
    "NOTES_REF",
    "CommitInfo",
    "GitError",
    "GitReader",
    "GitWriter",
    "Pygit2Source",
    "SourceHealth",
    "StaleParent",
    "init_repo",
    "reading",
]
