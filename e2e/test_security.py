"""Zero trust through real Envoys: mTLS between every pair of proxies, policy from Git, rotation under load.

One mesh (`lockgate up --cert-ttl 20s`) serves every test of this module, in order: each commits the
policy it needs, the way a user would. The client that knocks on a sidecar's inbound port directly is
Python's `ssl`, holding certificates this test issues itself: one from a stranger's root, and ones that
chain to the mesh's root but carry the wrong identity.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from e2e.harness import Client, Up, commit_file, envoy_stats, git, lockgate, running, wait_for
from multicluster import ca
from policies import IssuedCert

pytestmark = pytest.mark.e2e

TD = "example.org"
REVIEWS_ID = f"spiffe://{TD}/ns/shop/sa/reviews"
POLICY_FILE = "security.yaml"
HEAD = "apiVersion: lockgate.io/v1alpha1\n"
STRICT = HEAD + """kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
"""
ALLOW = HEAD + """kind: AuthorizationPolicy
metadata: {name: reviews-callers, namespace: shop}
spec:
  selector: {service: reviews}
  action: ALLOW
  rules:
    - from: [{principals: [example.org/ns/shop/sa/frontend, example.org/ns/lockgate-system/sa/ingress-gateway]}]
"""
DENY_FRONTEND = HEAD + """kind: AuthorizationPolicy
metadata: {name: no-frontend, namespace: shop}
spec:
  selector: {service: reviews}
  action: DENY
  rules:
    - from: [{principals: [example.org/ns/shop/sa/frontend]}]
"""
LIMITS = HEAD + """kind: RateLimit
metadata: {name: reviews, namespace: shop}
spec: {service: reviews, requestsPerUnit: 5, unit: minute}
---
""" + HEAD + """kind: RateLimit
metadata: {name: shop-front-door, namespace: shop}
spec: {service: frontend, rule: default, requestsPerUnit: 3, unit: minute}
"""


def policies(*docs: str) -> str:
    return "---\n".join(docs)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Path]]:
    tmp = tmp_path_factory.mktemp("security")
    repo = tmp / "repo"
    lockgate("init", str(repo))
    with running(repo=repo, state_dir=tmp / "state", extra=("--cert-ttl", "20s")) as up:
        up.wait_converged(git(repo, "rev-parse", "HEAD"))
        yield up, repo


def commit(up: Up, repo: Path, text: str | None, message: str) -> float:
    """Commit the policy file (or remove it); wait until every proxy ACKed. Returns the commit time."""
    t0 = time.monotonic()
    if text is None:
        git(repo, "rm", "-q", POLICY_FILE)
        git(repo, "commit", "-q", "-m", message)
        sha = git(repo, "rev-parse", "HEAD")
    else:
        sha = commit_file(repo, POLICY_FILE, text, message)
    up.wait_converged(sha, timeout=15)
    return t0


def reviews(up: Up) -> dict[str, Any]:
    w: dict[str, Any] = next(w for w in up.status()["workloads"] if w["service"] == "reviews")
    return w


def admin_of(up: Up, node_id: str) -> str:
    return str(next(p["admin"] for c in up.status()["clusters"] for p in c["proxies"] if p["id"] == node_id))


def stats(admin: str, prefix: str = "") -> dict[str, int]:
    """Envoy counters whose names start with `prefix`."""
    return {k: v for k, v in envoy_stats(admin, prefix).items() if k.startswith(prefix)}


def stat_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


# --- a Python TLS client with certificates of our choosing -----------------------------------------------


def east_ca(up: Up) -> ca.CA:
    return ca.load_cluster(up.state_dir / "ca" / "east")


def issue(authority: ca.CA, spiffe_id: str) -> IssuedCert:
    return ca.issue(authority, spiffe_id=spiffe_id, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(minutes=5))


def client_context(tmp: Path, cert: IssuedCert | None, roots: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE ids are URI SANs, checked below instead of a host name
    ctx.load_verify_locations(cadata=roots)
    if cert is not None:
        chain, key = tmp / "chain.pem", tmp / "key.pem"
        chain.write_text(cert.cert_chain_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cert.private_key_pem)
        ctx.load_cert_chain(chain, key)
    return ctx


def call(endpoint: str, ctx: ssl.SSLContext | None) -> tuple[int, str] | str:
    """(status, peer SPIFFE id) for a GET to a sidecar's inbound port, or the error that ended the attempt."""
    host, port = endpoint.rsplit(":", 1)
    conn = (http.client.HTTPSConnection(host, int(port), context=ctx, timeout=5) if ctx is not None
            else http.client.HTTPConnection(host, int(port), timeout=5))
    try:
        conn.request("GET", "/reviews", headers={"Host": "reviews.shop"})
        resp = conn.getresponse()
        resp.read()
        peer = ""
        if isinstance(conn.sock, ssl.SSLSocket):
            der = conn.sock.getpeercert(binary_form=True)
            assert der is not None
            san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
            peer = ",".join(san.value.get_values_for_type(x509.UniformResourceIdentifier))
        return resp.status, peer
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


