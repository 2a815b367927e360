"""Webhook signatures: GitHub's HMAC of the raw body, GitLab's token, the generic token, and what an attacker
tries (a replayed body under another signature, a header twice, an empty secret)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from reconciler.web.hooks import github_signature, load_secret, verify

SECRET = b"s3cret-for-tests"
BODY = b'{"ref": "refs/heads/main", "after": "0123456789abcdef"}'


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_github_signature_is_the_hmac_sha256_of_the_raw_body() -> None:
    assert github_signature(BODY, SECRET) == sign(BODY)
    v = verify({"X-Hub-Signature-256": sign(BODY)}.items(), BODY, SECRET)
    assert v.ok and v.provider == "github"


def test_a_replayed_body_with_another_bodys_signature_is_refused() -> None:
    other = BODY.replace(b"0123", b"ffff")
    v = verify({"X-Hub-Signature-256": sign(other)}.items(), BODY, SECRET)
    assert not v.ok and v.provider == "github"
    # the same body signed with another secret, and a signature cut short
    assert not verify({"X-Hub-Signature-256": sign(BODY, b"other")}.items(), BODY, SECRET).ok
    assert not verify({"X-Hub-Signature-256": sign(BODY)[:-2]}.items(), BODY, SECRET).ok
    assert not verify({"X-Hub-Signature-256": sign(BODY).removeprefix("sha256=")}.items(), BODY, SECRET).ok


def test_header_names_are_case_insensitive_and_a_header_given_twice_is_refused() -> None:
    assert verify([("x-hub-signature-256", sign(BODY))], BODY, SECRET).ok
    twice = [("X-Hub-Signature-256", sign(b"x")), ("x-hub-signature-256", sign(BODY))]
    v = verify(twice, BODY, SECRET)
    assert not v.ok and "2 times" in v.reason


def test_a_wrong_github_signature_is_not_rescued_by_a_right_token() -> None:
    headers = [("X-Hub-Signature-256", sign(b"x")), ("X-Gitlab-Token", SECRET.decode())]
    assert not verify(headers, BODY, SECRET).ok


@pytest.mark.parametrize(("header", "value", "provider"), [
    ("X-Gitlab-Token", SECRET.decode(), "gitlab"),
    ("X-Lockgate-Token", SECRET.decode(), "generic"),
    ("Authorization", f"Bearer {SECRET.decode()}", "generic"),
    ("authorization", f"bearer {SECRET.decode()}", "generic"),
])
def test_tokens(header: str, value: str, provider: str) -> None:
    v = verify([(header, value)], BODY, SECRET)
    assert v.ok and v.provider == provider
    wrong = value[:-1] + ("x" if value[-1] != "x" else "y")
    assert not verify([(header, wrong)], BODY, SECRET).ok


def test_nothing_or_another_auth_scheme_is_refused() -> None:
    assert not verify([], BODY, SECRET).ok
    assert not verify([("Authorization", f"Basic {SECRET.decode()}")], BODY, SECRET).ok
    assert not verify([("X-Gitlab-Token", "")], BODY, SECRET).ok


def test_the_secret_file_is_stripped_and_an_empty_one_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("abc\n")
    assert load_secret(tmp_path / "s") == b"abc"
    (tmp_path / "empty").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        load_secret(tmp_path / "empty")
