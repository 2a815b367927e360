"""The CA hierarchy: chains that verify, SAN contents, TTLs, files and their modes, reuse across restarts."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification

from mesh.topology import ClusterTopology, Gateway, Sidecar
from multicluster import ca
from multicluster.issuer import WorkloadIssuer
from policies import identity_of
from reconciler.cli.ca import ca_dir_problem, inside_git_worktree
from reconciler.cli.main import main
from reconciler.load import load, read_worktree

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
SPIFFE = "spiffe://example.org/ns/shop/sa/reviews"


def verify(chain_pem: str, roots: list[x509.Certificate], at: dt.datetime = NOW) -> list[x509.Certificate]:
    """Verify a client certificate chain as a TLS peer would (RFC 5280 path building)."""
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem.encode())
    verifier = (verification.PolicyBuilder().store(verification.Store(roots)).time(at)
                .build_client_verifier())
    return list(verifier.verify(leaf, intermediates).chain)


@pytest.fixture(scope="module")
def hierarchy() -> tuple[ca.CA, ca.CA]:
    root = ca.new_root(now=NOW)
    return root, ca.new_intermediate(root, cluster="east", now=NOW)


def test_chain_verifies_to_the_root_and_carries_one_spiffe_san(hierarchy: tuple[ca.CA, ca.CA]) -> None:
    root, east = hierarchy
    cert = ca.issue(east, spiffe_id=SPIFFE, now=NOW, ttl=dt.timedelta(seconds=20))
    chain = x509.load_pem_x509_certificates(cert.cert_chain_pem.encode())
    assert [c.subject for c in chain] == [chain[0].subject, east.cert.subject]  # leaf + intermediate, no root
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(SPIFFE)]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_after_utc - NOW == dt.timedelta(seconds=20)
    assert cert.not_after - NOW.timestamp() == 20
    assert cert.serial == format(leaf.serial_number, "x")
    # Each CA generation has its own subject (a short key id): a rotation shows in the issuer chain.
    root_id = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()[:8]
    east_id = east.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()[:8]
    assert cert.issuer_chain == (f"CN=lockgate intermediate CA east {east_id},OU=cluster east,O=lockgate",
                                 f"CN=lockgate root CA {root_id},O=lockgate")
    assert ca.new_intermediate(root, cluster="east", now=NOW).name != east.name
    path = verify(cert.cert_chain_pem, [root.cert], at=NOW + dt.timedelta(seconds=5))
    assert [c.subject for c in path] == [leaf.subject, east.cert.subject, root.cert.subject]
    # The intermediate may sign leaves only; the root is self-signed and long-lived.
    assert east.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert root.cert.issuer == root.cert.subject
    assert root.cert.not_valid_after_utc - NOW == ca.ROOT_TTL


def test_another_root_and_expiry_fail_verification(hierarchy: tuple[ca.CA, ca.CA]) -> None:
    root, east = hierarchy
    cert = ca.issue(east, spiffe_id=SPIFFE, now=NOW, ttl=dt.timedelta(seconds=20))
    other = ca.new_root(now=NOW, common_name="someone else's root")
    with pytest.raises(verification.VerificationError):
        verify(cert.cert_chain_pem, [other.cert])
    with pytest.raises(verification.VerificationError):
        verify(cert.cert_chain_pem, [root.cert], at=NOW + dt.timedelta(seconds=21))
    # A bundle of two roots (root rotation): either one's chains verify.
    assert verify(cert.cert_chain_pem, [other.cert, root.cert])


def test_workload_cert_never_outlives_its_intermediate(hierarchy: tuple[ca.CA, ca.CA]) -> None:
    root, _ = hierarchy
    short = ca.new_intermediate(root, cluster="west", now=NOW, ttl=dt.timedelta(minutes=5))
    cert = ca.issue(short, spiffe_id=SPIFFE, now=NOW, ttl=dt.timedelta(hours=1))
    assert cert.not_after == short.cert.not_valid_after_utc.timestamp()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_modes_and_plugin_layout(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not widen a key's mode
    try:
        root = ca.init_root(tmp_path / "root", now=NOW)
        east = ca.init_cluster(tmp_path / "root", "east", tmp_path / "east", now=NOW)
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [".gitignore", "root-cert.pem", "root-key.pem"]
    assert sorted(p.name for p in (tmp_path / "east").iterdir()) == [
        ".gitignore", "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    for d in ("root", "east"):
        assert mode(tmp_path / d) == 0o700
        assert (tmp_path / d / ".gitignore").read_text().splitlines()[-1] == "*"
    assert mode(tmp_path / "root" / "root-key.pem") == 0o600
    assert mode(tmp_path / "east" / "ca-key.pem") == 0o600
    assert mode(tmp_path / "east" / "ca-cert.pem") == 0o644
    chain = x509.load_pem_x509_certificates((tmp_path / "east" / "cert-chain.pem").read_bytes())
    assert chain == [east.cert, root.cert]
    assert x509.load_pem_x509_certificates((tmp_path / "east" / "root-cert.pem").read_bytes()) == [root.cert]
    loaded = ca.load_cluster(tmp_path / "east")
    assert loaded.cert == east.cert and loaded.roots == (root.cert,)
    with pytest.raises(ca.CAError, match="a root already exists here"):
        ca.init_root(tmp_path / "root", now=NOW)


def test_a_world_readable_key_is_tightened_on_load(tmp_path: Path) -> None:
    ca.init_root(tmp_path / "root", now=NOW)
    key = tmp_path / "root" / "root-key.pem"
    os.chmod(key, 0o644)
    ca.load_root(tmp_path / "root")
    assert mode(key) == 0o600


def test_inconsistent_cluster_dir_is_refused(tmp_path: Path) -> None:
    ca.init_root(tmp_path / "root", now=NOW)
    ca.init_cluster(tmp_path / "root", "east", tmp_path / "east", now=NOW)
    ca.init_cluster(tmp_path / "root", "west", tmp_path / "west", now=NOW)
    (tmp_path / "east" / "ca-key.pem").write_bytes((tmp_path / "west" / "ca-key.pem").read_bytes())
    with pytest.raises(ca.CAError, match="the key does not belong to the certificate"):
        ca.load_cluster(tmp_path / "east")
    other = ca.new_root(now=NOW)
    (tmp_path / "west" / "root-cert.pem").write_text(ca.pem(other.cert))
    with pytest.raises(ca.CAError, match="does not lead to any root"):
        ca.load_cluster(tmp_path / "west")


def test_ensure_hierarchy_creates_once_and_reuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    first = ca.ensure_hierarchy(tmp_path / "ca", ["east", "west"], now=NOW)
    again = ca.ensure_hierarchy(tmp_path / "ca", ["east", "west"], now=NOW)
    assert {k: v.cert for k, v in first.items()} == {k: v.cert for k, v in again.items()}
    assert first["east"].roots == first["west"].roots  # one root shared by every cluster
    assert ca.trust_bundle(first.values()) == [ca.pem(first["east"].roots[0])]
    assert not (tmp_path / "ca" / "east" / "root-key.pem").exists()
    assert "PRIVATE KEY" not in caplog.text

    # The root key kept offline: a new cluster cannot get an intermediate here, and says how to make one.
    (tmp_path / "ca" / "root" / "root-key.pem").unlink()
    with pytest.raises(ca.CAError, match="no root key"):
        ca.ensure_hierarchy(tmp_path / "ca", ["north"], now=NOW)
    assert ca.ensure_hierarchy(tmp_path / "ca", ["east"], now=NOW)["east"].cert == first["east"].cert


def test_two_roots_in_the_bundle(tmp_path: Path) -> None:
    """Root rotation (istio#14516): root-cert.pem holds old and new root; the bundle carries both."""
    old = ca.new_root(now=NOW)
    new = ca.new_root(now=NOW, common_name="lockgate root CA 2")
    east = ca.new_intermediate(old, cluster="east", now=NOW)
    ca.write_cluster(ca.CA(cert=east.cert, key=east.key, chain=east.chain, roots=(old.cert, new.cert)), tmp_path)
    loaded = ca.load_cluster(tmp_path)
    assert ca.trust_bundle([loaded]) == [ca.pem(old.cert), ca.pem(new.cert)]


# --- the issuer ----------------------------------------------------------------------------------------


def topo(*sidecars: Sidecar) -> ClusterTopology:
    return ClusterTopology(cluster="east", ingress=Gateway("east/ingress", "127.0.1.1", 1), sidecars=sidecars)


def sidecar(name: str, service: str = "reviews", workload: str = "reviews-v1") -> Sidecar:
    return Sidecar(node_id=f"east/shop/{name}", namespace="shop", service=service, version="v1",
                   workload=workload, address="127.0.1.1", inbound_port=2, outbound_port=3, app_port=4)


def test_issuer_rotates_at_half_life_and_forgets_gone_proxies(hierarchy: tuple[ca.CA, ca.CA]) -> None:
    _, east = hierarchy
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    intent = loaded.intent
    issuer = WorkloadIssuer(ttl=20)
    issuer.add_authority("east", east)
    t0 = NOW.timestamp()
    a = issuer.certs_for(intent, topo(sidecar("reviews-v1-0"), sidecar("frontend-v1-0", "frontend", "frontend-v1")),
                         now=t0)
    assert {k: v.spiffe_id for k, v in a.items()} == {
        "east/ingress": "spiffe://example.org/ns/lockgate-system/sa/ingress-gateway",
        "east/shop/reviews-v1-0": "spiffe://example.org/ns/shop/sa/reviews",
        "east/shop/frontend-v1-0": "spiffe://example.org/ns/shop/sa/frontend",
    }
    assert issuer.next_rotation() == t0 + 10
    same = issuer.certs_for(intent, topo(sidecar("reviews-v1-0")), now=t0 + 5)
    assert same["east/shop/reviews-v1-0"] is a["east/shop/reviews-v1-0"]
    assert set(same) == {"east/ingress", "east/shop/reviews-v1-0"}  # frontend is gone: forgotten
    later = issuer.certs_for(intent, topo(sidecar("reviews-v1-0")), now=t0 + 9.5)  # within the batching slack
    assert later["east/shop/reviews-v1-0"].serial != a["east/shop/reviews-v1-0"].serial
    nxt = issuer.next_rotation()  # certificate times have whole seconds: not_after is t0 + 29
    assert nxt is not None and t0 + 19 <= nxt <= t0 + 19.5
    described = issuer.describe()
    assert [p["rotations"] for p in described["proxies"]] == [1, 1]
    assert "PRIVATE" not in json.dumps(described)


def test_identity_follows_the_service_account(hierarchy: tuple[ca.CA, ca.CA]) -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    intent = loaded.intent
    w = intent.workloads[("shop", "reviews-v1")]
    renamed = w.model_copy(update={"spec": w.spec.model_copy(update={"service_account": "ratings-reader"})})
    intent2 = intent.model_copy(update={"workloads": {**intent.workloads, ("shop", "reviews-v1"): renamed}})
    assert identity_of(intent2, sidecar("reviews-v1-0")) == "spiffe://example.org/ns/shop/sa/ratings-reader"
    issuer = WorkloadIssuer(ttl=20)
    issuer.add_authority("east", hierarchy[1])
    before = issuer.certs_for(intent, topo(sidecar("reviews-v1-0")), now=NOW.timestamp())
    after = issuer.certs_for(intent2, topo(sidecar("reviews-v1-0")), now=NOW.timestamp() + 1)
    assert before["east/shop/reviews-v1-0"].spiffe_id != after["east/shop/reviews-v1-0"].spiffe_id


# --- commands --------------------------------------------------------------------------------------------


def test_ca_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--out", str(tmp_path / "root")]) == 0
    assert main(["ca", "cluster", "east", "--root", str(tmp_path / "root")]) == 0
    assert (tmp_path / "east" / "ca-key.pem").exists()  # default: beside the root directory
    assert main(["ca", "cluster", "west", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "w")]) == 0
    assert main(["ca", "init", "--out", str(tmp_path / "root")]) == 1
    out = capsys.readouterr()
    assert "a root already exists here" in out.err
    assert "PRIVATE" not in out.out + out.err
    assert mode(tmp_path / "w" / "ca-key.pem") == 0o600


