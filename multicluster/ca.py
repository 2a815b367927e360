"""The CA hierarchy: one long-lived root shared by every cluster, an intermediate per cluster, and
short-lived workload certificates signed by a cluster's intermediate.

On disk a cluster's CA is the set of Istio plug-in CA files (root-cert.pem, ca-cert.pem, ca-key.pem,
cert-chain.pem), so the same directory can later be handed to a Kubernetes cluster. Keys are written
0600 inside 0700 directories, created with those modes (never briefly readable by others), and every
directory gets a `.gitignore` of `*` so that not even `git add -A` can pick a key up. The root key
never leaves the root directory: `cluster` reads it there and writes only the intermediate's files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from policies.identity import IssuedCert

log = logging.getLogger(__name__)

ROOT_TTL = dt.timedelta(days=3650)
INTERMEDIATE_TTL = dt.timedelta(days=365)
WORKLOAD_TTL = dt.timedelta(hours=1)
BACKDATE = dt.timedelta(minutes=1)
"""not_before is set this far in the past, so a peer whose clock is slightly behind still accepts it."""

ROOT_CERT, ROOT_KEY = "root-cert.pem", "root-key.pem"
CA_CERT, CA_KEY, CERT_CHAIN = "ca-cert.pem", "ca-key.pem", "cert-chain.pem"
KEY_MODE, DIR_MODE, CERT_MODE = 0o600, 0o700, 0o644


class CAError(Exception):
    """A CA directory is missing, incomplete or inconsistent; the message says which file and why."""


@dataclass(frozen=True)
class CA:
    """A signing certificate and its key, with what lies above it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()
    """Certificates above `cert`, up to and including the root."""
    roots: tuple[x509.Certificate, ...] = ()
    """The trust bundle this CA's directory carries (root-cert.pem; two roots during a root rotation)."""

    @property
    def name(self) -> str:
        return subject(self.cert)


def subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate at every rotation, and what Envoy's default cipher suites expect.
    return ec.generate_private_key(ec.SECP256R1())


