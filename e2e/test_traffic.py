"""Traffic management end to end: Route (VirtualService) and TrafficPolicy (DestinationRule) semantics
enforced by real Envoys, observed at the ingress and in the proxies' own stats.

One mesh for the whole module (`lockgate init`, the template replaced by the intent below, `lockgate up`):
starting ten Envoys once keeps the file well under a minute. Every request loop is bounded, and every
statistical bound is several standard deviations wide.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from e2e.harness import Up, envoy_stats, git, lockgate, proxy_admin, request, running, wait_for
from mesh.envoy import admin_request
from mesh.render.context import NOT_FOUND_BODY

pytestmark = pytest.mark.e2e

WEB, POOL, BACKEND = "web.example.com", "pool.example.com", "backend.example.com"
REPLICAS, FRONT = "replicas.example.com", "front.example.com"

INTENT = """\
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: web, namespace: e2e}
spec:
  ports: [{name: http, port: 8080}]
  versions: [v1, v2, flaky, slow, shadow]
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: pool, namespace: e2e}
spec:
  ports: [{name: http, port: 8080}]
  versions: [v1]
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: backend, namespace: e2e}
spec:
  ports: [{name: http, port: 8080}]
  versions: [v1]
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: web, namespace: e2e}
spec:
  service: web
  hosts: [web.example.com]
  http:
    - name: canary
      match:
        - headers: {x-canary: {exact: "yes"}}
        - queryParams: {canary: {present: true}}
      route: [{version: v2}]
    - name: abort
      match: [{uri: {exact: /abort}}]
      fault: {abort: {percentage: 30, httpStatus: 418}}
      route: [{version: v1}]
    - name: delay
      match: [{uri: {exact: /delay}}]
      fault: {delay: {percentage: 100, fixedDelay: 300ms}}
      route: [{version: v1}]
    - name: retried
      match: [{uri: {exact: /flaky}}]
      retries: {attempts: 5, retryOn: 5xx, backoff: {baseInterval: 2ms, maxInterval: 10ms}}
      route: [{version: flaky}]
    - name: not-retried
      match: [{uri: {exact: /flaky-raw}}]
      route: [{version: flaky}]
    - name: timeout
      match: [{uri: {exact: /slow}}]
      timeout: 200ms
      route: [{version: slow}]
    - name: mirrored
      match: [{uri: {exact: /mirror}}]
      mirror: {version: shadow, percentage: 100}
      route: [{version: v1}]
    - name: rewritten
      match: [{uri: {prefix: /api/}}]
      rewrite: {uri: /internal/}
      headers: {response: {set: {x-route: rewritten}}, request: {set: {x-added: "1"}}}
      route: [{version: v1}]
    - name: moved
      match: [{uri: {exact: /old}}]
      redirect: {uri: /new, redirectCode: 302}
    - name: teapot
      match: [{uri: {exact: /teapot}}]
      directResponse: {status: 418, body: "short and stout\\n"}
    - name: default
      route: [{version: v1}]
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: pool, namespace: e2e}
spec:
  service: pool
  hosts: [pool.example.com]
  http: [{route: [{version: v1}]}]
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: backend, namespace: e2e}
spec:
  service: backend
  hosts: [backend.example.com]
  http: [{route: [{version: v1}]}]
---
apiVersion: lockgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: pool, namespace: e2e}
spec:
  service: pool
  connectionPool:
    tcp: {maxConnections: 1}
    http: {http1MaxPendingRequests: 1}
---
apiVersion: lockgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: e2e}
spec:
  service: backend
  loadBalancer: {simple: ROUND_ROBIN}
  outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
---
# Only the `idempotent` rule sets retries: every other route of these two gets the mesh's defaults.
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: replicas, namespace: e2e}
spec:
  ports: [{name: http, port: 8080}]
  versions: [v1]
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: replicas, namespace: e2e}
spec:
  service: replicas
  hosts: [replicas.example.com]
  http:
    - name: idempotent
      match: [{uri: {prefix: /idempotent}}]
      retries: {attempts: 2, retryOn: "connect-failure,refused-stream,unavailable,cancelled,503,reset"}
      route: [{version: v1}]
    - name: default
      route: [{version: v1}]
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: front, namespace: e2e}
spec:
  ports: [{name: http, port: 8080}]
  versions: [v1]
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: front, namespace: e2e}
spec:
  service: front
  hosts: [front.example.com]
  http: [{route: [{version: v1}]}]