# --- the tests, in order -----------------------------------------------------------------------------------


def test_plaintext_is_refused_once_strict(mesh: tuple[Up, Path]) -> None:
    up, repo = mesh
    endpoint = reviews(up)["endpoint"]
    assert call(endpoint, None) == (200, "")  # PERMISSIVE (the default) still takes plaintext
    commit(up, repo, STRICT, "shop: STRICT mTLS")
    admin = admin_of(up, reviews(up)["id"])
    before = stats(admin, "listener.")
    result = call(endpoint, None)
    assert isinstance(result, str), f"plaintext got an answer from a STRICT port: {result}"
    delta = stat_delta(before, stats(admin, "listener."))
    assert any(k.endswith(".ssl.connection_error") for k in delta), delta


def test_a_cert_from_another_root_is_refused(mesh: tuple[Up, Path], tmp_path: Path) -> None:
    up, _ = mesh
    w = reviews(up)
    stranger = ca.new_intermediate(ca.new_root(now=dt.datetime.now(dt.UTC)), cluster="east",
                                   now=dt.datetime.now(dt.UTC))
    mesh_roots = "".join(ca.pem(r) for r in east_ca(up).roots)
    forged = issue(stranger, f"spiffe://{TD}/ns/shop/sa/frontend")  # the right name, the wrong root
    admin = admin_of(up, w["id"])
    before = stats(admin, "listener.")
    result = call(w["endpoint"], client_context(tmp_path, forged, mesh_roots))
    assert isinstance(result, str), result
    delta = stat_delta(before, stats(admin, "listener."))
    assert any(k.endswith(".ssl.fail_verify_error") for k in delta), delta


def test_a_valid_chain_with_the_wrong_identity_is_refused(mesh: tuple[Up, Path], tmp_path: Path) -> None:
    up, repo = mesh
    commit(up, repo, policies(STRICT, ALLOW), "reviews: only frontend and the ingress may call")
    w = reviews(up)
    authority = east_ca(up)
    roots = "".join(ca.pem(r) for r in authority.roots)
    admin = admin_of(up, w["id"])

    # The control: a certificate for frontend's identity is accepted, and the sidecar proves it is reviews.
    good = issue(authority, f"spiffe://{TD}/ns/shop/sa/frontend")
    assert call(w["endpoint"], client_context(tmp_path, good, roots)) == (200, REVIEWS_ID)

    # Signed by the mesh's own intermediate, but for another trust domain: the inbound SAN check refuses it.
    before = stats(admin, "listener.")
    outsider = issue(authority, "spiffe://evil.org/ns/shop/sa/frontend")
    result = call(w["endpoint"], client_context(tmp_path, outsider, roots))
    assert isinstance(result, str), result
    delta = stat_delta(before, stats(admin, "listener."))
    assert any(k.endswith(".ssl.fail_verify_san") for k in delta), delta

    # In the trust domain, but an identity the AuthorizationPolicy does not name: 403, counted by RBAC.
    before = stats(admin, "http.inbound.")
    intruder = issue(authority, f"spiffe://{TD}/ns/shop/sa/intruder")
    assert call(w["endpoint"], client_context(tmp_path, intruder, roots)) == (403, REVIEWS_ID)
    delta = stat_delta(before, stats(admin, "http.inbound."))
    assert delta.get("http.inbound.rbac.lockgate_authz_allow.denied") == 1, delta


