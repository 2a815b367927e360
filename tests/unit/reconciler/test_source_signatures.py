"""Signed commits against real keys, real git and real ssh-keygen / gpg (no mocks of either).

Commits are signed by git itself (`git commit -S`, proving interop with what users run) and by lockgate's own
write-back (`Pygit2Source(signing_key=...)`, which `git verify-commit` must accept in turn).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pygit2
import pytest

import reconciler.source
from reconciler.source import DEFAULT_AUTHOR, CommitSignature, GitError, Pygit2Source
from reconciler.source.signatures import BAD_SIGNATURE, UNSIGNED, SignaturePolicy, SigningError, ssh_fingerprint
from tests.fixtures.git import git as fixture_git
from tests.fixtures.git import git_env as fixture_git_env
from tests.fixtures.git import new_repo

DEV = ("dev", "dev@example.org")
LOCKGATE_EMAIL = DEFAULT_AUTHOR[1]


def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout.strip()


def git_env(who: tuple[str, str] = DEV) -> dict[str, str]:
    return fixture_git_env(who)


def git(repo: Path, *args: str, who: tuple[str, str] = DEV, env: dict[str, str] | None = None) -> str:
    return fixture_git(repo, *args, who=who, env=env)


@dataclass(frozen=True)
class Keys:
    dev: Path
    lockgate: Path
    stranger: Path

    @staticmethod
    def public(key: Path) -> str:
        return " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])

    @staticmethod
    def fingerprint(key: Path) -> str:
        """What `ssh-keygen -l` says: an independent check of the fingerprint lockgate reads from a signature."""
        return run("ssh-keygen", "-l", "-f", f"{key}.pub").split()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    for name in ("dev", "lockgate", "stranger"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name))
    return Keys(dev=root / "dev", lockgate=root / "lockgate", stranger=root / "stranger")


@pytest.fixture
def allowed(tmp_path: Path, keys: Keys) -> Path:
    path = tmp_path / "allowed_signers"
    path.write_text(f"# who may change the mesh\n{DEV[1]} {keys.public(keys.dev)}\n"
                    f"{LOCKGATE_EMAIL} {keys.public(keys.lockgate)}\n")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return new_repo(tmp_path / "repo", {"mesh.yaml": "kind: Mesh\n"}, "first (unsigned)", who=DEV)


def ssh_commit(repo: Path, key: Path, message: str, *, who: tuple[str, str] = DEV) -> str:
    """A commit signed by git itself, the way a user configures it."""
    git(repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q", "-S", "--allow-empty",
        "-m", message, who=who)
    return git(repo, "rev-parse", "HEAD")


def test_a_commit_git_signed_with_an_allowed_key_is_trusted(repo: Path, keys: Keys, allowed: Path) -> None:
    sha = ssh_commit(repo, keys.dev, "signed by dev")
    assert SignaturePolicy(allowed_signers=allowed).verify(Pygit2Source.open(str(repo)), sha) is None


def test_an_unsigned_commit_is_refused_as_unsigned(repo: Path, allowed: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    assert SignaturePolicy(allowed_signers=allowed).verify(Pygit2Source.open(str(repo)), sha) == UNSIGNED


def test_a_key_not_in_the_file_is_named_by_its_fingerprint(repo: Path, keys: Keys, allowed: Path) -> None:
    sha = ssh_commit(repo, keys.stranger, "signed by a stranger")
    why = SignaturePolicy(allowed_signers=allowed).verify(Pygit2Source.open(str(repo)), sha)
    assert why == f"signed by a key not in {allowed.resolve()}: {keys.fingerprint(keys.stranger)}"


def test_an_allowed_key_committing_as_someone_else_is_refused(repo: Path, keys: Keys, allowed: Path) -> None:
    """The principal is the committer email: dev's key cannot vouch for a commit claiming to be lockgate's."""
    sha = ssh_commit(repo, keys.dev, "dev's key, lockgate's name", who=DEFAULT_AUTHOR)
    why = SignaturePolicy(allowed_signers=allowed).verify(Pygit2Source.open(str(repo)), sha)
    assert why is not None
    assert why.startswith(f"signed by a key not in {allowed.resolve()} for committer {LOCKGATE_EMAIL}: ")
    assert keys.fingerprint(keys.dev) in why and f"allows that key for {DEV[1]}" in why


def test_a_signature_over_other_bytes_is_a_bad_signature(repo: Path, keys: Keys, allowed: Path) -> None:
    source = Pygit2Source.open(str(repo))
    signed = source.commit_signature(ssh_commit(repo, keys.dev, "deploy reviews v2"))
    assert signed.signature is not None and b"deploy reviews v2" in signed.payload
    # The same signature on a commit whose message was changed afterwards: a real object in the repository.
    tampered = signed.payload.replace(b"deploy reviews v2", b"deploy reviews v3")
    sha = str(pygit2.Repository(str(repo)).create_commit_with_signature(tampered.decode(), signed.signature.decode()))
    policy = SignaturePolicy(allowed_signers=allowed)
    assert policy.verify(source, sha) == BAD_SIGNATURE
    assert policy.verify_signature(CommitSignature(sha=sha, signature=signed.signature, payload=tampered,
                                                   committer_email=DEV[1])) == BAD_SIGNATURE


def test_lockgates_signed_write_back_is_trusted_and_git_agrees(repo: Path, keys: Keys, allowed: Path) -> None:
    source = Pygit2Source.open(str(repo), signing_key=keys.lockgate)
    sha = source.commit(files={"rollout.yaml": b"kind: Rollout\n"}, message="rollout shop/reviews: promote v2\n",
                        parent=source.head() or "")
    assert source.head() == sha and source.read_tree(sha)["rollout.yaml"] == b"kind: Rollout\n"
    assert SignaturePolicy(allowed_signers=allowed).verify(source, sha) is None
    said = subprocess.run(["git", "-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit", sha], cwd=repo,
                          env={**os.environ, **git_env()}, capture_output=True, text=True, timeout=30, check=False)
    assert said.returncode == 0 and f'Good "git" signature for {LOCKGATE_EMAIL}' in said.stderr, said.stderr
    assert git(repo, "status", "--porcelain") == ""  # the working tree came along, as for unsigned commits


def test_without_a_signing_key_write_backs_stay_unsigned(repo: Path, allowed: Path) -> None:
    source = Pygit2Source.open(str(repo))
    sha = source.commit(files={"a.yaml": b"a\n"}, message="unsigned write-back", parent=source.head() or "")
    assert SignaturePolicy(allowed_signers=allowed).verify(source, sha) == UNSIGNED


def test_check_signer_names_the_line_to_add_and_that_line_is_enough(tmp_path: Path, keys: Keys) -> None:
    only_dev = tmp_path / "only_dev"
    only_dev.write_text(f"{DEV[1]} {keys.public(keys.dev)}\n")
    policy = SignaturePolicy(allowed_signers=only_dev)
    why = policy.check_signer(key=keys.lockgate, principal=LOCKGATE_EMAIL)
    line = f"{LOCKGATE_EMAIL} {keys.public(keys.lockgate)}"
    assert why is not None and keys.fingerprint(keys.lockgate) in why and f"`{line}`" in why
    with only_dev.open("a") as f:
        f.write(line + "\n")  # the file is read on every check: no restart needed
    assert policy.check_signer(key=keys.lockgate, principal=LOCKGATE_EMAIL) is None


def test_a_key_that_cannot_sign_fails_the_commit_and_moves_nothing(repo: Path, tmp_path: Path, allowed: Path) -> None:
    locked = tmp_path / "locked"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked))
    source = Pygit2Source.open(str(repo), signing_key=locked)
    before = source.head()
    with pytest.raises(SigningError, match="without a passphrase"):
        source.commit(files={"a.yaml": b"a\n"}, message="never lands", parent=before or "")
    assert source.head() == before and not (repo / "a.yaml").exists()
    with pytest.raises(GitError, match="not a file"):
        Pygit2Source.open(str(repo), signing_key=tmp_path / "missing")


def test_a_hung_ssh_keygen_is_not_trusted(repo: Path, keys: Keys, allowed: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sha = ssh_commit(repo, keys.dev, "signed by dev")
    policy = SignaturePolicy(allowed_signers=allowed, timeout=0.3)
    fake = tmp_path / "bin" / "ssh-keygen"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    why = policy.verify(Pygit2Source.open(str(repo)), sha)
    assert why == "cannot verify the signature: ssh-keygen did not finish within 0.3s"


def test_a_file_or_tool_gone_since_start_up_trusts_nothing(repo: Path, keys: Keys, allowed: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sha = ssh_commit(repo, keys.dev, "signed by dev")
    source, policy = Pygit2Source.open(str(repo)), SignaturePolicy(allowed_signers=allowed)
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh-keygen anywhere
    assert policy.verify(source, sha) == (
        "cannot verify the signature: ssh-keygen is not installed: install the Debian package openssh-client"
        " (scripts/apt-deps does)")
    monkeypatch.undo()
    allowed.unlink()
    assert policy.verify(source, sha) == f"cannot verify the signature: the allowed-signers file {allowed} is gone"


def test_a_policy_needs_a_real_file_with_keys(tmp_path: Path) -> None:
    with pytest.raises(GitError, match="needs an allowed-signers file"):
        SignaturePolicy()
    with pytest.raises(GitError, match="not a readable file"):
        SignaturePolicy(allowed_signers=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(GitError, match="lists no key"):
        SignaturePolicy(allowed_signers=empty)


def test_the_fingerprint_is_read_from_the_signature_itself(repo: Path, keys: Keys) -> None:
    signed = Pygit2Source.open(str(repo)).commit_signature(ssh_commit(repo, keys.stranger, "x"))
    assert signed.signature is not None
    assert ssh_fingerprint(signed.signature.decode()) == keys.fingerprint(keys.stranger)
    assert ssh_fingerprint("-----BEGIN SSH SIGNATURE-----\nbm90IGEgc2lnbmF0dXJl\n-----END SSH SIGNATURE-----") is None


def test_the_package_exports_the_signature_api() -> None:
    for name in ("SignaturePolicy", "SigningError", "CommitSignature", "SignatureReader"):
        assert name in reconciler.source.__all__ and hasattr(reconciler.source, name)


# -- GPG ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpg:
    home: Path
    fingerprint: str

    def env(self) -> dict[str, str]:
        return {"GNUPGHOME": str(self.home)}

    def export(self, path: Path, *, armor: bool) -> Path:
        run("gpg", "--batch", "--output", str(path), *(["--armor"] if armor else []), "--export", self.fingerprint,
            env=self.env())
        return path


def _gpg_key(home: Path, uid: str) -> Gpg:
    run("gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never",
        env={"GNUPGHOME": str(home)})
    listing = run("gpg", "--batch", "--with-colons", "--list-keys", uid, env={"GNUPGHOME": str(home)})
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    return Gpg(home=home, fingerprint=fpr)


@pytest.fixture(scope="module")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gpg, Gpg]]:
    """Two keys in one GNUPGHOME (key generation starts a gpg-agent: one for the module, stopped after)."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed (Debian package gnupg): GPG verification is not available")
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    try:
        yield _gpg_key(home, "dev <dev@example.org>"), _gpg_key(home, "other <other@example.org>")
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30,
                       check=False)


