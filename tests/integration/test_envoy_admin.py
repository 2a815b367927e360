"""No admin over TCP: a real Envoy's admin listens on a 0600 Unix socket; its stats listener answers
`GET /stats/prometheus` and 404 to everything else; and `POST /quitquitquit` to every TCP port the Envoy
listens on (stats, and a listener from xDS) leaves it running."""

from __future__ import annotations

import http.client
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest

from mesh.envoy import admin_address, admin_request
from mesh.xds.snapshot import HCM, Snapshot

if TYPE_CHECKING:
    from conftest import ControlPlane, EnvoyProcess

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
NODE = "east/shop/web-0"


def direct_listener(port: int) -> Snapshot:
    """One listener from xDS answering 200 "hi" itself: a port a workload could reach, like the mesh's."""
    hcm = {"@type": HCM, "stat_prefix": "web", "route_config": {"name": "web", "virtual_hosts": [
        {"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "hi"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return Snapshot.of(listeners=[{
        "name": "web", "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}], revision="r1")


def tcp_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def ask(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_stats_listener_serves_prometheus_stats_and_nothing_else(
    control_plane: ControlPlane, envoy: Callable[..., EnvoyProcess],
) -> None:
    proxy = envoy(node_id=NODE, xds_port=control_plane.port)
    assert stat.S_IMODE(proxy.admin_socket.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(proxy.admin_socket.stat().st_mode)
    status, body = proxy.stats_get("/stats/prometheus")
    assert status == 200 and b"# TYPE envoy_server_live gauge" in body
    assert proxy.stats_get("/stats/prometheus?usedonly")[0] == 200  # Prometheus may add a query
    for path in ("/quitquitquit", "/logging", "/logging?level=trace", "/config_dump", "/stats", "/ready",
                 "/server_info", "/healthcheck/fail", "/drain_listeners", "/certs", "/", "/stats/prometheus/x"):
        for method in ("GET", "POST"):
            assert proxy.stats_get(path, method)[0] == 404, (method, path)
    assert proxy.stats_get("/stats/prometheus", "POST")[0] == 404
    # Admin itself still answers, on its socket.
    assert "LIVE" in proxy.admin("/ready")


def test_quitquitquit_over_tcp_stops_nothing(control_plane: ControlPlane, envoy: Callable[..., EnvoyProcess]) -> None:
    from conftest import free_port

    listen = free_port()
    proxy = envoy(node_id=NODE, xds_port=control_plane.port)
    snap = direct_listener(listen)
    control_plane.set(NODE, snap)
    assert control_plane.wait_converged(NODE, snap)
    ports = tcp_ports(proxy.proc.pid)
    assert ports == {proxy.stats_port, listen}  # no admin port among them
    for port in sorted(ports):
        for path in ("/quitquitquit", "/healthcheck/fail", "/logging?level=trace"):
            status, body = ask(port, path, "POST")
            assert body != b"OK\n" and status in (200, 404), (port, path, status, body)
    assert ask(listen, "/")[1] == b"hi"
    assert proxy.proc.poll() is None
    assert "LIVE" in proxy.admin("/ready")
    levels = admin_request(admin_address(proxy.admin_socket), "/logging", method="POST")[1].decode()
    assert "  admin: info\n" in levels and ": trace" not in levels, levels  # no level was changed over TCP
    assert proxy.stats("server.state")["server.state"] == 0  # LIVE, not draining (healthcheck/fail)
