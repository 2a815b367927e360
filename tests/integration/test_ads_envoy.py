"""The ADS server driving one real Envoy: weight shifts and cluster changes apply quickly, invalid config is
NACKed and the last good config keeps serving."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from mesh.envoy import wait_ready
from mesh.xds.snapshot import CLUSTER, ENDPOINT, HCM, ROUTE, Snapshot

if TYPE_CHECKING:
    from conftest import ControlPlane, EnvoyProcess

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
NODE = "sidecar~web"
ADS = {"ads": {}, "resource_api_version": "V3"}


def snapshot(*, listen: int, ports: dict[str, int], weights: dict[str, int], revision: str,
             bad_regex: bool = False, lb_policy: dict[str, str] | None = None) -> Snapshot:  # fmt: skip
    """One listener -> RDS route `web` -> weighted EDS clusters, one per version (`lb_policy` by version)."""
    lb = lb_policy or {}
    routes: list[dict[str, Any]] = [
        {"match": {"prefix": "/"}, "route": {"weighted_clusters": {
            "clusters": [{"name": v, "weight": w} for v, w in weights.items()]}}},
    ]  # fmt: skip
    if bad_regex:  # parses as a proto; RE2 in Envoy rejects it
        routes.insert(0, {"match": {"safe_regex": {"regex": "("}}, "route": {"cluster": "v1"}})
    hcm = {
        "@type": HCM,
        "stat_prefix": "web",
        "rds": {"route_config_name": "web", "config_source": ADS},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }  # fmt: skip
    return Snapshot.of(
        listeners=[{
            "name": "web",
            "address": {"socket_address": {"address": LOOPBACK, "port_value": listen}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }],
        routes=[{"name": "web", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}],
        clusters=[
            {"name": v, "type": "EDS", "connect_timeout": "1s", "eds_cluster_config": {"eds_config": ADS},
             **({"lb_policy": lb[v]} if v in lb else {})}
            for v in ports
        ],
        endpoints=[
            {"cluster_name": v, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": LOOPBACK, "port_value": port}}}}]}]}
            for v, port in ports.items()
        ],
        revision=revision,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def get(port: int) -> str:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", "/", headers={"Host": "web"})
        response = conn.getresponse()
        return f"{response.status}:{response.read().decode()}"
    finally:
        conn.close()


def sample(port: int, n: int = 20) -> Counter[str]:
    return Counter(get(port) for _ in range(n))


def wait_for(port: int, want: str, timeout: float = 5.0) -> float:
    """Seconds until a request answers `want` (polling), failing after `timeout`."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            last = get(port)
        except OSError as exc:
            last = repr(exc)
        if last == want:
            return time.monotonic() - start
        time.sleep(0.005)
    raise AssertionError(f"no {want!r} from 127.0.0.1:{port} within {timeout}s (last: {last!r})")


@pytest.fixture
def web(control_plane: ControlPlane, backend: Callable[[str], int],
        envoy: Callable[..., EnvoyProcess]) -> tuple[ControlPlane, int, dict[str, int]]:  # fmt: skip
    """A running Envoy for NODE that the control plane knew nothing about when it connected."""
    ports = {"v1": backend("v1"), "v2": backend("v2")}
    # No snapshot yet: the unknown node is answered with an empty set, so Envoy is ready in well under
    # its ~30 s initial-fetch timeout.
    started = time.monotonic()
    envoy(node_id=NODE, xds_port=control_plane.port, ready_timeout=5)
    assert time.monotonic() - started < 5
    return control_plane, free_port(), ports


def test_weight_shift_reaches_envoy(web: tuple[ControlPlane, int, dict[str, int]]) -> None:
    cp, listen, ports = web
    first = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0}, revision="r1")
    cp.set(NODE, first)
    assert cp.wait_converged(NODE, first), cp.status(NODE)
    st = cp.status(NODE)
    assert (st.connected, st.acked_revision, st.nack) == (True, "r1", None)
    wait_for(listen, "200:v1")  # the listener binds once its route arrives
    assert sample(listen) == Counter({"200:v1": 20})

    second = snapshot(listen=listen, ports=ports, weights={"v1": 0, "v2": 100}, revision="r2")
    shifted = time.monotonic()
    cp.set(NODE, second)
    took = wait_for(listen, "200:v2")
    assert took < 1.0, f"weight shift took {took:.3f}s"
    assert sample(listen) == Counter({"200:v2": 20})
    assert cp.wait_converged(NODE, second)
    print(f"weight shift visible after {took * 1000:.1f} ms, converged after "
          f"{(time.monotonic() - shifted) * 1000:.1f} ms")  # fmt: skip
    assert cp.status(NODE).acked_revision == "r2"