"""


def _workload(name: str, service: str, version: str, *, replicas: int = 1, env: str = "{}") -> str:
    return (f"apiVersion: lockgate.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: e2e}}\n"
            f"spec:\n  service: {service}\n  version: {version}\n  replicas: {replicas}\n  clusters: [east]\n"
            f"  command: [lockgate, demo-app]\n  env: {env}\n  egress: []\n")


WORKLOADS = "---\n".join([
    _workload("web-v1", "web", "v1"),
    _workload("web-v2", "web", "v2"),
    _workload("web-flaky", "web", "flaky", env='{FAIL_RATE: "0.5"}'),
    _workload("web-slow", "web", "slow", env='{LATENCY_MS: "1000"}'),
    _workload("web-shadow", "web", "shadow"),
    _workload("pool-v1", "pool", "v1", env='{LATENCY_MS: "500"}'),
    # Two workloads of one version: the cluster outbound|backend.e2e|v1 holds 2 healthy instances, 1 failing.
    _workload("backend-ok", "backend", "v1", replicas=2),
    _workload("backend-bad", "backend", "v1", env='{FAIL_RATE: "1"}'),
    _workload("replicas-v1", "replicas", "v1", replicas=2),
    # Calls `replicas` through its own sidecar on every request: the sidecar outbound path.
    "apiVersion: lockgate.io/v1alpha1\nkind: Workload\nmetadata: {name: front-v1, namespace: e2e}\n"
    "spec:\n  service: front\n  version: v1\n  replicas: 1\n  clusters: [east]\n"
    "  command: [lockgate, demo-app, --call, 'http://replicas.e2e:8080/']\n  egress: [replicas]\n",
])


class Mesh:
    def __init__(self, up: Up, status: dict[str, Any]) -> None:
        self.up, self.status = up, status
        self.ingress = up.ingress()

    def get(self, host: str, path: str = "/", headers: dict[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
        return request(self.ingress, host, path, headers, timeout=timeout)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("traffic")
    repo = tmp / "mesh-repo"
    lockgate("init", str(repo))
    git(repo, "rm", "-q", "routes.yaml", "services.yaml", "workloads.yaml")
    (repo / "traffic.yaml").write_text(INTENT)
    (repo / "workloads.yaml").write_text(WORKLOADS)
    assert lockgate("validate", str(repo), check=False).stderr == ""
    git(repo, "add", "traffic.yaml", "workloads.yaml")
    git(repo, "commit", "-q", "-m", "traffic management scenarios")
    head = git(repo, "rev-parse", "HEAD")
    with running(repo=repo, state_dir=tmp / "state") as up:
        status = up.wait_converged(head, timeout=60)
        assert all(p["nack"] is None for c in status["clusters"] for p in c["proxies"]), status
        yield Mesh(up, status)


def version(body: Any) -> str | None:
    return body.get("version") if isinstance(body, dict) else None


def test_header_and_query_matches_send_only_matching_requests_to_v2(mesh: Mesh) -> None:
    plain = Counter(version(mesh.get(WEB, "/")[2]) for _ in range(30))
    by_header = Counter(version(mesh.get(WEB, "/", {"x-canary": "yes"})[2]) for _ in range(30))
    wrong_value = Counter(version(mesh.get(WEB, "/", {"x-canary": "no"})[2]) for _ in range(30))
    by_query = Counter(version(mesh.get(WEB, "/?canary=")[2]) for _ in range(30))
    assert plain == {"v1": 30}
    assert by_header == {"v2": 30}
    assert wrong_value == {"v1": 30}
    assert by_query == {"v2": 30}


def test_the_ingress_finds_a_host_whatever_its_case_and_port(mesh: Mesh) -> None:
    """The ingress's routes are cut per host (one route configuration each, picked by a scope keyed on the
    host: issue 15). A scope key matches exactly, so the ingress lowercases the host first: host names are
    case-insensitive, as Envoy's own virtual host matching is."""
    dump = json.loads(admin_request(proxy_admin(mesh.status), "/config_dump")[1])
    scoped = [c for c in dump["configs"] if c["@type"].endswith("ScopedRoutesConfigDump")]
    held = {scope["name"] for c in scoped for group in c.get("dynamic_scoped_route_configs", [])
            for scope in group.get("scoped_route_configs", [])}
    assert {f"ingress|{WEB}", f"ingress|{FRONT}"} <= held
    port = mesh.ingress[1]
    for host in (WEB, WEB.upper(), "Web.Example.Com", f"{WEB}:{port}", f"WEB.example.COM:{port}"):
        status, _, body = mesh.get(host)
        assert (status, version(body)) == (200, "v1"), host
    assert mesh.get("nobody.example.com")[::2] == (404, NOT_FOUND_BODY)
    assert mesh.get(f"nobody.{WEB}")[::2] == (404, NOT_FOUND_BODY)  # an exact host covers no subdomain