def _name(*, org_unit: str | None, common_name: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lockgate")]
    if org_unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, org_unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def new_root(*, now: dt.datetime, ttl: dt.timedelta = ROOT_TTL, common_name: str = "lockgate root CA") -> CA:
    key = _new_key()
    name = _name(org_unit=None, common_name=common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(cert=cert, key=key, chain=(cert,), roots=(cert,))


def new_intermediate(root: CA, *, cluster: str, now: dt.datetime, ttl: dt.timedelta = INTERMEDIATE_TTL) -> CA:
    """A cluster's CA: may sign workload certificates only (path length 0), never outlives the root."""
    key = _new_key()
    not_after = min(now + ttl, root.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(org_unit=f"cluster {cluster}", common_name=f"lockgate intermediate CA {cluster}"))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return CA(cert=cert, key=key, chain=(root.cert,), roots=root.roots)


def issue(ca: CA, *, spiffe_id: str, now: dt.datetime, ttl: dt.timedelta = WORKLOAD_TTL) -> IssuedCert:
    """A workload certificate: a fresh key, one URI SAN (the SPIFFE id), client and server use.
    The chain is the leaf and the intermediates above it, never the root (peers have that already)."""
    key = _new_key()
    not_after = min(now + ttl, ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(org_unit=None, common_name=spiffe_id.rsplit("/", 1)[-1]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    intermediates = [ca.cert, *(c for c in ca.chain if not _self_signed(c))]
    return IssuedCert(
        spiffe_id=spiffe_id,
        cert_chain_pem="".join(pem(c) for c in [cert, *intermediates]),
        private_key_pem=_key_pem(key).decode(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        serial=format(cert.serial_number, "x"),
        issuer_chain=tuple(subject(c) for c in [ca.cert, *ca.chain]),
    )


def trust_bundle(cas: Iterable[CA]) -> list[str]:
    """Every root the given CAs carry, once each, in a stable order (PEM)."""
    seen: dict[str, x509.Certificate] = {}
    for ca in cas:
        for root in ca.roots:
            seen.setdefault(fingerprint(root), root)
    return [pem(c) for c in seen.values()]


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- files ----------------------------------------------------------------------------------------------


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as 0700 with a `.gitignore` of `*`; tighten it if it exists."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    ignore = path / ".gitignore"
    if not ignore.exists():
        _write(ignore, b"# private keys: never commit anything here\n*\n", CERT_MODE)
    return path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic write of a file created with `mode` from the start (umask cannot widen it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path}: missing") from None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = path.stat().st_mode & 0o777 if path.exists() else KEY_MODE
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); tightened to %o", path, mode, KEY_MODE)
        os.chmod(path, KEY_MODE)
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except ValueError:
        raise CAError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise CAError(f"{path}: not PEM certificates") from None
    return certs


def _check_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, where: Path) -> None:
    if cert.public_key() != key.public_key():
        raise CAError(f"{where}: the key does not belong to the certificate")


def write_root(root: CA, out: Path) -> None:
    private_dir(out)
    _write(out / ROOT_KEY, _key_pem(root.key), KEY_MODE)
    _write(out / ROOT_CERT, "".join(pem(c) for c in root.roots).encode(), CERT_MODE)


def load_root(directory: Path) -> CA:
    """The root of `directory` (root-cert.pem may hold more roots: the first is the one with the key)."""
    roots = _read_certs(directory / ROOT_CERT)
    key = _read_key(directory / ROOT_KEY)
    signing = next((c for c in roots if c.public_key() == key.public_key()), None)
    if signing is None:
        raise CAError(f"{directory / ROOT_KEY}: the key belongs to none of the certificates in {ROOT_CERT}")
    return CA(cert=signing, key=key, chain=(signing,), roots=tuple(roots))


def write_cluster(ca: CA, out: Path) -> None:
    """The Istio plug-in CA files of one cluster (no root key among them)."""
    private_dir(out)
    _write(out / CA_KEY, _key_pem(ca.key), KEY_MODE)
    _write(out / CA_CERT, pem(ca.cert).encode(), CERT_MODE)
    _write(out / CERT_CHAIN, "".join(pem(c) for c in [ca.cert, *ca.chain]).encode(), CERT_MODE)
    _write(out / ROOT_CERT, "".join(pem(c) for c in ca.roots).encode(), CERT_MODE)


def load_cluster(directory: Path) -> CA:
    cert = _read_certs(directory / CA_CERT)[0]
    key = _read_key(directory / CA_KEY)
    _check_pair(cert, key, directory / CA_KEY)
    chain = _read_certs(directory / CERT_CHAIN)
    roots = _read_certs(directory / ROOT_CERT)
    above = tuple(c for c in chain if c != cert)
    issuer = above[0] if above else None
    if issuer is None or not _issued_by(cert, issuer):
        raise CAError(f"{directory / CERT_CHAIN}: must hold {CA_CERT} followed by the certificate that signed it")
    if not any(_issued_by(above[-1], r) for r in roots):
        raise CAError(f"{directory}: {CERT_CHAIN} does not lead to any root in {ROOT_CERT}")
    return CA(cert=cert, key=key, chain=above, roots=tuple(roots))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def init_root(out: Path, *, now: dt.datetime) -> CA:
    """`ca init`: a new root in `out`; refuses to replace an existing one (that would orphan every cluster)."""
    if (out / ROOT_KEY).exists():
        raise CAError(f"{out / ROOT_KEY}: a root already exists here; remove it first to start over")
    root = new_root(now=now)
    write_root(root, out)
    return root


def init_cluster(root_dir: Path, cluster: str, out: Path, *, now: dt.datetime) -> CA:
    """`ca cluster`: a new intermediate for `cluster`, signed with the root in `root_dir`."""
    if (out / CA_KEY).exists():
        raise CAError(f"{out / CA_KEY}: cluster {cluster!r} already has an intermediate here")
    ca = new_intermediate(load_root(root_dir), cluster=cluster, now=now)
    write_cluster(ca, out)
    return ca


def ensure_hierarchy(ca_dir: Path, clusters: Sequence[str], *, now: dt.datetime) -> dict[str, CA]:
    """Each cluster's CA from `ca_dir/<cluster>`, creating the root (`ca_dir/root`) and any missing
    intermediate on first use; an existing hierarchy is reused as it is."""
    private_dir(ca_dir)
    out: dict[str, CA] = {}
    root: CA | None = None
    for cluster in clusters:
        directory = ca_dir / cluster
        if not (directory / CA_KEY).exists():
            if root is None:
                root_dir = ca_dir / "root"
                if (root_dir / ROOT_KEY).exists():
                    root = load_root(root_dir)
                elif (root_dir / ROOT_CERT).exists() or any(ca_dir.glob(f"*/{CA_KEY}")):
                    raise CAError(f"{directory}: no intermediate for cluster {cluster!r}, and no root key in "
                                  f"{root_dir} to make one; run `lockgate ca cluster {cluster} --root ROOT_DIR "
                                  f"--out {directory}` where the root key is")
                else:
                    root = init_root(root_dir, now=now)
                    log.info("created a root CA in %s", root_dir)
            init_cluster(ca_dir / "root", cluster, directory, now=now)
            log.info("created the intermediate CA of cluster %s in %s", cluster, directory)
        out[cluster] = load_cluster(directory)
    return out
