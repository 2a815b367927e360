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
import math
import os
import socket
import ssl
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from e2e.harness import Client, Up, commit_file, envoy_stats, git, lockgate, running, wait_for
from mesh.envoy import admin_request
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


def test_authorization_policy_from_git_applies_within_seconds(mesh: tuple[Up, Path]) -> None:
    up, repo = mesh
    client = Client(up.ingress())
    assert _frontend_to_reviews(client) == 200
    t0 = commit(up, repo, policies(STRICT, ALLOW, DENY_FRONTEND), "reviews: deny frontend")
    wait_for("frontend -> reviews to be denied", lambda: _frontend_to_reviews(client) == 403, timeout=5)
    denied_after = time.monotonic() - t0
    print(f"AuthorizationPolicy commit -> 403: {denied_after * 1000:.0f} ms")
    assert denied_after < 5.0, f"403 only {denied_after:.3f}s after the commit"  # a generous bound, not a target
    status, body = client.get("reviews.example.com")  # the ingress's own identity is still allowed
    assert status == 200 and body["service"] == "reviews", body
    t0 = commit(up, repo, policies(STRICT, ALLOW), "reviews: frontend may call again")
    wait_for("frontend -> reviews to be allowed", lambda: _frontend_to_reviews(client) == 200, timeout=5)
    allowed_after = time.monotonic() - t0
    print(f"AuthorizationPolicy removed -> 200: {allowed_after * 1000:.0f} ms")
    assert allowed_after < 5.0, f"200 only {allowed_after:.3f}s after the commit"  # a generous bound, not a target
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
    # One bucket of 5 per reviews-v1 sidecar (the ingress sends reviews.example.com to v1), no refill yet. The
    # bucket comes with the route configuration, so the ingress's connections opened before the commit meet
    # it on their next request: not one request more.
    assert set(seen) == {200, 429} and seen[200] == 5 * len(v1), seen
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


# --- revocation on the next request ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float
    """time.monotonic() just before the request was written."""
    status: int | str
    """The HTTP status (for the mesh path: the status frontend got from reviews), or the error."""
    conn: int = 1
    """Which connection carried it: 1 is the first this caller opened."""


class Caller:
    """frontend's identity on one keep-alive mTLS connection to a sidecar's inbound port, reopened only
    when the sidecar closes it (and then counted): what a caller's sidecar keeps in its upstream pool."""

    def __init__(self, endpoint: str, ctx: ssl.SSLContext) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=5)
        self.opened = 0

    def get(self) -> Answer:
        if self.conn.sock is None:  # http.client drops the socket when the server says `connection: close`
            self.conn.connect()
            self.opened += 1
        sent = time.monotonic()
        try:
            self.conn.request("GET", "/reviews", headers={"Host": "reviews.shop"})
            resp = self.conn.getresponse()
            resp.read()
            return Answer(sent, resp.status, self.opened)
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            return Answer(sent, f"{type(exc).__name__}: {exc}", self.opened)

    def close(self) -> None:
        self.conn.close()


def acked_at(up: Up, nodes: set[str], sha: str, timeout: float = 15.0) -> float:
    """The moment this test saw the last of `nodes` ACK `sha` in status.json (what `status --json` prints),
    polled every 2 ms. Taken after the read, so every one of those ACKs happened before it."""
    path, seen = up.state_dir / "status.json", set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            st = json.loads(path.read_text())
            now = time.monotonic()
            seen = {p["id"] for c in st["clusters"] for p in c["proxies"]
                    if p["id"] in nodes and p["ackedRevision"] == sha}
            if seen == nodes:
                return now
        time.sleep(0.002)
    raise TimeoutError(f"{sorted(nodes - seen)} did not ACK {sha[:12]} within {timeout:.0f}s")


def _load(answers: list[Answer], stop: threading.Event, get: Callable[[], Answer]) -> None:
    while not stop.is_set():
        answers.append(get())


def _through_the_mesh(client: Client) -> Answer:
    sent = time.monotonic()
    try:
        return Answer(sent, _frontend_to_reviews(client))
    except (OSError, http.client.HTTPException) as exc:
        return Answer(sent, type(exc).__name__)


def _after(answers: list[Answer], start: float, end: float = math.inf) -> list[Answer]:
    """Requests sent after `start` (an observed ACK) and before `end`: requests in flight at `start` were
    sent before it and may have met either configuration, so they are not counted."""
    return [a for a in answers if start < a.sent < end]


def _figures(what: str, answers: list[Answer], committed: float, ack: float, want: int) -> str:
    """The counts the assertions judge (sent after the ACK), and for context those sent between the commit
    and the ACK (either answer is right for them)."""
    after = _after(answers, ack)
    wrong = [a for a in after if a.status != want]
    last = f", the last sent {1000 * (max(a.sent for a in wrong) - ack):.0f} ms after the ACK" if wrong else ""
    between = _after(answers, committed, ack)
    old = [a.sent for a in between if a.status != want]
    until = f" (the last {1000 * (max(old) - committed):.0f} ms after the commit)" if old else ""
    return (f"{what}: {len(after)} sent after the ACK, {len(wrong)} not {want}{last}; commit -> ACK "
            f"{1000 * (ack - committed):.0f} ms, {len(old)} of {len(between)} sent meanwhile not {want}{until}")


