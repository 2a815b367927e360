"""The CA hierarchy: one long-lived root shared by every cluster, an intermediate per cluster, and
short-lived workload certificates signed by a cluster's intermediate.

On disk a cluster's CA is the set of Istio plug-in CA files (root-cert.pem, ca-cert.pem, ca-key.pem,
cert-chain.pem), so the same directory can later be handed to a Kubernetes cluster. Keys are written
0600 inside 0700 directories, created with those modes (never briefly readable by others), and every
directory gets a `.gitignore` of `*` so that not even `git add -A` can pick a key up. The root key
never leaves the root directory: `cluster` reads it there and writes only the intermediate's files.

Running a mesh needs only each cluster's directory (its root-cert.pem carries the root certificates):
the root key belongs on an offline machine. Rotations are file operations on a CA directory, ordered so
that a reader never takes a half-written directory for a consistent one (`load_cluster` refuses every
mix of old and new files), and a running `lockgate up` picks them up (`CADirectoryWatch`).
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


def _key_id(key: ec.EllipticCurvePrivateKey) -> str:
    """A short, stable name for a key (its subject key identifier), so every generation of a CA has its own
    subject: a root and its successor are told apart in status, and path building never meets two CAs of
    one name in a bundle."""
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]


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


def new_root(*, now: dt.datetime, ttl: dt.timedelta = ROOT_TTL, common_name: str | None = None) -> CA:
    key = _new_key()
    name = _name(org_unit=None, common_name=common_name or f"lockgate root CA {_key_id(key)}")
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
        .subject_name(_name(org_unit=f"cluster {cluster}",
                            common_name=f"lockgate intermediate CA {cluster} {_key_id(key)}"))
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
    """Create `path` (and missing parents) as 0700 with a `.gitignore` of `*`; tighten it if it exists.
    A directory we may not change (a Kubernetes Secret mounted read-only) is used as it is: its mount
    decides who reads it."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        os.chmod(path, DIR_MODE)
        ignore = path / ".gitignore"
        if not ignore.exists():
            _write(ignore, b"# private keys: never commit anything here\n*\n", CERT_MODE)
    except OSError as exc:
        log.debug("%s: left as it is (%s)", path, exc.strerror)
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
        try:
            os.chmod(path, KEY_MODE)
            log.warning("%s was readable by others (mode %o); tightened to %o", path, mode, KEY_MODE)
        except OSError as exc:  # a read-only mount (a Secret volume, group-readable for fsGroup) decides
            log.info("%s has mode %o and cannot be tightened here (%s)", path, mode, exc.strerror)
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


def ensure_hierarchy(ca_dir: Path, clusters: Sequence[str], *, now: dt.datetime,
                     create_root: bool = True) -> dict[str, CA]:
    """Each cluster's CA from `ca_dir/<cluster>`; an existing hierarchy is reused as it is.

    Only the cluster directories are needed (the root key can stay offline). A missing intermediate is
    made with the root key in `ca_dir/root` if it is there; else, if `create_root` and `ca_dir` holds no CA
    at all, a root is created there first: the dev default of `lockgate up` without --ca-dir, which keeps
    the root key online and says where it is and how to take it offline. Otherwise the missing cluster is
    refused with the command that makes its intermediate where the root key is."""
    private_dir(ca_dir)
    out: dict[str, CA] = {}
    root: CA | None = None
    root_dir = ca_dir / "root"
    for cluster in clusters:
        directory = ca_dir / cluster
        if not (directory / CA_KEY).exists():
            if root is None:
                if (root_dir / ROOT_KEY).exists():
                    root = load_root(root_dir)
                    # Expected in the dev default; with a --ca-dir the operator should hear the key is online.
                    log.log(logging.INFO if create_root else logging.WARNING, "the root CA key is online in %s; "
                            "making the missing intermediate of cluster %s with it. %s", root_dir / ROOT_KEY, cluster,
                            offline_advice(ca_dir))
                elif create_root and not (root_dir / ROOT_CERT).exists() and not clusters_in(ca_dir):
                    root = init_root(root_dir, now=now)
                    log.warning("created a root CA in %s for this local mesh (the dev default; give --ca-dir for a "
                                "hierarchy made with `lockgate ca`). Its key %s is online. %s", root_dir,
                                root_dir / ROOT_KEY, offline_advice(ca_dir))
                else:
                    raise CAError(missing_intermediate(ca_dir, cluster))
            write_cluster(new_intermediate(root, cluster=cluster, now=now), directory)
            log.info("created the intermediate CA of cluster %s in %s", cluster, directory)
        out[cluster] = load_cluster(directory)
    return out


