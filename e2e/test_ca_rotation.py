"""The root key offline, and every rotation under load through real Envoys, as an operator runs them.

`lockgate up --ca-dir DIR` with only the intermediates and the root certificate in DIR; mTLS STRICT between
sidecars, and one request per upstream connection (TrafficPolicy `maxRequestsPerConnection: 1`), so every
request through the ingress is two fresh mTLS handshakes: ingress -> frontend's sidecar -> reviews' sidecar.
Under that steady load: an intermediate rotation (`lockgate ca rotate-cluster`), then a root rotation in two
steps (`lockgate ca rotate-root`, `lockgate ca finish-root-rotation`), with the new root's key offline too.
Not one request may fail, every proxy's issuer must change each time, and the bundle ends with one root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import os
import shutil
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from e2e.harness import Client, Up, commit_file, lockgate, running, wait_for
from multicluster import ca

pytestmark = pytest.mark.e2e

HEAD = "apiVersion: lockgate.io/v1alpha1\n"
POLICY = HEAD + """kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
---
""" + HEAD + """kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  connectionPool: {http: {maxRequestsPerConnection: 1}}
---
""" + HEAD + """kind: TrafficPolicy
metadata: {name: frontend, namespace: shop}
spec:
  service: frontend
  connectionPool: {http: {maxRequestsPerConnection: 1}}