def gpg_commit(repo: Path, key: Gpg, message: str) -> str:
    git(repo, "-c", "gpg.format=openpgp", "-c", f"user.signingkey={key.fingerprint}", "commit", "-q", "-S",
        "--allow-empty", "-m", message, env=key.env())
    return git(repo, "rev-parse", "HEAD")


def test_gpg_signed_commits_are_checked_against_the_keyring(repo: Path, tmp_path: Path, allowed: Path,
                                                            gpg_keys: tuple[Gpg, Gpg]) -> None:
    dev, other = gpg_keys
    sha = gpg_commit(repo, dev, "signed with gpg")
    source = Pygit2Source.open(str(repo))
    for armor in (False, True):  # `gpg --export` and `gpg --export --armor` both work as the keyring
        keyring = dev.export(tmp_path / f"dev-{armor}.gpg", armor=armor)
        assert SignaturePolicy(keyring=keyring).verify(source, sha) is None
        assert SignaturePolicy(allowed_signers=allowed, keyring=keyring).verify(source, sha) is None
    wrong = other.export(tmp_path / "other.gpg", armor=False)
    assert SignaturePolicy(keyring=wrong).verify(source, sha) == f"signed by a key not in {wrong}: {dev.fingerprint}"
    why = SignaturePolicy(allowed_signers=allowed).verify(source, sha)
    assert why is not None and why.startswith(f"signed by a key not in {allowed.resolve()}: a GPG key")
    signed = source.commit_signature(sha)
    tampered = CommitSignature(sha=sha, signature=signed.signature, committer_email=DEV[1],
                               payload=signed.payload.replace(b"signed with gpg", b"signed with gpq"))
    assert SignaturePolicy(keyring=dev.export(tmp_path / "dev.gpg", armor=False)).verify_signature(
        tampered) == BAD_SIGNATURE
    assert SignaturePolicy(keyring=wrong).verify(source, git(repo, "rev-parse", "HEAD~1")) == UNSIGNED