def missing_intermediate(ca_dir: Path, cluster: str) -> str:
    """Why cluster `cluster` cannot run from `ca_dir`, and the command that fixes it (run where the root key is)."""
    directory = ca_dir / cluster
    if (ca_dir / "root" / ROOT_CERT).exists() or clusters_in(ca_dir):
        how = "On the offline machine holding the root key run "
    else:
        how = f"{ca_dir} holds no CA yet. On an offline machine run `lockgate ca init --out ROOTDIR`, then "
    return (f"{directory}: no intermediate CA for cluster {cluster!r}, and no root key in {ca_dir / 'root'} to make "
            f"one (the root key belongs offline). {how}`lockgate ca cluster {cluster} --root ROOTDIR --out "
            f"{directory}` and copy that directory here")


def offline_advice(ca_dir: Path) -> str:
    """How to take a root key that lives in `ca_dir/root` offline (the mesh needs only the cluster directories)."""
    root_dir = ca_dir / "root"
    return (f"To take it offline: move {root_dir} to an offline machine (`lockgate up` needs only {ca_dir}/<cluster>); "
            f"there, `lockgate ca cluster NAME --root ROOTDIR --out DIR/NAME` makes a new cluster's intermediate, "
            f"`lockgate ca rotate-cluster NAME --root ROOTDIR --ca-dir {ca_dir}` rotates one, and `lockgate ca "
            "rotate-root` / `finish-root-rotation` replace the root")


def clusters_in(ca_dir: Path) -> list[str]:
    """Names of the clusters `ca_dir` has an intermediate for (sub-directories holding a ca-key.pem)."""
    if not ca_dir.is_dir():
        return []
    return sorted(d.name for d in ca_dir.iterdir() if d.name != "root" and (d / CA_KEY).exists())


def anchor_of(ca: CA) -> x509.Certificate:
    """The root of `ca.roots` that `ca`'s chain leads to: the one a peer must trust before `ca` signs for it."""
    top = ca.chain[-1] if ca.chain else ca.cert
    found = next((r for r in ca.roots if _issued_by(top, r)), None)
    if found is None:
        raise CAError(f"{ca.name}: its chain leads to none of the roots it carries")
    return found


# --- rotations ---------------------------------------------------------------------------------------------
#
# Each writes a cluster directory's files in `write_cluster`'s order (key, certificate, chain, bundle): every
# mix of old and new files fails `load_cluster`'s checks (the key matches no certificate, the chain does not
# start with the certificate, or leads to no root of the bundle), so a reader sees the old CA or the new one.


def _with_roots(ca: CA, roots: Sequence[x509.Certificate]) -> CA:
    return CA(cert=ca.cert, key=ca.key, chain=ca.chain, roots=tuple(roots))