def test_fault_abort_hits_its_percentage(mesh: Mesh) -> None:
    n = 300
    seen = Counter(mesh.get(WEB, "/abort")[0] for _ in range(n))
    assert set(seen) <= {200, 418}, seen
    # 30% of 300: mean 90, sd 7.9; 55..125 is more than 4 sd either way.
    assert 55 <= seen[418] <= 125, seen


def test_fault_delay_holds_every_request(mesh: Mesh) -> None:
    for _ in range(3):
        t0 = time.monotonic()
        status, _, body = mesh.get(WEB, "/delay")
        elapsed = time.monotonic() - t0
        assert status == 200 and version(body) == "v1"
        # Envoy's timers tick in whole milliseconds off a clock read once per event-loop turn: a 300 ms
        # delay was seen to take 299.3 ms from here, so allow 5 ms of that granularity.
        assert elapsed >= 0.295, elapsed
    t0 = time.monotonic()
    assert mesh.get(WEB, "/")[0] == 200
    assert time.monotonic() - t0 < 0.3  # the delay is the rule's, not the path's


def test_retries_recover_from_a_flaky_version(mesh: Mesh) -> None:
    n = 80
    raw = Counter(mesh.get(WEB, "/flaky-raw")[0] for _ in range(n))
    retried = Counter(mesh.get(WEB, "/flaky")[0] for _ in range(n))
    # Without retries half fail: mean 40, sd 4.5.
    assert set(raw) == {200, 500} and 20 <= raw[500] <= 60, raw
    # Six tries each: a request fails with p = 0.5^6 = 1.6%, mean 1.25 of 80; 7 or more is ~0.02%.
    assert set(retried) <= {200, 500} and retried[500] <= 6, retried


def test_timeout_answers_504_before_the_slow_version_does(mesh: Mesh) -> None:
    for _ in range(2):
        t0 = time.monotonic()
        status, _, body = mesh.get(WEB, "/slow")
        elapsed = time.monotonic() - t0
        assert status == 504, (status, body)
        assert 0.195 <= elapsed < 0.9, elapsed  # the app would take 1 s; 5 ms for Envoy's timer granularity


def test_mirror_copies_requests_and_the_caller_sees_only_the_primary(mesh: Mesh) -> None:
    admin = proxy_admin(mesh.status, service="web", version="shadow")
    key = "cluster.inbound|app.upstream_rq_completed"

    def completed() -> int:
        return envoy_stats(admin, "inbound|app").get(key, 0)

    before = completed()
    for _ in range(20):
        status, _, body = mesh.get(WEB, "/mirror")
        assert status == 200 and version(body) == "v1"
    wait_for("20 mirrored requests at the shadow", lambda: completed() - before >= 20, timeout=10)
    assert completed() - before == 20
    # Nothing else reaches the shadow: plain requests leave its count alone.
    for _ in range(10):
        mesh.get(WEB, "/")
    assert completed() - before == 20


