"""A TCP canary's built-in success rate from real Envoys through a real Prometheus (Debian's package):
the demo echo app (`--tcp-echo`) behind a sidecar's TCP inbound listener (tcp_proxy to `inbound|app`, as
render builds it), healthy, closing half its connections unanswered (FAIL_RATE 0.5), and not listening."""

from __future__ import annotations

import functools
import random
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mesh.probe import wait_http
from mesh.render.tcp import inbound_listener
from mesh.xds.snapshot import Snapshot
from reconciler.demo.app import DemoConfig, TcpEchoServer
from reconciler.runtime.local.prometheus import DiscoveryServer, LocalPrometheus
from rollouts.analysis import TCP_QUERIES, compare_data, observe
from rollouts.intent import RolloutSpec
from rollouts.provider import NoValuesFound, PrometheusProvider, ProviderError
from tests.fixtures import waiting

if TYPE_CHECKING:
    from conftest import EnvoyProcess

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus missing")]

LOOPBACK = "127.0.0.1"
CONNECTIONS = 100
SEED = 14


@pytest.fixture
def echo() -> Iterator[Any]:
    """Start demo echo apps in-process; each one's failures drawn from its own seeded generator, so the
    connections it closes unanswered can be counted in advance."""
    servers: list[TcpEchoServer] = []

    def start(version: str, fail_rate: float) -> int:
        server = TcpEchoServer(DemoConfig(host=LOOPBACK, port=0, mode="tcp-echo", version=version,
                                          instance=f"echo-{version}-0", fail_rate=fail_rate))
        server.rng = random.Random(SEED)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        return server.port

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


wait_for = functools.partial(waiting.wait_for, interval=0.2, tolerate=(NoValuesFound, ProviderError, OSError))
"""A query's answer: no series yet, or Prometheus still starting, is "not yet"."""


def inbound(listen: int, app_port: int) -> Snapshot:
    """A TCP service's sidecar inbound side: render's tcp_proxy listener -> the `inbound|app` cluster."""
    listener = inbound_listener({"name": "inbound", "address": {"socket_address": {
        "address": LOOPBACK, "port_value": listen}}})
    return Snapshot.of(listeners=[listener], clusters=[{
        "name": "inbound|app", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "inbound|app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": LOOPBACK, "port_value": app_port}}}}]}]}}])