"""
FRONTEND_ID = "spiffe://example.org/ns/shop/sa/frontend"


def ca_cmd(*args: str | Path) -> str:
    out = lockgate("ca", *map(str, args), check=False)
    assert out.returncode == 0, f"lockgate ca {' '.join(map(str, args))}: {out.stderr}"
    assert "PRIVATE KEY" not in out.stdout + out.stderr
    return out.stdout


def certs(up: Up) -> dict[str, Any]:
    st: dict[str, Any] = up.status()["certs"]
    return st


def all_delivered(up: Up, *, issuer: str, root: str) -> dict[str, Any] | None:
    """The certs section once every proxy holds a certificate issued by `issuer` under `root` (subjects) and
    has ACKed it."""
    st = certs(up)
    ok = st["proxies"] and all(p["issuer"] == [issuer, root] and p["delivered"] for p in st["proxies"])
    return st if ok else None


def subject_of(pem_file: Path) -> str:
    return ca.subject(x509.load_pem_x509_certificates(pem_file.read_bytes())[0])


def only_root(up: Up, *, issuer: str, root: str) -> dict[str, Any] | None:
    """`all_delivered`, and the bundle holds `root` alone."""
    st = all_delivered(up, issuer=issuer, root=root)
    return st if st is not None and [r["subject"] for r in st["trustBundle"]] == [root] else None


def sidecar_call(endpoint: str, tmp: Path, authority: ca.CA, trusted: ca.CA) -> int | str:
    """One GET to a sidecar's inbound port over mTLS, as frontend with a certificate of `authority`, trusting
    only `trusted`'s root for the server: the status, or the error that ended it."""
    cert = ca.issue(authority, spiffe_id=FRONTEND_ID, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(minutes=5))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE ids are URI SANs, not host names
    ctx.load_verify_locations(cadata=ca.pem(ca.anchor_of(trusted)))
    chain, key = tmp / "chain.pem", tmp / "key.pem"
    chain.write_text(cert.cert_chain_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cert.private_key_pem)
    ctx.load_cert_chain(chain, key)
    host, port = endpoint.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=5)
    try:
        conn.request("GET", "/reviews", headers={"Host": "reviews.shop"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


@pytest.mark.timeout(150)
def test_intermediate_and_root_rotations_under_load_drop_nothing(tmp_path: Path) -> None:
    repo, state, ca_dir = tmp_path / "repo", tmp_path / "state", tmp_path / "ca"
    offline, transfer = tmp_path / "offline", tmp_path / "transfer"
    lockgate("init", str(repo))
    sha = commit_file(repo, "security.yaml", POLICY, "mTLS STRICT, one request per connection")
    # The offline machine: the root and east's intermediate. The mesh machine gets east's files only.
    ca_cmd("init", "--out", offline / "root")
    ca_cmd("cluster", "east", "--root", offline / "root", "--out", ca_dir / "east")
    assert not list(ca_dir.rglob(ca.ROOT_KEY))
    old_root = subject_of(offline / "root" / ca.ROOT_CERT)

    with running(repo=repo, state_dir=state, extra=("--ca-dir", str(ca_dir))) as up:
        up.wait_converged(sha)
        first = all_delivered(up, issuer=subject_of(ca_dir / "east" / ca.CA_CERT), root=old_root)
        assert first is not None and len(first["trustBundle"]) == 1
        reviews = next(w for w in up.status()["workloads"] if w["service"] == "reviews")["endpoint"]
        results: Counter[str] = Counter()
        stop = threading.Event()

        def load() -> None:
            client = Client(up.ingress())
            while not stop.is_set():
                try:
                    status, body = client.get("shop.example.com")
                    upstream = body["upstreams"][0]["status"] if isinstance(body, dict) else None
                    results["ok" if status == 200 and upstream == 200 else f"HTTP {status} (reviews {upstream})"] += 1
                except Exception as exc:
                    results[type(exc).__name__] += 1
            client.close()

        settle = Client(up.ingress())
        wait_for("traffic through both hops", lambda: settle.get("shop.example.com")[0] == 200, timeout=15)
        settle.close()
        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        steps: dict[str, float] = {}
        try:
            time.sleep(1)
            # 1. A new intermediate for east, signed where the root key is, installed in the CA directory.
            t0 = time.monotonic()
            ca_cmd("rotate-cluster", "east", "--root", offline / "root", "--ca-dir", ca_dir)
            second = subject_of(ca_dir / "east" / ca.CA_CERT)
            wait_for("every proxy re-issued from the new intermediate",
                     lambda: all_delivered(up, issuer=second, root=old_root), timeout=20)
            steps["intermediate"] = time.monotonic() - t0
            time.sleep(1)
            # 2a. A new root, made offline with east's new intermediate; carried over without its key.
            t0 = time.monotonic()
            ca_cmd("init", "--out", offline / "root2")
            ca_cmd("cluster", "east", "--root", offline / "root2", "--out", transfer / "east")
            shutil.copy(offline / "root2" / ca.ROOT_CERT, transfer / ca.ROOT_CERT)
            ca_cmd("rotate-root", "--new-root", transfer, "--ca-dir", ca_dir, "--state-dir", state)
            new_root = subject_of(offline / "root2" / ca.ROOT_CERT)
            third = subject_of(ca_dir / "east" / ca.CA_CERT)
            during = wait_for("every proxy re-issued under the new root",
                              lambda: all_delivered(up, issuer=third, root=new_root), timeout=20)
            steps["root"] = time.monotonic() - t0
            assert [r["subject"] for r in during["trustBundle"]] == [old_root, new_root]
            # Both roots are trusted now: a client of the old chain still gets in.
            old_chain = ca.new_intermediate(ca.load_root(offline / "root"), cluster="east",
                                            now=dt.datetime.now(dt.UTC))
            new_chain = ca.load_cluster(ca_dir / "east")
            assert sidecar_call(reviews, tmp_path, old_chain, new_chain) == 200
            time.sleep(1)
            # 2b. Every proxy has ACKed its certificate of the new chain: the old root goes.
            t0 = time.monotonic()
            ca_cmd("finish-root-rotation", "--ca-dir", ca_dir, "--state-dir", state)
            final = wait_for("the bundle holds the new root only, delivered everywhere",
                             lambda: only_root(up, issuer=third, root=new_root), timeout=20)
            steps["finish"] = time.monotonic() - t0
            time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
        total = sum(results.values())
        print(f"\n{total} requests {dict(results)}; picked up and delivered in "
              + ", ".join(f"{k} {v:.1f}s" for k, v in steps.items()))
        assert results["ok"] == total and total > 100, results
        assert len(final["trustBundle"]) == 1
        assert {p["issuer"][0] for p in final["proxies"]} == {third} != {p["issuer"][0] for p in first["proxies"]}
        # The old root is gone from the sidecars' bundle: its chains are refused; the new chain is served.
        assert isinstance(sidecar_call(reviews, tmp_path, old_chain, new_chain), str)
        assert sidecar_call(reviews, tmp_path, new_chain, new_chain) == 200
        assert not list(ca_dir.rglob(ca.ROOT_KEY))
        with contextlib.suppress(FileNotFoundError):
            assert "PRIVATE KEY" not in up.log.read_text()