@pytest.mark.timeout(120)
def test_revocation_applies_to_the_next_request_on_open_connections(mesh: tuple[Up, Path], tmp_path: Path) -> None:
    """A DENY for frontend, once ACKed, answers 403 to the very next request on connections opened before it:
    a busy keep-alive connection, an idle pooled one, and frontend's own sidecar's pool (through the ingress);
    lifting it answers 200 the same way. Requests sent after the ACK was seen are counted; none may differ."""
    up, repo = mesh
    path = repo / POLICY_FILE
    if not path.exists() or path.read_text() != policies(STRICT, ALLOW):  # run alone, or after other tests
        commit(up, repo, policies(STRICT, ALLOW), "reviews: only frontend and the ingress may call")
    st = up.status()
    target = reviews(up)
    every_reviews = {w["id"] for w in st["workloads"] if w["service"] == "reviews"}
    authority = east_ca(up)
    ctx = client_context(tmp_path, issue(authority, f"spiffe://{TD}/ns/shop/sa/frontend"),
                         "".join(ca.pem(r) for r in authority.roots))
    busy, idle, front = Caller(target["endpoint"], ctx), Caller(target["endpoint"], ctx), Client(up.ingress())
    direct: list[Answer] = []
    meshed: list[Answer] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(direct, stop, busy.get), daemon=True),
               threading.Thread(target=_load, args=(meshed, stop, lambda: _through_the_mesh(front)), daemon=True)]
    try:
        for t in threads:
            t.start()
        wait_for("steady 200s on both paths", lambda: len(direct) > 20 and len(meshed) > 5 and {
            a.status for a in direct[-20:] + meshed[-5:]} == {200}, timeout=10)

        idle_used = idle.get()
        assert idle_used.status == 200
        denied_commit = time.monotonic()
        sha = commit_file(repo, POLICY_FILE, policies(STRICT, ALLOW, DENY_FRONTEND), "reviews: deny frontend")
        denied_ack = acked_at(up, {target["id"]}, sha)
        denied_all = acked_at(up, every_reviews, sha)
        time.sleep(max(0.0, idle_used.sent + 2.0 - time.monotonic()))
        idle_denied = idle.get()  # idle for 2 s across the ACK, then used again
        time.sleep(max(0.0, denied_all + 1.0 - time.monotonic()))

        idle_before = idle.get()
        lifted_commit = time.monotonic()
        sha = commit_file(repo, POLICY_FILE, policies(STRICT, ALLOW), "reviews: frontend may call again")
        allowed_ack = acked_at(up, {target["id"]}, sha)
        allowed_all = acked_at(up, every_reviews, sha)
        time.sleep(max(0.0, idle_before.sent + 2.0 - time.monotonic()))
        idle_allowed = idle.get()
        time.sleep(max(0.0, allowed_all + 1.0 - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        busy.close()
        idle.close()
        front.close()

    deny_direct, deny_mesh = _after(direct, denied_ack, lifted_commit), _after(meshed, denied_all, lifted_commit)
    allow_direct, allow_mesh = _after(direct, allowed_ack), _after(meshed, allowed_all)
    denied_direct, denied_mesh = _after(direct, 0, lifted_commit), _after(meshed, 0, lifted_commit)
    print("\n" + "\n".join([
        _figures("DENY, busy keep-alive connection", denied_direct, denied_commit, denied_ack, 403),
        _figures("DENY, through frontend's sidecar", denied_mesh, denied_commit, denied_all, 403),
        f"DENY, pooled connection idle 2 s: {idle_denied.status} on connection {idle_denied.conn}",
        _figures("re-ALLOW, busy keep-alive connection", direct, lifted_commit, allowed_ack, 200),
        _figures("re-ALLOW, through frontend's sidecar", meshed, lifted_commit, allowed_all, 200),
        f"re-ALLOW, pooled connection idle 2 s: {idle_allowed.status} on connection {idle_allowed.conn}",
        f"connections the busy caller opened: {busy.opened}"]))
    assert len(deny_direct) > 20 and len(deny_mesh) > 5 and len(allow_direct) > 20 and len(allow_mesh) > 5
    assert [a for a in deny_direct if a.status != 403] == [], "allowed after the DENY was ACKed"
    assert [a for a in deny_mesh if a.status != 403] == [], "allowed after the DENY was ACKed"
    assert [a for a in allow_direct if a.status != 200] == [], "denied after the re-ALLOW was ACKed"
    assert [a for a in allow_mesh if a.status != 200] == [], "denied after the re-ALLOW was ACKed"
    # The idle connection is the one opened first: the ACKed policy met it on its next request.
    assert (idle_denied.status, idle_denied.conn) == (403, 1), idle_denied
    assert (idle_allowed.status, idle_allowed.conn) == (200, 1), idle_allowed
    assert busy.opened == 1, "the busy connection was closed and reopened"


def envoy_serials(admin: str) -> set[int]:
    """Serial numbers of the workload certificates this Envoy holds right now (its admin /certs)."""
    data = json.loads(admin_request(admin, "/certs", timeout=2)[1])
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

    # Start counting only once frontend -> reviews answers 200 steadily (the previous tests' policies and
    # buckets are lifted).
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
