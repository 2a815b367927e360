"""The GitSource kind: where the Kubernetes operator reads intent from (Flux's GitRepository, for lockgate).

It lives in the operator's namespace (`lockgate-system`) next to the Secret it names, and is never part of a
repository of intent: it says where that repository is, so it is not in `reconciler.kinds.KINDS`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field

from mesh.intent import Model as IntentModel
from mesh.intent import PositiveDuration, ResourceBase

GITSOURCE_KIND = "GitSource"
GITSOURCE_NAMESPACE = "lockgate-system"
"""Where the operator looks for GitSources and their Secrets (the install manifests create it)."""

DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"
"""The forms `mesh.intent.parse_duration_ms` reads, for the CRD (the model checks the range too)."""
URL_PATTERN = r"^((https?|ssh|git|file)://[^\s]+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+)$"
"""https://, http://, ssh://, git://, file:// URLs, or scp-like `git@host:org/repo.git`."""
SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A Kubernetes object name (RFC 1123 subdomain), as Secret names are."""
BRANCH_PATTERN = r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$"
"""A branch name without spaces, leading or trailing `/`, or `//` (git check-ref-format's common subset)."""
_SEGMENT = r"(\.\.[^/]+|\.[^./][^/]*|\.|[^./][^/]*)"
PATH_PATTERN = rf"^{_SEGMENT}(/{_SEGMENT})*/?$"
"""Relative, no `..` segment: the same rule as `_check_path`, for the CRD (RE2 has no look-ahead)."""


class _Model(IntentModel):
    """The intent models' conventions, with field docstrings as schema descriptions (they end up in the CRD)."""

    model_config = ConfigDict(use_attribute_docstrings=True)


def _check_path(path: str) -> str:
    if path.startswith("/"):
        raise ValueError(f"path {path!r} must be relative to the repository root (no leading '/')")
    if ".." in path.split("/"):
        raise ValueError(f"path {path!r} must stay inside the repository (no '..')")
    if path == "" or "//" in path:
        raise ValueError(f"path {path!r} is not a folder of the repository (use '/' between names, '.' for the root)")
    return path


def _check_branch(branch: str) -> str:
    if ".." in branch or branch.endswith(".lock") or branch.startswith("-"):
        raise ValueError(f"branch {branch!r} is not a valid git branch name")
    return branch


class SecretRef(_Model):
    """A Secret in the GitSource's namespace. HTTPS: keys `username` and `password` (a token); SSH: `identity`
    (the private key) and `known_hosts`; either may add `signingKey` (a public key: commits must be signed)."""

    name: str = Field(min_length=1, max_length=253, pattern=SUBDOMAIN)
    """Name of the Secret."""


class GitSourceSpec(_Model):
    url: str = Field(min_length=1, max_length=2048, pattern=URL_PATTERN)
    """Repository of intent: an https://, ssh:// (or scp-like git@host:path), git:// or file:// URL."""
    branch: Annotated[str, Field(min_length=1, max_length=255, pattern=BRANCH_PATTERN),
                      AfterValidator(_check_branch)] | None = None
    """Branch to follow; absent: the remote's default branch (its HEAD)."""
    path: Annotated[str, AfterValidator(_check_path)] = Field(default=".", max_length=1024,
                                                              json_schema_extra={"pattern": PATH_PATTERN})
    """Folder of the repository holding the intent, relative to its root (`.`: the whole repository)."""
    interval: PositiveDuration = Field(default="30s", json_schema_extra={"pattern": DURATION_PATTERN})
    """How often the remote is polled (e.g. `30s`, `5m`); a webhook or watch may fetch sooner. Zero would
    poll in a busy loop, so this is a positive duration (1ms to 24h)."""
    secret_ref: SecretRef | None = None
    """Credentials for the remote (and the signing key); absent: an anonymous fetch."""
    suspend: bool = False
    """true: stop fetching; the last applied revision keeps serving."""
    write_back: Literal["commit", "off"] = "commit"
    """commit: rollout decisions (promote, roll back) are committed and pushed; off: never write to the remote."""


class GitSource(ResourceBase):
    """Where the operator in a cluster reads (and, for rollouts, writes) the intent repository."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    kind: Literal["GitSource"]
    spec: GitSourceSpec
