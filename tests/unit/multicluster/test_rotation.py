"""Rotations as file operations and in the issuer: the root key offline, a new intermediate, a new root in
two steps. What must hold: a mix of old and new files never loads, a new root signs only once every proxy
trusts it, and the old root leaves the bundle only when nothing chains to it any more."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification

from mesh.intent import Intent
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.cache import SnapshotCache
from mesh.xds.snapshot import SECRET, Snapshot
from multicluster import ca
from multicluster.issuer import WorkloadIssuer, bundle_acked
from policies.render import TRUST_BUNDLE
from reconciler.cli.main import main
from reconciler.load import load, read_worktree
from tests.fixtures.intents import TEMPLATE

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
FILES = (ca.CA_KEY, ca.CA_CERT, ca.CERT_CHAIN, ca.ROOT_CERT)
"""In the order `write_cluster` writes them."""


def verifies(chain_pem: str, roots: list[x509.Certificate], at: dt.datetime = NOW) -> bool:
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem.encode())
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).time(at).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError:
        return False
    return True


def offline_hierarchy(tmp: Path, clusters: tuple[str, ...] = ("east",)) -> tuple[Path, Path]:
    """A root made "offline" (tmp/offline/root) and a CA directory holding only the intermediates and the
    root certificate: no root key anywhere under it."""
    offline = tmp / "offline" / "root"
    ca.init_root(offline, now=NOW)
    ca_dir = tmp / "ca"
    for c in clusters:
        ca.init_cluster(offline, c, ca_dir / c, now=NOW)
    ca.private_dir(ca_dir / "root")
    shutil.copy(offline / ca.ROOT_CERT, ca_dir / "root" / ca.ROOT_CERT)
    return offline, ca_dir


def root_certs(directory: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((directory / ca.ROOT_CERT).read_bytes())


# --- the root key offline ------------------------------------------------------------------------------------


def test_a_ca_dir_without_root_key_loads_and_a_missing_intermediate_names_the_command(tmp_path: Path) -> None:
    offline, ca_dir = offline_hierarchy(tmp_path)
    got = ca.ensure_hierarchy(ca_dir, ["east"], now=NOW, create_root=False)
    assert got["east"].roots == ca.load_root(offline).roots
    assert not list(ca_dir.rglob(ca.ROOT_KEY))
    with pytest.raises(ca.CAError) as err:
        ca.ensure_hierarchy(ca_dir, ["west"], now=NOW)  # even the dev default makes no root beside others
    assert f"`lockgate ca cluster west --root ROOTDIR --out {ca_dir / 'west'}`" in str(err.value)
    assert not (ca_dir / "west").exists() and not list(ca_dir.rglob(ca.ROOT_KEY))
    # An explicit, empty --ca-dir is not filled with a new root: it says how to make one offline.
    with pytest.raises(ca.CAError, match="lockgate ca init --out ROOTDIR"):
        ca.ensure_hierarchy(tmp_path / "empty", ["east"], now=NOW, create_root=False)
    assert not list((tmp_path / "empty").rglob("*.pem"))


def test_the_dev_default_says_where_the_root_key_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ca.ensure_hierarchy(tmp_path / "ca", ["east"], now=NOW)
    assert (tmp_path / "ca" / "root" / ca.ROOT_KEY).exists()
    assert str(tmp_path / "ca" / "root" / ca.ROOT_KEY) in caplog.text
    assert "offline" in caplog.text and "lockgate ca rotate-cluster" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


# --- files: a reader sees the old CA or the new one, never a mix ---------------------------------------------


def test_every_mix_of_old_and_new_files_is_refused(tmp_path: Path) -> None:
    """The order `write_cluster` writes in, for both rotations: each prefix of the new files over the old."""
    offline, ca_dir = offline_hierarchy(tmp_path)
    old = {name: (ca_dir / "east" / name).read_bytes() for name in FILES}
    new_root = tmp_path / "offline" / "root2"
    ca.init_root(new_root, now=NOW)
    cases = {
        "same root": ca.new_intermediate(ca.load_root(offline), cluster="east", now=NOW),
        "new root": ca.new_intermediate(ca.load_root(new_root), cluster="east", now=NOW),
    }
    for what, made in cases.items():
        roots = (*ca.load_root(offline).roots, *made.roots) if what == "new root" else made.roots
        staged = tmp_path / what
        ca.write_cluster(ca.CA(cert=made.cert, key=made.key, chain=made.chain, roots=tuple(roots)), staged)
        for n in range(1, len(FILES)):
            for i, name in enumerate(FILES):
                (ca_dir / "east" / name).write_bytes((staged / name).read_bytes() if i < n else old[name])
            if what == "same root" and n == 3:  # root-cert.pem is the same file: that state is the new CA
                assert ca.load_cluster(ca_dir / "east").cert == made.cert
                continue
            with pytest.raises(ca.CAError):
                ca.load_cluster(ca_dir / "east")
        for name in FILES:
            (ca_dir / "east" / name).write_bytes(old[name])


def test_rotate_cluster_keeps_the_bundle_and_old_certificates_valid(tmp_path: Path) -> None:
    offline, ca_dir = offline_hierarchy(tmp_path)
    before = ca.load_cluster(ca_dir / "east")
    old_cert = ca.issue(before, spiffe_id="spiffe://example.org/ns/shop/sa/a", now=NOW)
    after = ca.rotate_cluster(ca_dir, "east", root=ca.load_root(offline), now=NOW)
    loaded = ca.load_cluster(ca_dir / "east")
    assert loaded.cert == after.cert != before.cert and loaded.roots == before.roots
    assert stat.S_IMODE((ca_dir / "east" / ca.CA_KEY).stat().st_mode) == 0o600
    assert verifies(old_cert.cert_chain_pem, list(loaded.roots))  # same root: nothing fails
    assert verifies(ca.issue(loaded, spiffe_id="spiffe://example.org/ns/shop/sa/a", now=NOW).cert_chain_pem,
                    list(loaded.roots))
    # From an intermediate made where the root key is (`--from`), and refusals.
    made = ca.init_cluster(offline, "east", tmp_path / "made" / "east", now=NOW)
    assert ca.rotate_cluster(ca_dir, "east", replacement=ca.load_cluster(tmp_path / "made" / "east"),
                             now=NOW).cert == made.cert
    other = tmp_path / "other"
    ca.init_root(other, now=NOW)
    with pytest.raises(ca.CAError, match="rotate-root"):
        ca.rotate_cluster(ca_dir, "east", root=ca.load_root(other), now=NOW)
    with pytest.raises(ca.CAError, match="lockgate ca cluster west"):
        ca.rotate_cluster(ca_dir, "west", root=ca.load_root(offline), now=NOW)
    assert ca.load_cluster(ca_dir / "east").cert == made.cert


def test_root_rotation_with_the_new_key_offline(tmp_path: Path) -> None:
    offline, ca_dir = offline_hierarchy(tmp_path, ("east", "west"))
    old_root = ca.load_root(offline).cert
    new_root = tmp_path / "offline" / "root2"
    ca.init_root(new_root, now=NOW)
    transfer = tmp_path / "transfer"  # what is carried to the mesh machine: certificates and intermediates
    ca.private_dir(transfer)
    shutil.copy(new_root / ca.ROOT_CERT, transfer / ca.ROOT_CERT)
    ca.init_cluster(new_root, "east", transfer / "east", now=NOW)
    before = {p: p.read_bytes() for p in ca_dir.rglob("*.pem")}
    with pytest.raises(ca.CAError) as err:
        ca.rotate_root(ca_dir, transfer, now=NOW)
    assert f"`lockgate ca cluster west --root NEWROOT --out {transfer / 'west'}`" in str(err.value)
    assert {p: p.read_bytes() for p in ca_dir.rglob("*.pem")} == before  # checked before anything is written
    ca.init_cluster(new_root, "west", transfer / "west", now=NOW)
    made = ca.rotate_root(ca_dir, transfer, now=NOW)
    new = ca.load_root(new_root).cert
    for c in ("east", "west"):
        loaded = ca.load_cluster(ca_dir / c)
        assert loaded.cert == made[c].cert and ca.anchor_of(loaded) == new
        assert loaded.roots == (old_root, new)
    assert root_certs(ca_dir / "root") == [old_root, new]
    assert not list(ca_dir.rglob(ca.ROOT_KEY))
    assert ca.retiring_roots(ca_dir) == ([new], [old_root])
    kept, dropped = ca.finish_root_rotation(ca_dir)
    assert (kept, dropped) == ([new], [old_root])
    assert all(ca.load_cluster(ca_dir / c).roots == (new,) for c in ("east", "west"))
    assert root_certs(ca_dir / "root") == [new]
    with pytest.raises(ca.CAError, match="no root rotation in progress"):
        ca.finish_root_rotation(ca_dir)


def test_root_rotation_refuses_to_leave_the_old_root_key_online(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca.ensure_hierarchy(ca_dir, ["east"], now=NOW)  # the dev default: root key in ca/root
    new_root = tmp_path / "root2"
    ca.init_root(new_root, now=NOW)
    transfer = tmp_path / "transfer"
    ca.private_dir(transfer)
    shutil.copy(new_root / ca.ROOT_CERT, transfer / ca.ROOT_CERT)
    ca.init_cluster(new_root, "east", transfer / "east", now=NOW)
    with pytest.raises(ca.CAError, match="old root's key, online"):
        ca.rotate_root(ca_dir, transfer, now=NOW)
    # With the new key at hand (the dev default stays one): it replaces the old key in ca/root.
    ca.rotate_root(ca_dir, new_root, now=NOW)
    assert ca.load_root(ca_dir / "root").cert == ca.load_root(new_root).cert
    assert ca.anchor_of(ca.load_cluster(ca_dir / "east")) == ca.load_root(new_root).cert


def test_the_watch_reports_changes_once_and_a_broken_directory_as_an_error(tmp_path: Path) -> None:
    offline, ca_dir = offline_hierarchy(tmp_path, ("east", "west"))
    watch = ca.CADirectoryWatch(ca_dir)
    assert set(watch.changed(["east", "west"])) == {"east", "west"}
    assert watch.changed(["east", "west"]) == {}
    rotated = ca.rotate_cluster(ca_dir, "east", root=ca.load_root(offline), now=NOW)
    got = watch.changed(["east", "west"])
    assert set(got) == {"east"} and isinstance(got["east"], ca.CA) and got["east"].cert == rotated.cert
    (ca_dir / "west" / ca.CA_KEY).write_bytes((ca_dir / "east" / ca.CA_KEY).read_bytes())
    broken = watch.changed(["east", "west"])
    assert isinstance(broken["west"], ca.CAError) and "does not belong" in str(broken["west"])
    assert watch.changed(["east", "west"]) == {}  # not retried until the files change again


# --- the issuer ------------------------------------------------------------------------------------------


def topo(cluster: str, *names: str) -> ClusterTopology:
    return ClusterTopology(cluster=cluster, ingress=Gateway(f"{cluster}/ingress", "127.0.1.1", 1), sidecars=tuple(
        Sidecar(node_id=f"{cluster}/shop/{n}", namespace="shop", service="reviews", version="v1",
                workload="reviews-v1", address="127.0.1.1", inbound_port=2, outbound_port=3, app_port=4)
        for n in names))


@pytest.fixture(scope="module")
def intent() -> Intent:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    return loaded.intent


def test_replace_authority_reissues_that_cluster_at_once(intent: Intent) -> None:
    root = ca.new_root(now=NOW)
    issuer = WorkloadIssuer(ttl=3600)
    issuer.add_authority("east", ca.new_intermediate(root, cluster="east", now=NOW))
    issuer.add_authority("west", ca.new_intermediate(root, cluster="west", now=NOW))
    t = NOW.timestamp()
    east = issuer.certs_for(intent, topo("east", "reviews-v1-0"), now=t)
    west = issuer.certs_for(intent, topo("west", "reviews-v1-0"), now=t)
    fresh = ca.new_intermediate(root, cluster="east", now=NOW)
    assert issuer.replace_authority("east", fresh) and not issuer.awaiting_bundle
    assert issuer.next_rotation() == t  # due now: the caller's push re-issues
    east2 = issuer.certs_for(intent, topo("east", "reviews-v1-0"), now=t + 1)
    west2 = issuer.certs_for(intent, topo("west", "reviews-v1-0"), now=t + 1)
    assert all(east2[n].serial != east[n].serial and east2[n].issuer_chain[0] == fresh.name for n in east)
    assert all(west2[n] is west[n] for n in west)  # the other cluster is left alone
    assert all(verifies(c.cert_chain_pem, [root.cert]) for c in [*east.values(), *east2.values()])
    assert issuer.trust_bundle == [ca.pem(root.cert)]
    assert not issuer.replace_authority("east", fresh)  # the same again: nothing to push
    assert [p["rotations"] for p in issuer.describe()["proxies"] if p["cluster"] == "east"] == [1, 1]


def test_a_new_root_signs_only_once_the_bundle_is_delivered(intent: Intent) -> None:
    old, new = ca.new_root(now=NOW), ca.new_root(now=NOW)
    issuer = WorkloadIssuer(ttl=3600)
    first = ca.new_intermediate(old, cluster="east", now=NOW)
    issuer.add_authority("east", first)
    t = NOW.timestamp()
    before = issuer.certs_for(intent, topo("east", "reviews-v1-0"), now=t)
    made = ca.new_intermediate(new, cluster="east", now=NOW)
    both = ca.CA(cert=made.cert, key=made.key, chain=made.chain, roots=(old.cert, new.cert))
    assert issuer.replace_authority("east", both)
    # Step one widens the bundle only: the old intermediate keeps signing until every proxy trusts the new root.
    assert issuer.awaiting_bundle and issuer.trust_bundle == [ca.pem(old.cert), ca.pem(new.cert)]
    assert issuer.certs_for(intent, topo("east", "reviews-v1-0"), now=t + 1) == before
    described = issuer.describe()
    assert [(a["sha256"], a["rootSha256"], a["pending"]) for a in described["authorities"]] == [
        (ca.fingerprint(first.cert), ca.fingerprint(old.cert), False),
        (ca.fingerprint(both.cert), ca.fingerprint(new.cert), True)]
    assert issuer.bundle_delivered() == ["east"] and not issuer.awaiting_bundle
    after = issuer.certs_for(intent, topo("east", "reviews-v1-0"), now=t + 2)
    assert all(verifies(c.cert_chain_pem, [new.cert]) and not verifies(c.cert_chain_pem, [old.cert])
               for c in after.values())
    assert {p["rootSha256"] for p in issuer.describe()["proxies"]} == {ca.fingerprint(new.cert)}
    # Step two: the same intermediate, the bundle without the old root; no certificate changes.
    assert issuer.replace_authority("east", ca.CA(cert=made.cert, key=made.key, chain=made.chain, roots=(new.cert,)))
    assert issuer.certs_for(intent, topo("east", "reviews-v1-0"), now=t + 3) == after
    assert issuer.trust_bundle == [ca.pem(new.cert)]
    assert [r["sha256"] for r in issuer.describe()["trustBundle"]] == [ca.fingerprint(new.cert)]


class _Stream:
    def wants(self, snapshot: Snapshot) -> bool:
        return True

    def wake(self) -> None:
        pass


def test_bundle_acked_needs_the_bundle_in_an_acked_secret() -> None:
    root, other = ca.new_root(now=NOW).cert, ca.new_root(now=NOW).cert
    cache = SnapshotCache()

    def snap(*roots: x509.Certificate) -> Snapshot:
        bundle = "".join(ca.pem(r) for r in roots)
        return Snapshot.of(secrets=[{"name": TRUST_BUNDLE,
                                     "validation_context": {"trusted_ca": {"inline_string": bundle}}}])

    cache.set("east/ingress", snap(root))
    cache.set("east/eastwest", Snapshot.of())  # no trust bundle: nothing to wait for
    assert bundle_acked(cache, [ca.pem(root)])  # not connected: it gets everything when it connects
    cache.watch("east/ingress", _Stream())
    cache.watch("east/eastwest", _Stream())
    assert not bundle_acked(cache, [ca.pem(root)])
    cache.applied("east/ingress", SECRET, cache.get("east/ingress").version(SECRET))  # type: ignore[union-attr]
    assert bundle_acked(cache, [ca.pem(root)])
    assert not bundle_acked(cache, [ca.pem(root), ca.pem(other)])  # ACKed, but not the bundle asked about
    cache.set("east/ingress", snap(root, other))
    assert not bundle_acked(cache, [ca.pem(root), ca.pem(other)])
    cache.applied("east/ingress", SECRET, cache.get("east/ingress").version(SECRET))  # type: ignore[union-attr]
    assert bundle_acked(cache, [ca.pem(root), ca.pem(other)])


# --- commands --------------------------------------------------------------------------------------------


def test_rotation_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offline, ca_dir = offline_hierarchy(tmp_path)
    state = tmp_path / "state"
    first = ca.load_cluster(ca_dir / "east").cert
    assert main(["ca", "rotate-cluster", "east", "--root", str(offline), "--ca-dir", str(ca_dir)]) == 0
    assert ca.load_cluster(ca_dir / "east").cert != first
    with pytest.raises(SystemExit):  # --root or --from
        main(["ca", "rotate-cluster", "east", "--ca-dir", str(ca_dir)])
    root2 = tmp_path / "offline" / "root2"
    assert main(["ca", "init", "--out", str(root2)]) == 0
    assert main(["ca", "cluster", "east", "--root", str(root2), "--out", str(tmp_path / "transfer" / "east")]) == 0
    shutil.copy(root2 / ca.ROOT_CERT, tmp_path / "transfer" / ca.ROOT_CERT)
    assert main(["ca", "rotate-root", "--new-root", str(tmp_path / "transfer"), "--ca-dir", str(ca_dir),
                 "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "finish-root-rotation" in out and "PRIVATE" not in out
    new_fp, old_fp = ca.fingerprint(ca.load_root(root2).cert), ca.fingerprint(ca.load_root(offline).cert)
    finish = ["ca", "finish-root-rotation", "--ca-dir", str(ca_dir), "--state-dir", str(state)]

    def status(*proxies: dict[str, object], pending: bool = False) -> None:
        authority = {"cluster": "east", "subject": "x", "rootSha256": new_fp, "pending": pending}
        state.mkdir(exist_ok=True)
        (state / "status.json").write_text(json.dumps({"certs": {"authorities": [authority], "proxies": proxies}}))

    assert main(finish) == 1 and "no readable" in capsys.readouterr().err  # no status: cannot tell
    status({"proxy": "east/ingress", "rootSha256": old_fp, "delivered": True})
    assert main(finish) == 1
    assert "east/ingress: its certificate chains to a root being dropped" in capsys.readouterr().err
    status({"proxy": "east/ingress", "rootSha256": new_fp, "delivered": False})
    assert main(finish) == 1 and "has not ACKed" in capsys.readouterr().err
    status({"proxy": "east/ingress", "rootSha256": new_fp, "delivered": True}, pending=True)
    assert main(finish) == 1 and "waits for every proxy" in capsys.readouterr().err
    assert len(ca.load_cluster(ca_dir / "east").roots) == 2  # every refusal changed nothing
    status({"proxy": "east/ingress", "rootSha256": new_fp, "delivered": True})
    assert main(finish) == 0
    assert [ca.fingerprint(r) for r in ca.load_cluster(ca_dir / "east").roots] == [new_fp]
    assert main(finish) == 1 and "no root rotation in progress" in capsys.readouterr().err