def _frontend_to_reviews(client: Client) -> int:
    """The status frontend got from reviews (frontend answers 502 when its upstream fails)."""
    status, body = client.get("shop.example.com")
    return int(body["upstreams"][0]["status"]) if isinstance(body, dict) and body.get("upstreams") else status


def test_authorization_policy_from_git_applies_within_a_second(mesh: tuple[Up, Path]) -> None:
    up, repo = mesh
    client = Client(up.ingress())
    assert _frontend_to_reviews(client) == 200
    t0 = commit(up, repo, policies(STRICT, ALLOW, DENY_FRONTEND), "reviews: deny frontend")
    wait_for("frontend -> reviews to be denied", lambda: _frontend_to_reviews(client) == 403, timeout=5)
    denied_after = time.monotonic() - t0
    assert denied_after < 1.0, f"403 only {denied_after:.3f}s after the commit"
    status, body = client.get("reviews.example.com")  # the ingress's own identity is still allowed
    assert status == 200 and body["service"] == "reviews", body
    t0 = commit(up, repo, policies(STRICT, ALLOW), "reviews: frontend may call again")
    wait_for("frontend -> reviews to be allowed", lambda: _frontend_to_reviews(client) == 200, timeout=5)
    allowed_after = time.monotonic() - t0
    assert allowed_after < 1.0, f"200 only {allowed_after:.3f}s after the commit"
    print(f"\ncommit -> 403 seen in {denied_after * 1000:.0f} ms; revert -> 200 in {allowed_after * 1000:.0f} ms")
    client.close()


def test_rate_limit_answers_429_beyond_the_bucket(mesh: tuple[Up, Path]) -> None:
    up, repo = mesh
    commit(up, repo, policies(STRICT, ALLOW, LIMITS), "rate limits")
    client = Client(up.ingress())
    v1 = [w for w in up.status()["workloads"] if w["service"] == "reviews" and w["version"] == "v1"]
    seen: Counter[int] = Counter()
    for _ in range(20):
        client.conn.request("GET", "/", headers={"Host": "reviews.example.com"})
        resp = client.conn.getresponse()
        resp.read()
        seen[resp.status] += 1
        if resp.status == 429:
            assert resp.getheader("x-lockgate-ratelimited") == "true"
    # One bucket of 5 per reviews-v1 sidecar (the ingress sends reviews.example.com to v1), no refill yet.
    # A connection opened before the commit may serve one more request on the old listener config (it is
    # then closed: Envoy runs with --drain-strategy immediate), hence up to one extra 200 per sidecar.
    assert set(seen) == {200, 429} and 5 * len(v1) <= seen[200] <= 6 * len(v1), seen
    limited = sum(stats(admin_of(up, w["id"]), "lockgate_ratelimit.").get(
        "lockgate_ratelimit.http_local_rate_limit.rate_limited", 0) for w in v1)
    assert limited == seen[429]

    # The rule-scoped limit: frontend's `default` rule, a bucket of 3 where that route lives (the ingress).
    # (The 3 that pass reach frontend, whose own calls to reviews find reviews' buckets empty: 502.)
    front: Counter[str] = Counter()
    for _ in range(6):
        client.conn.request("GET", "/", headers={"Host": "shop.example.com"})
        resp = client.conn.getresponse()
        resp.read()
        front["limited" if resp.getheader("x-lockgate-ratelimited") == "true" else "passed"] += 1
    assert front == {"passed": 3, "limited": 3}, front
    client.close()
    commit(up, repo, policies(STRICT, ALLOW), "no rate limits")


def envoy_serials(admin: str) -> set[int]:
    """Serial numbers of the workload certificates this Envoy holds right now (its admin /certs)."""
    host, port = admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", "/certs")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {int(c["serial_number"], 16) for entry in data["certificates"] for c in entry.get("cert_chain", [])}