def talk(port: int) -> bool:
    """One client session: a line out, its echo back, then the client closes first. False when the
    connection ended without an echo."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        try:
            conn.sendall(b"hello\n")
            reply = b""
            while not reply.endswith(b"\n") and (chunk := conn.recv(256)):
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            return False
        return reply.endswith(b" hello\n")


def test_tcp_success_rate_from_real_envoys_through_real_prometheus(
    control_plane: Any, envoy: Any, echo: Any, tmp_path: Path
) -> None:
    from conftest import free_port

    started = time.monotonic()
    unused = free_port()  # v3's app is not listening: every connection is refused
    apps = {"v1": echo("v1", 0.0), "v2": echo("v2", 0.5), "v3": unused}
    proxies: dict[str, tuple[EnvoyProcess, int]] = {}
    for version, app_port in apps.items():
        node, listen = f"echo-{version}-0", free_port()
        control_plane.set(node, inbound(listen, app_port))
        proxies[version] = (envoy(node_id=node, xds_port=control_plane.port), listen)
    for proc, listen in proxies.values():  # listening, without a probe connection that would count
        wait_for("the inbound listener", lambda p=proc, port=listen: f"inbound::{LOOPBACK}:{port}" in p.admin(
            "/listeners"), timeout=10)

    targets = [{"targets": [f"{LOOPBACK}:{proc.stats_port}"], "labels": {
        "__metrics_path__": "/stats/prometheus", "cluster": "east", "kind": "sidecar", "service": "echo",
        "version": version, "namespace": "shop"}} for version, (proc, _) in proxies.items()]
    sd = DiscoveryServer(address=LOOPBACK, targets=lambda: targets)
    control_plane.run(sd.start())
    prom = LocalPrometheus(cluster="east", address=LOOPBACK, port=free_port(), sd_url=sd.url, state_dir=tmp_path)
    provider = PrometheusProvider(prom.url, timeout=1.0)
    control_plane.run(prom.start())
    try:
        control_plane.run(wait_http(f"{prom.url}/-/ready", timeout=30), timeout=40)

        def scraped(counter: str, version: str) -> float:
            return provider.query(f'sum(envoy_cluster_upstream_cx_{counter}{{version="{version}",'
                                  'envoy_cluster_name="inbound|app"})')

        # Envoy creates a cluster's traffic counters at its first connection (mesh.envoy.DEFERRED_STATS), all
        # of them at once: one warm-up connection each, scraped, is every series' first sample, so increase()
        # extrapolates them alike and the ratios are exact (as a canary's first whole window is, after the
        # partial one its counters appeared in).
        warm = {v: talk(listen) for v, (_, listen) in proxies.items()}
        wait_for("every sidecar scraped", lambda: all(scraped("total", v) == 1 for v in proxies))
        answered = {v: sum(talk(listen) for _ in range(CONNECTIONS)) for v, (_, listen) in proxies.items()}
        draws = random.Random(SEED)
        assert warm["v2"] is not (draws.random() < 0.5) and warm["v1"] and not warm["v3"]  # the warm-up's draw
        unanswered = sum(draws.random() < 0.5 for _ in range(CONNECTIONS))  # what v2's app will have closed
        assert answered == {"v1": CONNECTIONS, "v2": CONNECTIONS - unanswered, "v3": 0}
        wait_for("every connection closed and scraped",
                 lambda: all(scraped("destroy", v) >= CONNECTIONS for v in proxies))
        stats = proxies["v2"][0].stats("cluster.inbound|app.upstream_cx_destroy_")  # the sidecar's own count
        assert stats["cluster.inbound|app.upstream_cx_destroy_local"] == unanswered + (not warm["v2"]), stats

        spec = RolloutSpec.model_validate({"service": "echo", "stable": "v1", "canary": "v2", "interval": "60s",
                                           "analysis": {"minRequests": 50, "metrics": [
                                               {"name": "ok", "builtin": "request-success-rate", "min": 99}]}})
        rate = {}
        for version in proxies:
            obs = observe(spec=spec, namespace="shop", canary=version, providers={"east": provider}, protocol="TCP")
            assert obs.online and obs.errors == {}, obs
            requests = obs.requests["east"]
            assert requests is not None and requests >= CONNECTIONS, obs  # connections, as minRequests counts
            rate[version] = obs.values["ok"]["east"]
        assert 35 < 100 * (1 - unanswered / CONNECTIONS) < 65  # the seed draws about half
        assert rate["v2"] == pytest.approx(100 * (1 - unanswered / CONNECTIONS), abs=0.5), rate
        assert rate["v1"] == pytest.approx(100.0) and rate["v3"] == pytest.approx(0.0), rate  # refused: once each
        print(f"success rates: {rate} ({unanswered} of {CONNECTIONS} closed unanswered by v2)")

        # The comparison with the stable counts the same connections, for both versions at one instant (a
        # whole second: the first ones may precede the scrape that saw the connections).
        variables = {"service": "echo", "version": "v2", "namespace": "shop", "cluster": "east"}

        def compared() -> tuple[float, float, float, float] | None:
            counts = compare_data(spec.analysis.metrics[0], provider, variables=variables, baseline="v1",
                                  window_s=60, step=1.0, end=float(int(time.time())), queries=TCP_QUERIES).counts
            return counts if counts is not None and min(counts[1], counts[3]) >= CONNECTIONS else None

        counts = wait_for("both versions' connections at one instant", compared, timeout=10)
        assert counts[2] == 0, counts
        assert counts[0] / counts[1] == pytest.approx(unanswered / CONNECTIONS, abs=0.005), counts

        # Judged as HTTP, the same canary has no data: its sidecar has no HTTP requests to count.
        http = observe(spec=spec, namespace="shop", canary="v2", providers={"east": provider})
        assert http.requests["east"] is None and http.values["ok"]["east"] is None, http
        print(f"measured in {time.monotonic() - started:.1f} s")
    finally:
        control_plane.run(prom.stop())
        control_plane.run(sd.stop())
        provider.close()
