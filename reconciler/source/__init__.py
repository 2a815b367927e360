"""Where intent comes from: a Git repository, local or remote, read, watched and written back to.

``base`` says what the rest of lockgate may rely on (protocols, errors, health); ``git`` is the pygit2
implementation; ``watch`` notices new commits; ``signatures`` decides whether a commit's signer is trusted.
"""

from reconciler.source.base import (
    DEFAULT_AUTHOR,
    NOTES_REF,
    CommitInfo,
    CommitSignature,
    GitError,
    GitReader,
    GitWriter,
    SignatureReader,
    SourceHealth,
    StaleParent,
)
from reconciler.source.git import Pygit2Source, init_repo, reading
from reconciler.source.signatures import SignaturePolicy, SigningError

__all__ = [
    "DEFAULT_AUTHOR",
    "NOTES_REF",
    "CommitInfo",
    "CommitSignature",
    "GitError",
    "GitReader",
    "GitWriter",
    "Pygit2Source",
    "SignaturePolicy",
    "SignatureReader",
    "SigningError",
    "SourceHealth",
    "StaleParent",
    "init_repo",
    "reading",
]