@pytest.mark.timeout(150)
def test_rotations_under_load_drop_nothing(mesh: tuple[Up, Path], tmp_path: Path) -> None:
    """TTL 20 s: every proxy gets a new certificate every ~10 s. Three rounds under steady load (through
    two mTLS hops: ingress -> frontend's sidecar, frontend's sidecar -> reviews), not one failed request."""
    up, _ = mesh
    st = up.status()
    # Every proxy that holds a certificate (the east-west gateway passes TLS through and holds none).
    admins = {p["id"]: p["admin"] for c in st["clusters"] for p in c["proxies"] if p["kind"] != "eastwest"}
    results: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        client = Client(up.ingress())
        while not stop.is_set():
            try:
                status, body = client.get("shop.example.com")
                upstream = body["upstreams"][0]["status"] if isinstance(body, dict) else None
                results["ok" if status == 200 and upstream == 200 else f"HTTP {status} (reviews: {upstream})"] += 1
            except Exception as exc:
                results[type(exc).__name__] += 1
        client.close()

    # Connections opened under the previous test's rate limits serve one last request on that listener
    # config before closing (Envoy's immediate drain); let them go before counting.
    settle = Client(up.ingress())
    streak = [0]

    def settled() -> bool:
        streak[0] = streak[0] + 1 if _frontend_to_reviews(settle) == 200 else 0
        return streak[0] >= 20

    wait_for("traffic to settle after the last commit", settled, timeout=10, interval=0)
    settle.close()
    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    seen: dict[str, list[int]] = {node: [] for node in admins}
    first_seen: dict[int, float] = {}
    issued: dict[int, float] = {}
    start = time.monotonic()
    try:
        while time.monotonic() - start < 70:
            now = time.time()
            for node, admin in admins.items():
                for serial in envoy_serials(admin):
                    if serial not in first_seen:
                        first_seen[serial] = now
                        seen[node].append(serial)
            with contextlib.suppress(ValueError, OSError):
                status = json.loads((up.state_dir / "status.json").read_text())
                issued.update({int(p["serial"], 16): p["issuedAt"] for p in status["certs"]["proxies"]})
            if all(len(s) >= 4 for s in seen.values()):  # the certificate held at the start + 3 rotations
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    elapsed = time.monotonic() - start
    rotations = {node: len(s) - 1 for node, s in seen.items()}
    delays = sorted(first_seen[s] - issued[s] for node in seen for s in seen[node][1:] if s in issued)
    total = sum(results.values())
    print(f"\n{elapsed:.1f}s, rotations per proxy {rotations}, {total} requests {dict(results)}; issue -> "
          f"served by Envoy: median {1000 * delays[len(delays) // 2]:.0f} ms, max {1000 * delays[-1]:.0f} ms")
    assert all(n >= 3 for n in rotations.values()), rotations
    assert results["ok"] == total and total > 100, results
    assert delays and delays[-1] < 2.0
    # A new handshake gets the newest certificate, and it still chains to the one root.
    w = reviews(up)
    authority = east_ca(up)
    ctx = client_context(tmp_path, issue(authority, f"spiffe://{TD}/ns/shop/sa/frontend"),
                         "".join(ca.pem(r) for r in authority.roots))
    host, port = w["endpoint"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None and x509.load_der_x509_certificate(der).serial_number == seen[w["id"]][-1]


def test_no_private_key_is_readable_logged_or_committed(mesh: tuple[Up, Path]) -> None:
    up, repo = mesh
    keys = sorted((up.state_dir / "ca").rglob("*-key.pem"))
    assert [k.name for k in keys] == ["ca-key.pem", "root-key.pem"]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700, key.parent
    assert stat.S_IMODE((up.state_dir / "ca").stat().st_mode) == 0o700
    everything = [p for p in up.state_dir.parent.rglob("*") if p.is_file() and "-key.pem" not in p.name]
    for path in everything:  # logs, status, Envoy bootstraps, the up log, the intent repo's files
        with contextlib.suppress(OSError):
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    assert "PRIVATE KEY" not in git(repo, "log", "-p", "--all")
    # status and `lockgate certs` say who each proxy is, never with what key.
    out = json.loads(lockgate("certs", "--json", "--state-dir", str(up.state_dir)).stdout)
    assert {p["spiffeId"] for p in out["proxies"]} >= {REVIEWS_ID,
                                                       f"spiffe://{TD}/ns/lockgate-system/sa/ingress-gateway"}
    assert all(p["rotatesIn"] <= 10.5 and p["issuer"][0].startswith("CN=lockgate intermediate CA east")
               for p in out["proxies"])