def test_invalid_route_is_nacked_and_the_last_good_config_keeps_serving(
    web: tuple[ControlPlane, int, dict[str, int]],
) -> None:
    cp, listen, ports = web
    good = snapshot(listen=listen, ports=ports, weights={"v1": 0, "v2": 100}, revision="good")
    cp.set(NODE, good)
    assert cp.wait_converged(NODE, good)
    wait_for(listen, "200:v2")

    bad = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0}, revision="bad", bad_regex=True)
    cp.set(NODE, bad)
    deadline = time.monotonic() + 5
    while (st := cp.status(NODE)).nack is None and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"NACK message: {st.nack!r}")
    assert st.nack_type == ROUTE
    assert st.nack == "missing ): ("  # RE2's own words, passed through by Envoy
    assert st.nack_resources == tuple(n for n in bad.items(ROUTE) if bad.items(ROUTE)[n] != good.items(ROUTE).get(n))
    assert st.nack_resources  # the route configuration that changed, which Envoy's message does not name
    assert (st.acked_version, st.acked_revision) == (good.version_all, "good")
    assert st.acked[ROUTE] == good.version(ROUTE)
    assert not cp.run(cp.cache.wait_converged(NODE, bad.version_all, timeout=0.3))
    assert sample(listen) == Counter({"200:v2": 20})

    fixed = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0}, revision="fixed")
    cp.set(NODE, fixed)
    assert cp.wait_converged(NODE, fixed)
    st = cp.status(NODE)
    assert (st.acked_revision, st.nack, st.nack_type, st.nack_resources) == ("fixed", None, None, ())
    wait_for(listen, "200:v1")


def test_cluster_change_with_unchanged_endpoints_leaves_warming_at_once(
    control_plane: ControlPlane, backend: Callable[[str], int], envoy: Callable[..., EnvoyProcess],
) -> None:
    """An updated EDS cluster stays warming until an EDS response arrives for it, even if its endpoints are
    unchanged; Envoy asks again with the request it ACKed the last one with, and if that goes unanswered it
    waits out its 15 s initial_fetch_timeout before the new definition serves."""
    cp = control_plane
    ports = {"v1": backend("v1"), "v2": backend("v2")}
    proxy = envoy(node_id=NODE, xds_port=cp.port, ready_timeout=5)
    listen = free_port()
    first = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0}, revision="r1")
    cp.set(NODE, first)
    assert cp.wait_converged(NODE, first)
    wait_for(listen, "200:v1")
    before = proxy.stats("cluster_manager.cds.update_success")["cluster_manager.cds.update_success"]

    second = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0}, revision="r2",
                      lb_policy={"v1": "LEAST_REQUEST"})  # fmt: skip
    assert second.version(CLUSTER) != first.version(CLUSTER)
    assert second.version(ENDPOINT) == first.version(ENDPOINT)  # nothing new to send for EDS
    changed = time.monotonic()
    cp.set(NODE, second)
    # Envoy counts the CDS update and marks the cluster warming in one go, so once the count rose a warming
    # count of 0 means warming is over. 10 s: comfortably under the 15 s an unanswered request costs.
    while True:
        stats = proxy.stats("cluster_manager.")
        if stats["cluster_manager.cds.update_success"] > before and stats["cluster_manager.warming_clusters"] == 0:
            break
        assert time.monotonic() - changed < 10, f"cluster still warming after 10 s: {stats}"
        time.sleep(0.005)
    took = time.monotonic() - changed
    print(f"cluster change active after {took * 1000:.1f} ms")

    timeouts = proxy.stats("init_fetch_timeout")
    assert timeouts["cluster.v1.init_fetch_timeout"] == 0
    assert not {name: n for name, n in timeouts.items() if n}, timeouts
    active = json.loads(proxy.admin("/config_dump?resource=dynamic_active_clusters"))["configs"]
    assert {c["cluster"]["name"]: c["cluster"].get("lb_policy") for c in active} == {"v1": "LEAST_REQUEST", "v2": None}
    assert cp.wait_converged(NODE, second, timeout=1)  # Envoy ACKs the CDS update once warming is over
    assert sample(listen) == Counter({"200:v1": 20})


def flips_under_load(cp: ControlPlane, listen: int, ports: dict[str, int], flips: int = 12) -> Counter[str]:
    """Move the route between two versions `flips` times, each snapshot dropping the cluster the previous
    one routed to, while a client sends requests back to back on one pooled connection (as an app's HTTP
    client would). Returns what came back. Make-before-break: the dropped cluster must outlive the routes
    that named it, or a request in between finds no cluster (Envoy's 503 NC)."""
    first = snapshot(listen=listen, ports={"v1": ports["v1"]}, weights={"v1": 100}, revision="f0")
    cp.set(NODE, first)
    assert cp.wait_converged(NODE, first)
    wait_for(listen, "200:v1")
    seen: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection(LOOPBACK, listen, timeout=2)
        while not stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": "web"})
                response = conn.getresponse()
                body = response.read().decode()
                seen[f"{response.status}:{body}" if response.status == 200 else
                     f"{response.status}:{response.getheader('x-envoy-response-flags', body.strip()[:40])}"] += 1
            except (OSError, http.client.HTTPException) as exc:
                seen[f"error:{type(exc).__name__}"] += 1
                conn.close()
                conn = http.client.HTTPConnection(LOOPBACK, listen, timeout=2)
        conn.close()

    client = threading.Thread(target=load, daemon=True)
    client.start()
    try:
        for i in range(1, flips + 1):
            version = "v2" if i % 2 else "v1"
            snap = snapshot(listen=listen, ports={version: ports[version]}, weights={version: 100}, revision=f"f{i}")
            cp.set(NODE, snap)
            assert cp.wait_converged(NODE, snap), cp.status(NODE)
            time.sleep(0.05)
    finally:
        stop.set()
        client.join(5)
    return seen