def test_apps_see_the_callers_address(mesh: Mesh) -> None:
    """Found as a new user: apps saw `x-forwarded-for: <this host's own address>` for every caller."""
    import socket

    host_addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    status, _, body = mesh.get(WEB, "/api/things")
    assert status == 200, body
    assert body["forwardedFor"] == "127.0.0.1", body  # the test client's address on loopback
    assert body["forwardedFor"] not in host_addresses - {"127.0.0.1"}


def test_rewrite_headers_redirect_and_direct_response(mesh: Mesh) -> None:
    status, head, body = mesh.get(WEB, "/api/things?x=1")
    assert status == 200 and body["path"] == "/internal/things?x=1", body
    assert head["x-route"] == "rewritten"
    status, head, _ = mesh.get(WEB, "/old")
    assert status == 302 and head["location"].endswith("/new"), head
    status, _, body = mesh.get(WEB, "/teapot")
    assert (status, body) == (418, "short and stout\n")


def test_circuit_breaker_sheds_load_past_the_connection_pool(mesh: Mesh) -> None:
    # One connection, one waiting request; the app takes 500 ms. Eight at once: the rest overflow.
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: mesh.get(POOL, "/"), range(8)))
    ok = [r for r in results if r[0] == 200]
    overloaded = [r for r in results if r[0] == 503 and r[1].get("x-envoy-overloaded") == "true"]
    assert len(ok) + len(overloaded) == 8, [(s, h.get("x-envoy-overloaded")) for s, h, _ in results]
    assert 1 <= len(ok) <= 3 and len(overloaded) >= 5, [s for s, _, _ in results]
    stats = envoy_stats(proxy_admin(mesh.status), "outbound|pool.e2e|v1.")
    assert stats["cluster.outbound|pool.e2e|v1.upstream_rq_pending_overflow"] >= len(overloaded)
    assert mesh.get(POOL, "/")[0] == 200  # a lone request afterwards goes through


def test_outlier_detection_ejects_the_failing_instance(mesh: Mesh) -> None:
    admin = proxy_admin(mesh.status)
    prefix = "cluster.outbound|backend.e2e|v1.outlier_detection."
    first = Counter(mesh.get(BACKEND, "/")[0] for _ in range(30))
    # Round robin over 3 instances: the bad one answers 500 twice in a row and is ejected.
    assert set(first) == {200, 500} and 2 <= first[500] <= 4, first
    stats = envoy_stats(admin, prefix)
    assert stats[prefix + "ejections_active"] == 1, stats
    assert stats[prefix + "ejections_enforced_total"] >= 1, stats
    after = Counter(mesh.get(BACKEND, "/")[0] for _ in range(30))
    assert after == {200: 30}, after


def test_egress_scoping_keeps_outbound_clusters_off_sidecars_that_call_nothing(mesh: Mesh) -> None:
    sidecar = envoy_stats(proxy_admin(mesh.status, service="web", version="v1"), "cluster.outbound|")
    assert sidecar == {}  # `egress: []`: only its inbound cluster
    ingress = envoy_stats(proxy_admin(mesh.status), "cluster.outbound|")
    assert any(name.startswith("cluster.outbound|backend.e2e|v1.") for name in ingress)



IN_FLIGHT = "reset reason: connection termination"
"""How Envoy answers for a request the upstream proxy held when it died: the request may have reached the
app, so only a rule that retries `reset` retries it (not the default: Istio's, which avoids repeating
a request that may have been served)."""

ENDPOINT_LAG_S = 1.0
"""How long the dead instance stays an endpoint. Here lockgate notices a crash within milliseconds; a real
mesh takes seconds to withdraw an endpoint, and until then callers keep picking it."""


