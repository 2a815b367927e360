"""Is this webhook really from the repository's host? GitHub, GitLab and generic push events.

Pure: the request's headers, its raw body and the shared secret in, a verdict out. GitHub signs the raw
body (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`), so a replayed body with another signature fails;
GitLab sends the secret itself (`X-Gitlab-Token`); anything else may send it as `X-Lockgate-Token` or
`Authorization: Bearer <secret>`. Every comparison is constant-time, and a header given twice is refused
(which of two copies a proxy would pass on is not ours to guess).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAX_BODY = 1 << 20
"""Bytes a webhook body may hold (GitHub caps its payloads at 25 MiB; a push event is a few KiB): 413 beyond."""

Provider = Literal["github", "gitlab", "generic"]
_AUTH_HEADERS = ("x-hub-signature-256", "x-gitlab-token", "x-lockgate-token", "authorization")


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    provider: Provider | None
    """Who signed it (None when nothing recognisable was sent)."""
    reason: str
    """Why it was refused (or what was verified): logged, never the secret."""


def load_secret(path: Path) -> bytes:
    """The shared secret from its file, without surrounding whitespace (a trailing newline from `echo`).
    ValueError if it is empty: an empty secret would verify anyone's signature."""
    secret = path.read_bytes().strip()
    if not secret:
        raise ValueError(f"{path} is empty: put the webhook secret in it (e.g. `openssl rand -hex 32 > {path}`)")
    return secret


def github_signature(body: bytes, secret: bytes) -> str:
    """What GitHub sends as `X-Hub-Signature-256` for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(headers: Iterable[tuple[str, str]], body: bytes, secret: bytes) -> Verdict:
    """Check the one credential the request carries, in the order GitHub, GitLab, generic; the first one
    present decides (a wrong GitHub signature is not rescued by a token beside it)."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        if name.lower() in _AUTH_HEADERS:
            found.setdefault(name.lower(), []).append(value)
    for name, values in found.items():
        if len(values) > 1:
            return Verdict(False, None, f"{name} given {len(values)} times")
    if (sig := _one(found, "x-hub-signature-256")) is not None:
        expected = github_signature(body, secret)
        if not sig.startswith("sha256="):
            return Verdict(False, "github", "X-Hub-Signature-256 is not sha256=<hex>")
        if hmac.compare_digest(sig.strip().lower().encode(), expected.encode()):
            return Verdict(True, "github", "HMAC-SHA256 of the body matches")
        return Verdict(False, "github", "X-Hub-Signature-256 does not match the body")
    if (token := _one(found, "x-gitlab-token")) is not None:
        return _token("gitlab", "X-Gitlab-Token", token, secret)
    if (token := _one(found, "x-lockgate-token")) is not None:
        return _token("generic", "X-Lockgate-Token", token, secret)
    if (auth := _one(found, "authorization")) is not None:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() != "bearer":
            return Verdict(False, "generic", "Authorization is not `Bearer <token>`")
        return _token("generic", "Authorization: Bearer", token.strip(), secret)
    return Verdict(False, None, "no signature or token (X-Hub-Signature-256, X-Gitlab-Token, X-Lockgate-Token, "
                                "Authorization: Bearer)")


def _one(found: dict[str, list[str]], name: str) -> str | None:
    values = found.get(name)
    return values[0] if values else None


def _token(provider: Provider, header: str, token: str, secret: bytes) -> Verdict:
    if hmac.compare_digest(token.encode("utf-8", "surrogateescape"), secret):
        return Verdict(True, provider, f"{header} matches")
    return Verdict(False, provider, f"{header} does not match")