def _union(roots: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: dict[str, x509.Certificate] = {}
    for r in roots:
        seen.setdefault(fingerprint(r), r)
    return list(seen.values())


def _load_all(ca_dir: Path) -> dict[str, CA]:
    clusters = clusters_in(ca_dir)
    if not clusters:
        raise CAError(f"{ca_dir}: no cluster intermediates here (expected {ca_dir}/<cluster>/{CA_KEY})")
    return {c: load_cluster(ca_dir / c) for c in clusters}


def rotate_cluster(ca_dir: Path, cluster: str, *, now: dt.datetime, root: CA | None = None,
                   replacement: CA | None = None) -> CA:
    """`ca rotate-cluster`: a new intermediate for `cluster` (made with `root`, or one made elsewhere) installed
    in `ca_dir/<cluster>`, under a root its bundle already trusts: certificates of the old one stay valid."""
    directory = ca_dir / cluster
    if not (directory / CA_KEY).exists():
        raise CAError(f"{directory}: no intermediate for cluster {cluster!r} to rotate; a new cluster gets one with "
                      f"`lockgate ca cluster {cluster} --root ROOTDIR --out {directory}`")
    current = load_cluster(directory)
    if root is not None and replacement is None:
        new = new_intermediate(root, cluster=cluster, now=now)
    elif replacement is not None and root is None:
        new = replacement
    else:
        raise ValueError("give exactly one of root (to sign a new intermediate) or replacement")
    trusted = {fingerprint(r) for r in current.roots}
    if fingerprint(_anchor_in(new, [*new.roots, *current.roots])) not in trusted:
        raise CAError(f"the new intermediate of {cluster!r} chains to a root {directory / ROOT_CERT} does not hold; "
                      "changing roots is `lockgate ca rotate-root`")
    if new.cert == current.cert:
        raise CAError(f"{directory}: that intermediate is installed already")
    installed = _with_roots(new, current.roots)
    write_cluster(installed, directory)
    return installed


def _anchor_in(ca: CA, roots: Sequence[x509.Certificate]) -> x509.Certificate:
    return anchor_of(_with_roots(ca, _union(roots)))


def _single_root(directory: Path) -> tuple[x509.Certificate, CA | None]:
    """The new root of `directory` (as `ca init` wrote it) and, if its key is there too, the signing CA."""
    if (directory / ROOT_KEY).exists():
        signing = load_root(directory)
        return signing.cert, signing
    certs = _read_certs(directory / ROOT_CERT)
    if len(certs) != 1 or not _self_signed(certs[0]):
        raise CAError(f"{directory / ROOT_CERT}: expected exactly the new root certificate (as `lockgate ca init` "
                      "wrote it)")
    return certs[0], None


def rotate_root(ca_dir: Path, new_root_dir: Path, *, now: dt.datetime) -> dict[str, CA]:
    """`ca rotate-root`, step one: every cluster of `ca_dir` gets a new intermediate under the new root of
    `new_root_dir`, and every bundle holds the old roots and the new one (step two drops the old).

    `new_root_dir` holds the new root's certificate (root-cert.pem) and either its key (then the intermediates
    are made here) or, the key staying offline, one directory per cluster made there with `lockgate ca cluster
    NAME --root NEWROOT --out NEWDIR/NAME`. Everything is checked before anything is written."""
    new_cert, signing = _single_root(new_root_dir)
    current = _load_all(ca_dir)
    bundle = _union([*(r for ca in current.values() for r in ca.roots), new_cert])
    replacements: dict[str, CA] = {}
    missing: list[str] = []
    if all(fingerprint(anchor_of(ca)) == fingerprint(new_cert) for ca in current.values()) and len(bundle) == 1:
        raise CAError(f"{ca_dir}: every intermediate chains to that root already and no other root is trusted")
    for cluster, ca in current.items():
        staged = new_root_dir / cluster
        if fingerprint(anchor_of(ca)) == fingerprint(new_cert):
            replacements[cluster] = ca  # rotated already (an earlier run was interrupted)
        elif (staged / CA_KEY).exists():
            made = load_cluster(staged)
            if fingerprint(_anchor_in(made, [new_cert])) != fingerprint(new_cert):
                raise CAError(f"{staged}: not signed by the new root in {new_root_dir / ROOT_CERT}")
            replacements[cluster] = made
        elif signing is not None:
            replacements[cluster] = new_intermediate(signing, cluster=cluster, now=now)
        else:
            missing.append(cluster)
    if missing:
        raise CAError(f"{new_root_dir}: no new intermediate for cluster(s) {', '.join(missing)} and no new root key "
                      "here to make them (it belongs offline). On the machine holding the new root run "
                      + "; ".join(f"`lockgate ca cluster {c} --root NEWROOT --out {new_root_dir / c}`" for c in missing)
                      + f", then copy those directories into {new_root_dir}")
    root_dir = ca_dir / "root"
    if (root_dir / ROOT_KEY).exists() and signing is None:
        raise CAError(f"{root_dir / ROOT_KEY} is the old root's key, online: a cluster added later would be signed by "
                      f"the root being retired. Take it offline first (move {root_dir} to the offline machine), or "
                      "give --new-root a directory that holds the new root's key")
    # Every bundle grows before any new intermediate appears (a running `up` also waits for the grown bundle
    # to reach every proxy before the new intermediates sign).
    for cluster, ca in current.items():
        write_cluster(_with_roots(ca, bundle), ca_dir / cluster)
    out = {}
    for cluster, made in replacements.items():
        out[cluster] = _with_roots(made, bundle)
        write_cluster(out[cluster], ca_dir / cluster)
    if (root_dir / ROOT_KEY).exists() and signing is not None:
        write_root(_with_roots(signing, bundle), root_dir)  # the dev default: the new root's key replaces the old
    elif (root_dir / ROOT_CERT).exists():
        _write(root_dir / ROOT_CERT, "".join(pem(c) for c in bundle).encode(), CERT_MODE)
    return out


def retiring_roots(ca_dir: Path) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """(kept, dropped): the roots of `ca_dir`'s bundles that some intermediate chains to, and the others."""
    current = _load_all(ca_dir)
    anchors = {fingerprint(anchor_of(ca)) for ca in current.values()}
    bundle = _union(r for ca in current.values() for r in ca.roots)
    return [r for r in bundle if fingerprint(r) in anchors], [r for r in bundle if fingerprint(r) not in anchors]


def finish_root_rotation(ca_dir: Path) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """`ca finish-root-rotation`: every bundle of `ca_dir` keeps only the roots intermediates chain to.
    Returns (kept, dropped). Whether every proxy already holds a certificate of the new chain is the caller's
    check (the status of the running `up`)."""
    kept, dropped = retiring_roots(ca_dir)
    if not dropped:
        raise CAError(f"{ca_dir}: no root rotation in progress (every root of the bundle signs an intermediate)")
    root_dir = ca_dir / "root"
    if (root_dir / ROOT_KEY).exists() and fingerprint(load_root(root_dir).cert) not in {fingerprint(r) for r in kept}:
        raise CAError(f"{root_dir / ROOT_KEY} belongs to a root being dropped; take it offline first")
    for cluster in clusters_in(ca_dir):
        _write(ca_dir / cluster / ROOT_CERT, "".join(pem(c) for c in kept).encode(), CERT_MODE)
    if (root_dir / ROOT_CERT).exists():
        _write(root_dir / ROOT_CERT, "".join(pem(c) for c in kept).encode(), CERT_MODE)
    return kept, dropped


# --- a running `up` follows the directory -------------------------------------------------------------------


Stamp = tuple[tuple[str, int, int, int], ...]


@dataclass
class CADirectoryWatch:
    """Which cluster directories of a CA directory changed since the last look, loaded anew.

    Polled by stat (inode, size, mtime of each file), so files written by `lockgate ca` and files copied in
    by hand are noticed alike. A directory is re-read only when its files change; one that does not load
    (a copy half done, a mistake) is reported and retried on its next change."""

    ca_dir: Path
    _stamps: dict[str, Stamp] = field(default_factory=dict)

    def changed(self, clusters: Iterable[str]) -> dict[str, CA | CAError]:
        out: dict[str, CA | CAError] = {}
        for cluster in clusters:
            directory = self.ca_dir / cluster
            stamp = _stamp(directory)  # before reading: a write after it shows as the next change
            if self._stamps.get(cluster) == stamp:
                continue
            self._stamps[cluster] = stamp
            try:
                out[cluster] = load_cluster(directory)
            except CAError as exc:
                out[cluster] = exc
            except OSError as exc:
                out[cluster] = CAError(f"{directory}: {exc.strerror or exc}")
        return out


def _stamp(directory: Path) -> Stamp:
    out = []
    for name in (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT):
        try:
            st = (directory / name).stat()
        except OSError:
            out.append((name, -1, -1, -1))
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