def test_keys_are_refused_inside_a_git_work_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    assert inside_git_worktree(tmp_path / "repo" / "keys" / "root") == (tmp_path / "repo").resolve()
    assert main(["ca", "init", "--out", str(tmp_path / "repo" / "keys")]) == 1
    assert "inside the Git work tree" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "keys").exists()
    (tmp_path / "repo" / ".gitignore").write_text("secrets/\n")
    assert inside_git_worktree(tmp_path / "repo" / "secrets" / "root") is None
    assert inside_git_worktree(tmp_path / "elsewhere") is None
    assert ca_dir_problem(tmp_path / "repo" / ".lockgate" / "ca", str(tmp_path / "repo")) is not None
    assert ca_dir_problem(tmp_path / "state" / "ca", str(tmp_path / "repo")) is None
    assert ca_dir_problem(tmp_path / "state" / "ca", "https://example.org/x.git") is None


def test_certs_command_reads_the_status_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             hierarchy: tuple[ca.CA, ca.CA]) -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    issuer = WorkloadIssuer(ttl=3600)
    issuer.add_authority("east", hierarchy[1])
    issuer.certs_for(loaded.intent, topo(sidecar("reviews-v1-0")), now=dt.datetime.now(dt.UTC).timestamp())
    (tmp_path / "status.json").write_text(json.dumps({"certs": issuer.describe()}))
    assert main(["certs", "--json", "--state-dir", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    proxy = next(p for p in got["proxies"] if p["proxy"] == "east/shop/reviews-v1-0")
    assert proxy["spiffeId"] == SPIFFE
    assert 1795 <= proxy["rotatesIn"] <= 1800
    assert proxy["issuer"][-1] == hierarchy[0].name and proxy["rootSha256"] == ca.fingerprint(hierarchy[0].cert)
    assert main(["certs", "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "east/shop/reviews-v1-0" in text
    assert f"{hierarchy[1].name.split(',')[0][3:]} < {hierarchy[0].name.split(',')[0][3:]}" in text
    assert main(["certs", "--state-dir", str(tmp_path / "nowhere")]) == 1


def test_a_read_only_ca_directory_loads_as_a_kubernetes_secret_mount_has_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's CA is a Secret volume: group-readable (fsGroup) and read-only. It must load as it is."""
    import errno

    import multicluster.ca as ca_mod

    now = dt.datetime.now(dt.UTC)
    root = ca_mod.init_root(tmp_path / "ca" / "root", now=now)
    ca_mod.write_cluster(ca_mod.new_intermediate(root, cluster="east", now=now), tmp_path / "ca" / "east")
    (tmp_path / "ca" / "root" / ca_mod.ROOT_KEY).unlink()  # the root key is offline, as it should be
    os.chmod(tmp_path / "ca" / "east" / ca_mod.CA_KEY, 0o440)

    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ca_mod.os, "chmod", read_only)
    got = ca_mod.ensure_hierarchy(tmp_path / "ca", ["east"], now=now, create_root=False)
    assert got["east"].cert.subject == ca_mod.load_cluster(tmp_path / "ca" / "east").cert.subject