def test_a_route_moving_off_a_dropped_cluster_loses_no_request(
        web: tuple[ControlPlane, int, dict[str, int]]) -> None:  # fmt: skip
    cp, listen, ports = web
    seen = flips_under_load(cp, listen, ports)
    print(f"SotW, 12 flips under load: {dict(seen)}")
    assert set(seen) <= {"200:v1", "200:v2"}, seen
    assert seen["200:v1"] > 0 and seen["200:v2"] > 0


def test_a_clusters_traffic_stats_exist_once_it_carries_traffic(
    control_plane: ControlPlane, backend: Callable[[str], int], envoy: Callable[..., EnvoyProcess],
) -> None:
    """Deferred stat creation (`mesh.envoy.DEFERRED_STATS`): a cluster nobody called has no upstream_rq
    counters (what makes 2000 clusters cheap to load); one that carried requests counts them exactly."""
    cp = control_plane
    ports = {"v1": backend("v1"), "v2": backend("v2")}
    proxy = envoy(node_id=NODE, xds_port=cp.port, ready_timeout=5)
    listen = free_port()
    snap = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0}, revision="r1")
    cp.set(NODE, snap)
    assert cp.wait_converged(NODE, snap)
    wait_for(listen, "200:v1")
    before = proxy.stats("upstream_rq_total").get("cluster.v1.upstream_rq_total", 0)
    assert sample(listen, 5) == Counter({"200:v1": 5})
    stats = proxy.stats(".upstream_rq_total")
    assert stats["cluster.v1.upstream_rq_total"] == before + 5
    assert "cluster.v2.upstream_rq_total" not in stats  # never called: never created
    assert proxy.stats("cluster.v2.membership_total")["cluster.v2.membership_total"] == 1  # the cluster is there


def test_an_outbound_cluster_has_its_traffic_stats_without_its_eager_gauges(
    control_plane: ControlPlane, backend: Callable[[str], int], envoy: Callable[..., EnvoyProcess],
) -> None:
    """`mesh.envoy.STATS_MATCHER`: a mesh outbound cluster is created without the 43 stats Envoy gives every
    cluster (membership, lb, circuit breakers, config updates), and still counts the requests it carries;
    any other cluster keeps them. The RDS route configuration has none of its 12 config-update stats, and
    its HTTP connection manager still counts requests."""
    cp = control_plane
    v1, v2, other = "outbound|web.shop|v1", "outbound|web.shop|v2", "other"
    ports = {v1: backend("v1"), v2: backend("v2"), other: backend("other")}
    proxy = envoy(node_id=NODE, xds_port=cp.port, ready_timeout=5)
    listen = free_port()
    snap = snapshot(listen=listen, ports=ports, weights={v1: 100, v2: 0, other: 0}, revision="r1")
    cp.set(NODE, snap)
    assert cp.wait_converged(NODE, snap)
    wait_for(listen, "200:v1")
    before = proxy.stats("upstream_rq_total").get(f"cluster.{v1}.upstream_rq_total", 0)
    assert sample(listen, 5) == Counter({"200:v1": 5})
    stats = proxy.stats("cluster.")
    assert stats[f"cluster.{v1}.upstream_rq_total"] == before + 5
    assert stats[f"cluster.{other}.membership_total"] == 1  # not a mesh outbound cluster: every stat
    for name in (v1, v2):
        eager = sorted(k for k in stats if k.startswith(f"cluster.{name}.") and k.rsplit(".", 1)[1].startswith(
            ("membership_", "lb_", "update_", "assignment_", "version", "warming_state", "max_host_weight",
             "init_fetch_timeout")))
        assert eager == [], eager
        assert not any(k.startswith(f"cluster.{name}.circuit_breakers.") for k in stats)
    http = proxy.stats("http.web.")
    assert http["http.web.downstream_rq_total"] >= 5
    assert sorted(k for k in http if k.startswith("http.web.rds.")) == []


def test_wait_ready_names_the_address_when_it_gives_up() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(TimeoutError, match=rf"Envoy admin at 127\.0\.0\.1:{port} not ready after 0\.2s"):
        asyncio.run(wait_ready(LOOPBACK, port, timeout=0.2))