def test_killing_a_replicas_sidecar_fails_only_the_request_it_held(mesh: Mesh) -> None:
    """Found: SIGKILLing one of two replicas' sidecars under load gave a handful of 502s: nothing retried
    a connect failure. With the default retries (connect-failure, refused-stream, 503; on another instance)
    every request sent to the dead instance is answered by the other one, through the ingress and through
    a caller's sidecar (front -> replicas), while the endpoint lingers and until the supervisor has
    restarted the killed sidecar. The one request a stream may have had inside it at that instant is the
    only possible failure, and a rule that also retries `reset` loses none."""
    streams = {"ingress": (REPLICAS, "/"), "ingress, rule retrying resets": (REPLICAS, "/idempotent"),
               "front's sidecar": (FRONT, "/")}
    victim = "replicas-v1-0"

    def proxy(status: dict[str, Any], instance: str) -> dict[str, Any]:
        return next(p for c in status["clusters"] for p in c["proxies"] if p["id"] == f"east/e2e/{instance}")

    def ready(status: dict[str, Any], instance: str) -> bool:
        return bool(next(w["ready"] for w in status["workloads"] if w["id"] == f"east/e2e/{instance}"))

    def connect_failures() -> dict[str, int]:
        """Failed connects to replicas, seen by the ingress and by front's sidecar."""
        key = "cluster.outbound|replicas.e2e|v1.upstream_cx_connect_fail"
        return {who: envoy_stats(admin, "outbound|replicas.e2e|v1.").get(key, 0) for who, admin in (
            ("ingress", proxy_admin(mesh.status)), ("front", proxy_admin(mesh.status, service="front")))}

    stop = threading.Event()
    seen: dict[str, Counter[str]] = {name: Counter() for name in streams}

    def stream(name: str) -> None:
        """Requests one after another, each on a fresh connection (no client-side retry hides a failure)."""
        host, path = streams[name]
        out = seen[name]
        while not stop.is_set():
            try:
                status, _, body = mesh.get(host, path, timeout=10)
            except OSError as exc:
                out[f"error {type(exc).__name__}"] += 1
                continue
            if status == 200:
                out[(body if host == REPLICAS else body["upstreams"][0]["body"])["instance"]] += 1
            else:
                text = body if isinstance(body, str) else json.dumps(body)
                out["in flight" if IN_FLIGHT in text else f"HTTP {status}: {text[:300]}"] += 1

    def all_answer(instance: str, *, more_than: dict[str, int]) -> bool:
        return all(seen[name][instance] > more_than[name] for name in seen)

    def restarted(killed_pid: int) -> dict[str, Any] | None:
        """The victim's sidecar entry once a new process runs and the instance is ready again."""
        st = mesh.up.status()
        found = proxy(st, victim)
        fresh = found["pid"] not in (None, killed_pid) and found["state"] == "running"
        return found if fresh and ready(st, victim) else None

    before = proxy(mesh.up.status(), victim)
    assert before["state"] == "running" and before["pid"], before
    failed_connects = connect_failures()
    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        running_streams = [pool.submit(stream, name) for name in streams]
        try:
            none = {name: 0 for name in seen}
            wait_for("both replicas answering every stream",
                     lambda: all_answer(victim, more_than=none) and all_answer("replicas-v1-1", more_than=none),
                     timeout=20)
            os.kill(mesh.up.proc.pid, signal.SIGSTOP)  # lockgate, started by this test: endpoints lag
            try:
                os.kill(before["pid"], signal.SIGKILL)  # that one sidecar, by the PID lockgate reports
                time.sleep(ENDPOINT_LAG_S)
            finally:
                os.kill(mesh.up.proc.pid, signal.SIGCONT)
            after = wait_for("the supervisor to restart the killed sidecar",
                             functools.partial(restarted, before["pid"]), timeout=30)
            # Back in rotation: the restarted instance answers every stream again.
            mark = {name: seen[name][victim] for name in seen}
            wait_for("the restarted replica to answer again", functools.partial(all_answer, victim, more_than=mark),
                     timeout=20)
        finally:
            stop.set()
        for f in running_streams:
            f.result()
    assert after["restarts"] == before["restarts"] + 1, after
    # The dead instance was picked (and refused the connection) on both paths: the retries had work to do.
    assert all(n > failed_connects[who] for who, n in connect_failures().items()), (failed_connects, seen)
    failed = {name: {k: n for k, n in counts.items() if not k.startswith("replicas-v1-")}
              for name, counts in seen.items()}
    assert failed["ingress, rule retrying resets"] == {}, seen
    for name in ("ingress", "front's sidecar"):  # at most the one request each stream had in flight
        assert set(failed[name]) <= {"in flight"} and failed[name].get("in flight", 0) <= 1, seen
    assert all(sum(counts.values()) >= 50 for counts in seen.values()), seen  # streams, not a handful
