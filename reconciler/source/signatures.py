"""Whether a commit may be applied: its signature checked against the keys the operator trusts.

As Flux and Argo CD do, a head that is unsigned or signed by an unknown key is refused before anything is
applied. Trust is an SSH allowed-signers file (git's ``gpg.ssh.allowedSignersFile`` format) and/or a GPG keyring.
The checks run ``ssh-keygen -Y`` and ``gpg`` with a timeout: blocking, so a caller on the event loop uses
``asyncio.to_thread``. The commit's bytes come from the source (``SignatureReader``): pygit2 stays in ``git``.
The files are read on every check, so adding a key to them needs no restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reconciler.source.base import CommitSignature, GitError, SignatureReader

__all__ = [
    "BAD_SIGNATURE",
    "TOOL_TIMEOUT_S",
    "UNSIGNED",
    "SignaturePolicy",
    "SigningError",
    "ssh_fingerprint",
    "ssh_public_key",
    "ssh_sign",
]

UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad signature"
TOOL_TIMEOUT_S = 10.0
"""Longest one ssh-keygen or gpg run may take: a hung tool must not hold a revision (or a write-back) forever."""
NAMESPACE = "git"
"""The ssh-keygen signature namespace git uses for commits; a signature made for another purpose does not count."""

_SSH_ARMOR = "-----BEGIN SSH SIGNATURE-----"
_PGP_ARMOR = "-----BEGIN PGP SIGNATURE-----"
_PGP_KEY_BLOCK = re.compile(
    r"-----BEGIN PGP PUBLIC KEY BLOCK-----\n(.*?)-----END PGP PUBLIC KEY BLOCK-----", re.DOTALL
)
# No terminal: a passphrase prompt fails at once instead of waiting for a keyboard that is not there.
_NO_PROMPT = {"SSH_ASKPASS_REQUIRE": "never", "DISPLAY": "", "GPG_TTY": ""}


class SigningError(GitError):
    """lockgate could not sign its own commit with the key it was given; the message says how to fix the key."""


class _ToolFailed(Exception):
    """ssh-keygen or gpg could not be run to the end (missing, hung): the commit cannot be shown trusted."""


def _run(argv: list[str], *, stdin: bytes = b"", timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Exit code and stdout+stderr of one tool run, in its own session (never a terminal prompt)."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
            env={**os.environ, **_NO_PROMPT, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _ToolFailed(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise _ToolFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    text = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    return done.returncode, text


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GitError(f"{name} is not installed: install the Debian package {package} (scripts/apt-deps does)")
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# -- SSH -------------------------------------------------------------------------------------------------


def _ssh_blob(armored: str) -> bytes | None:
    body = "".join(line.strip() for line in armored.splitlines() if line.strip() and not line.startswith("-----"))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return None


def ssh_fingerprint(armored: str) -> str | None:
    """The SHA256 fingerprint (as ``ssh-keygen -l`` prints it) of the key that made an SSH signature.

    Read from the SSHSIG blob itself (magic, version, then the public key as an SSH string), so a refusal can
    name the key without another tool run. Only a name: whether the key is trusted is ssh-keygen's call.
    """
    blob = _ssh_blob(armored)
    if blob is None or not blob.startswith(b"SSHSIG") or len(blob) < 14:
        return None
    size = int.from_bytes(blob[10:14], "big")
    key = blob[14 : 14 + size]
    if len(key) != size or size == 0:
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


def ssh_sign(payload: bytes, *, key: Path, timeout: float = TOOL_TIMEOUT_S) -> str:
    """An SSH signature of ``payload`` in git's namespace, as git's ``gpg.format=ssh`` makes it.

    ``key`` is a private key without a passphrase, or a public key whose private half ssh-agent holds.
    """
    keygen = _tool("ssh-keygen", "openssh-client")
    with tempfile.TemporaryDirectory(prefix="lockgate-sign-") as tmp:
        # The payload in a file, as git does: stdin stays empty, so a passphrase prompt fails instead of
        # reading the commit as the passphrase.
        message = Path(tmp, "commit")
        message.write_bytes(payload)
        try:
            code, out = _run([keygen, "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(message)], timeout=timeout)
        except _ToolFailed as exc:
            raise SigningError(f"cannot sign with {key}: {exc}") from None
        signed = Path(tmp, "commit.sig")
        armored = signed.read_text(errors="replace").strip() if code == 0 and signed.is_file() else ""
    if not armored.startswith(_SSH_ARMOR):
        raise SigningError(
            f"cannot sign with {key} ({_last_line(out)}): give an SSH private key without a passphrase"
            " (mode 0600), or a public key whose private half is in ssh-agent"
        )
    return armored


def ssh_public_key(key: Path, *, timeout: float = TOOL_TIMEOUT_S) -> str | None:
    """``type base64`` of a signing key's public half (what an allowed-signers line needs); None if unreadable."""
    public = key if key.suffix == ".pub" else key.with_name(key.name + ".pub")
    text: str | None = None
    if public.is_file():
        text = public.read_text(errors="replace")
    else:
        try:
            code, out = _run([_tool("ssh-keygen", "openssh-client"), "-y", "-f", str(key)], timeout=timeout)
        except (_ToolFailed, GitError):
            return None
        text = out if code == 0 else None
    fields = (text or "").split()
    return f"{fields[0]} {fields[1]}" if len(fields) >= 2 else None


