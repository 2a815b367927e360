"""The reconcile loop on a CA directory whose root key is offline: it serves, refuses a cluster it has no
intermediate for, and follows rotations written to the directory while it runs (FakeRuntime, real caches)."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from mesh.xds.snapshot import PUSH_ORDER, SECRET, Snapshot
from multicluster import ca
from policies.render import TRUST_BUNDLE, WORKLOAD_CERT
from reconciler.loop import Reconciler, UpConfig
from reconciler.source.git import Pygit2Source, init_repo
from tests.fixtures.intents import TEMPLATE
from tests.fixtures.runtime import FakeRuntime
from tests.fixtures.waiting import until

NOW = dt.datetime.now(dt.UTC)
FRONTEND = "east/shop/frontend-v1-0"
USER = ("dev", "dev@example.org")


class _Stream:
    def wants(self, snapshot: Snapshot) -> bool:
        return True

    def wake(self) -> None:
        pass


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, Path]:
    """(the offline root directory, the CA directory: intermediates and root certificate, no root key)."""
    root = tmp_path / "offline" / "root"
    ca.init_root(root, now=NOW)
    ca_dir = tmp_path / "ca"
    ca.init_cluster(root, "east", ca_dir / "east", now=NOW)
    ca.private_dir(ca_dir / "root")
    shutil.copy(root / ca.ROOT_CERT, ca_dir / "root" / ca.ROOT_CERT)
    return root, ca_dir


def reconciler(tmp_path: Path, ca_dir: Path) -> Reconciler:
    repo = tmp_path / "repo"
    if not repo.exists():
        init_repo(repo, template=TEMPLATE)
    return Reconciler(config=UpConfig(repo=str(repo), state_dir=tmp_path / "state", ca_dir=ca_dir),
                      source=Pygit2Source.open(str(repo)), runtime=FakeRuntime(), announced=True)


def chain(snap: Snapshot | None) -> list[x509.Certificate]:
    assert snap is not None
    pem = snap.items(SECRET)[WORKLOAD_CERT]["tls_certificate"]["certificate_chain"]["inline_string"]
    return x509.load_pem_x509_certificates(pem.encode())


def bundle(snap: Snapshot | None) -> list[x509.Certificate]:
    assert snap is not None
    pem = snap.items(SECRET)[TRUST_BUNDLE]["validation_context"]["trusted_ca"]["inline_string"]
    return x509.load_pem_x509_certificates(pem.encode())


def test_serves_without_the_root_key_and_refuses_a_cluster_without_intermediate(
        tmp_path: Path, offline: tuple[Path, Path]) -> None:
    _, ca_dir = offline
    east = ca.load_cluster(ca_dir / "east")

    async def scenario() -> None:
        rec = reconciler(tmp_path, ca_dir)
        try:
            head = rec.source.head()
            assert head is not None
            await rec.apply_revision(head)
            assert rec.applied == head
            snap = rec.planes["east"].cache.get(FRONTEND)
            assert chain(snap)[1] == east.cert and bundle(snap) == list(east.roots)
            mesh = (tmp_path / "repo" / "mesh.yaml").read_text().replace(
                "    - name: east\n", "    - name: east\n    - name: west\n")
            source = Pygit2Source.open(str(tmp_path / "repo"))
            sha = source.commit(files={"mesh.yaml": mesh.encode()}, message="west", parent=head, author=USER)
            await rec.apply_revision(sha)  # refused like an invalid commit, at the cluster's line of the Mesh
            assert rec.failed == sha and rec.applied == head
            [error] = rec.last_error
            assert error.startswith("mesh.yaml:") and "cluster west" in error, error
            assert f"lockgate ca cluster west --root ROOTDIR --out {ca_dir / 'west'}" in error
            assert set(rec.planes) == {"east"} and set(rec.runtime.clusters) == {"east"}  # type: ignore[attr-defined]
        finally:
            await rec.close()

    asyncio.run(scenario())
    assert not list(ca_dir.rglob(ca.ROOT_KEY))


def test_rotations_are_followed_and_a_new_root_waits_for_the_bundle(tmp_path: Path,
                                                                   offline: tuple[Path, Path]) -> None:
    root_dir, ca_dir = offline
    old_root = ca.load_root(root_dir).cert

    async def scenario() -> None:
        rec = reconciler(tmp_path, ca_dir)
        follow = asyncio.create_task(rec._follow_ca(interval=0.02))
        try:
            head = rec.source.head()
            assert head is not None
            await rec.apply_revision(head)
            cache = rec.planes["east"].cache
            nodes = [n for n in cache.nodes() if WORKLOAD_CERT in cache.get(n).items(SECRET)]  # type: ignore[union-attr]
            assert FRONTEND in nodes and "east/ingress" in nodes
            before = {n: cache.get(n) for n in nodes}
            cache.watch(FRONTEND, _Stream())  # one connected proxy, which ACKs only when told to

            def ack() -> None:
                cache.applied(FRONTEND, SECRET, cache.get(FRONTEND).version(SECRET))  # type: ignore[union-attr]

            ack()
            # 1. A new intermediate, same root: every certificate re-issued from it, only secrets change.
            second = ca.rotate_cluster(ca_dir, "east", root=ca.load_root(root_dir), now=NOW)
            await until("re-issued", lambda: all(chain(cache.get(n))[1] == second.cert for n in nodes))
            for n in nodes:
                old, new = before[n], cache.get(n)
                assert old is not None and new is not None
                assert [t for t in PUSH_ORDER if old.version(t) != new.version(t)] == [SECRET], n
            ack()
            # 2. A new root, its key offline: the intermediates made there are copied in.
            new_root_dir = tmp_path / "offline" / "root2"
            ca.init_root(new_root_dir, now=NOW)
            new_root = ca.load_root(new_root_dir).cert
            transfer = tmp_path / "transfer"
            ca.init_cluster(new_root_dir, "east", transfer / "east", now=NOW)
            shutil.copy(new_root_dir / ca.ROOT_CERT, transfer / ca.ROOT_CERT)
            third = ca.rotate_root(ca_dir, transfer, now=NOW)["east"]
            await until("bundle widened", lambda: bundle(cache.get(FRONTEND)) == [old_root, new_root])
            await asyncio.sleep(0.2)  # FRONTEND has not ACKed the wider bundle: the old intermediate still signs
            assert all(chain(cache.get(n))[1] == second.cert for n in nodes)
            assert [a["pending"] for a in rec.status()["certs"]["authorities"]] == [False, True]
            ack()
            await until("re-issued under the new root", lambda: all(chain(cache.get(n))[1] == third.cert
                                                                    for n in nodes))
            certs = rec.status()["certs"]
            assert {p["rootSha256"] for p in certs["proxies"]} == {ca.fingerprint(new_root)}
            assert [r["sha256"] for r in certs["trustBundle"]] == [ca.fingerprint(old_root), ca.fingerprint(new_root)]
            # 3. The old root leaves the bundle; no certificate changes.
            issued = {n: chain(cache.get(n))[0].serial_number for n in nodes}
            ca.finish_root_rotation(ca_dir)
            await until("old root dropped", lambda: bundle(cache.get(FRONTEND)) == [new_root])
            assert {n: chain(cache.get(n))[0].serial_number for n in nodes} == issued
            assert [r["sha256"] for r in rec.status()["certs"]["trustBundle"]] == [ca.fingerprint(new_root)]
            # A half-written directory changes nothing: the intermediate in place keeps signing.
            (ca_dir / "east" / ca.CA_KEY).write_bytes((root_dir / ca.ROOT_KEY).read_bytes())
            await asyncio.sleep(0.1)
            assert chain(cache.get(FRONTEND))[1] == third.cert and not follow.done()
        finally:
            follow.cancel()
            await rec.close()

    asyncio.run(scenario())