# -- GPG -------------------------------------------------------------------------------------------------


def _dearmor(data: bytes) -> bytes:
    """An exported keyring as gpg's ``--keyring`` reads it: ``gpg --export --armor`` output is decoded here."""
    text = data.decode("ascii", errors="replace").replace("\r\n", "\n")
    blocks = _PGP_KEY_BLOCK.findall(text)
    if not blocks:
        return data
    out = bytearray()
    for block in blocks:
        lines = [line.strip() for line in block.splitlines()]
        body = lines[lines.index("") + 1 :] if "" in lines else lines  # armor headers end at the first blank line
        lines = [line for line in body if line and not line.startswith("=")]  # "=XXXX": the CRC, not data
        try:
            out += base64.b64decode("".join(lines), validate=True)
        except (binascii.Error, ValueError):
            return data  # not ours to judge: gpg says what is wrong with it
    return bytes(out)


def _status(text: str) -> dict[str, list[str]]:
    """gpg's ``--status-fd`` lines by keyword: the machine-readable verdict, not the localised prose."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("[GNUPG:] "):
            keyword, *args = line[len("[GNUPG:] ") :].split()
            out.setdefault(keyword, args)
    return out


# -- the policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SignaturePolicy:
    """The keys whose commits lockgate applies: an SSH allowed-signers file, a GPG keyring, or both."""

    allowed_signers: Path | None = None
    """SSH keys, one ``principals [options] keytype base64`` line each; the principal is the committer email."""
    keyring: Path | None = None
    """GPG public keys (``gpg --export``, binary or armored); any key in it is trusted, as in Flux."""
    timeout: float = TOOL_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.allowed_signers is None and self.keyring is None:
            raise GitError("a signature policy needs an allowed-signers file, a GPG keyring, or both")
        if self.allowed_signers is not None:
            object.__setattr__(self, "allowed_signers", self._readable(self.allowed_signers, "allowed-signers file"))
            _tool("ssh-keygen", "openssh-client")
            if not _has_entries(self.allowed_signers):
                raise GitError(
                    f"allowed-signers file {self.allowed_signers} lists no key: add lines like"
                    " `dev@example.org ssh-ed25519 AAAA...` (and lockgate's own key, if it signs write-backs)"
                )
        if self.keyring is not None:
            object.__setattr__(self, "keyring", self._readable(self.keyring, "GPG keyring"))
            _tool("gpg", "gnupg")

    @staticmethod
    def _readable(path: Path, what: str) -> Path:
        resolved = path.expanduser().resolve()
        if not resolved.is_file() or not os.access(resolved, os.R_OK):
            raise GitError(f"{what} {path} is not a readable file")
        return resolved

    @property
    def files(self) -> str:
        """The trusted files, for messages."""
        return " and ".join(str(p) for p in (self.allowed_signers, self.keyring) if p is not None)

    def verify(self, source: SignatureReader, sha: str) -> str | None:
        """None if commit ``sha`` is signed by a trusted key, else why not. Blocking (subprocesses): not on the loop."""
        return self.verify_signature(source.commit_signature(sha))

    def verify_signature(self, signed: CommitSignature) -> str | None:
        """None if ``signed`` carries a good signature by a trusted key, else why not (fails closed)."""
        if not signed.signature:
            return UNSIGNED
        armored = signed.signature.decode("ascii", errors="replace").replace("\r\n", "\n").strip()
        try:
            if armored.startswith(_SSH_ARMOR):
                return self._verify_ssh(armored, signed)
            if armored.startswith(_PGP_ARMOR):
                return self._verify_gpg(armored, signed)
        except (_ToolFailed, GitError, OSError) as exc:  # a tool or a file gone since start-up: fail closed
            return f"cannot verify the signature: {exc}"
        kind = armored.splitlines()[0] if armored else "empty"
        return f"signed in a format lockgate cannot verify ({kind}): sign with an SSH or GPG key"

    def _verify_ssh(self, armored: str, signed: CommitSignature) -> str | None:
        fingerprint = ssh_fingerprint(armored)
        if fingerprint is None:
            return BAD_SIGNATURE
        if self.allowed_signers is None:
            return (f"signed by a key not in {self.files}: {fingerprint}"
                    " (an SSH key: trust SSH keys with an allowed-signers file)")
        allowed = str(self.allowed_signers)
        if not self.allowed_signers.is_file():
            raise _ToolFailed(f"the allowed-signers file {allowed} is gone")
        keygen = _tool("ssh-keygen", "openssh-client")
        with tempfile.TemporaryDirectory(prefix="lockgate-verify-") as tmp:
            sig = Path(tmp, "commit.sig")
            sig.write_text(armored + "\n")
            code, _ = _run(
                [keygen, "-Y", "verify", "-f", allowed, "-I", signed.committer_email, "-n", NAMESPACE, "-s", str(sig)],
                stdin=signed.payload,
                timeout=self.timeout,
            )
            if code == 0:
                return None
            # Why not: a signature that does not match its bytes, or a good one by a key the file does not allow.
            code, _ = _run([keygen, "-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig)],
                           stdin=signed.payload, timeout=self.timeout)
            if code != 0:
                return BAD_SIGNATURE
            code, out = _run([keygen, "-Y", "find-principals", "-f", allowed, "-s", str(sig)], timeout=self.timeout)
        principals = [line.strip() for line in out.splitlines() if line.strip()] if code == 0 else []
        if principals:
            return (
                f"signed by a key not in {allowed} for committer {signed.committer_email}: {fingerprint}"
                f" (the file allows that key for {', '.join(principals)})"
            )
        return f"signed by a key not in {allowed}: {fingerprint}"

    def _verify_gpg(self, armored: str, signed: CommitSignature) -> str | None:
        if self.keyring is None:
            return f"signed by a key not in {self.files}: a GPG key (trust GPG keys with a keyring)"
        gpg = _tool("gpg", "gnupg")
        keyring = str(self.keyring)
        with tempfile.TemporaryDirectory(prefix="lockgate-gnupg-") as home:
            # A throwaway GNUPGHOME: the user's keys, trust database and agent play no part in the verdict.
            ring = Path(home, "trusted.gpg")
            ring.write_bytes(_dearmor(self.keyring.read_bytes()))
            sig = Path(home, "commit.sig")
            sig.write_text(armored + "\n")
            code, out = _run(
                [gpg, "--homedir", home, "--batch", "--no-tty", "--no-default-keyring", "--keyring", str(ring),
                 "--trust-model", "always", "--no-auto-key-retrieve", "--status-fd", "1", "--verify", str(sig), "-"],
                stdin=signed.payload,
                timeout=self.timeout,
                env={"GNUPGHOME": home},
            )
        status = _status(out)
        fingerprint = _gpg_fingerprint(status)
        if "BADSIG" in status:
            return BAD_SIGNATURE
        if "ERRSIG" in status:
            if "NO_PUBKEY" in status:
                return f"signed by a key not in {keyring}: {fingerprint}"
            return f"{BAD_SIGNATURE} (gpg could not check it: {_last_line(out)})"
        if "EXPKEYSIG" in status or "REVKEYSIG" in status:
            state = "an expired" if "EXPKEYSIG" in status else "a revoked"
            return f"signed by {state} key in {keyring}: {fingerprint}"
        if "EXPSIG" in status:
            return f"the signature by {fingerprint} has expired"
        if code == 0 and "GOODSIG" in status and "VALIDSIG" in status:
            return None
        return f"{BAD_SIGNATURE} ({_last_line(out)})"

    def check_signer(self, *, key: Path, principal: str) -> str | None:
        """None if commits that ``key`` signs as ``principal`` would be trusted, else why and the line to add.

        lockgate's write-back commits are heads like any other: a key missing from the file would have every
        promotion refused. Checking once at start-up says so before a rollout finds out.
        """
        probe = b"lockgate: will commits signed with this key be trusted?\n"
        try:
            signature = ssh_sign(probe, key=key, timeout=self.timeout)
        except GitError as exc:
            return str(exc)
        why = self.verify_signature(
            CommitSignature(sha="0" * 40, signature=signature.encode(), payload=probe, committer_email=principal)
        )
        if why is None:
            return None
        public = ssh_public_key(key, timeout=self.timeout) or "<the key's public half>"
        where = self.allowed_signers or "an allowed-signers file (--verify-signatures)"
        return (f"lockgate's own commits, signed with {key}, would be refused ({why}):"
                f" add the line `{principal} {public}` to {where}")


def _gpg_fingerprint(status: dict[str, list[str]]) -> str:
    """The primary key of a good signature; the signing key (or its long id) of one gpg could not check."""
    if valid := status.get("VALIDSIG"):
        return valid[-1]
    if (error := status.get("ERRSIG")) and len(error) >= 7:
        return error[6]
    return error[0] if error else "an unknown key"


def _has_entries(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())
