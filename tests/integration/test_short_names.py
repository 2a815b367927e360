"""Short names stay inside their namespace on real Envoys, while every namespace's sidecars hold one route
configuration per destination (issue 15: `routes._scoped_entry(short_names=...)`).

A sidecar's outbound routes are picked by SRDS scopes keyed on the host. The route configuration of
`web.shop` carries every name of it, `web` included, and is the same object for callers in `shop` and in
`data`; only the scopes differ: a caller in `data` has no scope for `shop`'s short names. Two real Envoys
(one caller sidecar per namespace) on a rendered snapshot; each destination is an HTTP server on the port
its (not started) sidecar would listen on, answering with its name.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from mesh.render import render
from mesh.topology import ClusterTopology, Sidecar
from mesh.xds.snapshot import ROUTE
from reconciler.load import load

if TYPE_CHECKING:
    from conftest import ControlPlane, EnvoyProcess

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
MESH = {"apiVersion": "lockgate.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "mesh"},
        "spec": {"trustDomain": "example.org", "clusters": [{"name": "east"}]}}


def _docs(ns: str, svc: str) -> list[dict[str, Any]]:
    meta = {"namespace": ns}
    return [
        {"apiVersion": "lockgate.io/v1alpha1", "kind": "Service", "metadata": {"name": svc, **meta},
         "spec": {"ports": [{"name": "http", "port": 8080}], "versions": ["v1"]}},
        {"apiVersion": "lockgate.io/v1alpha1", "kind": "Workload", "metadata": {"name": f"{svc}-v1", **meta},
         "spec": {"service": svc, "version": "v1", "clusters": ["east"], "command": ["app"]}},
    ]


SERVICES = (("shop", "web"), ("data", "web"), ("shop", "only"), ("shop", "client"), ("data", "client"))


def _sidecar(ns: str, svc: str, inbound: int, free: Callable[[], int]) -> Sidecar:
    return Sidecar(node_id=f"east/{ns}/{svc}-v1-0", namespace=ns, service=svc, version="v1",
                   workload=f"{svc}-v1", address=LOOPBACK, inbound_port=inbound, outbound_port=free(),
                   app_port=free())


def _get(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _answer(port: int, host: str, want: int, timeout: float = 10.0) -> tuple[int, str]:
    """The answer for `host` through the outbound listener on `port`, once its status is `want` (the
    listener may still be warming when the snapshot is ACKed) or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = _get(port, host)
        except OSError as exc:
            got = (0, repr(exc))
        if got[0] == want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_a_short_name_reaches_its_own_namespaces_service_only(
    control_plane: ControlPlane, backend: Callable[[str], int], envoy: Callable[..., EnvoyProcess],
) -> None:
    from conftest import free_port

    files = {"mesh.yaml": yaml.safe_dump(MESH).encode(),
             "services.yaml": yaml.safe_dump_all([d for ns, svc in SERVICES for d in _docs(ns, svc)]).encode()}
    loaded = load(files)
    assert loaded.intent is not None and not loaded.problems, loaded.problems
    sidecars = tuple(_sidecar(ns, svc, backend(f"{svc}.{ns}") if svc != "client" else free_port(), free_port)
                     for ns, svc in SERVICES)
    topo = ClusterTopology(cluster="east", ingress=None, sidecars=sidecars,
                           ready=frozenset(s.node_id for s in sidecars))
    snaps = render(intent=loaded.intent, topology=topo, revision="r1")
    callers = {s.namespace: s for s in sidecars if s.service == "client"}
    shop, data = snaps[callers["shop"].node_id], snaps[callers["data"].node_id]
    # What makes this worth testing on Envoy: both callers hold the very same configuration of web.shop,
    # whose virtual host carries the short name `web`.
    assert shop.items(ROUTE)["outbound|web.shop"] is data.items(ROUTE)["outbound|web.shop"]
    assert "web" in shop.items(ROUTE)["outbound|web.shop"]["virtual_hosts"][0]["domains"]
    for caller in callers.values():
        control_plane.set(caller.node_id, snaps[caller.node_id])
        envoy(node_id=caller.node_id, xds_port=control_plane.port)
    for caller in callers.values():
        assert control_plane.wait_converged(caller.node_id, snaps[caller.node_id], timeout=20), caller.node_id
    via_shop, via_data = callers["shop"].outbound_port, callers["data"].outbound_port
    # The short name is the caller's own namespace's service; `svc.ns` reaches any namespace's.
    assert _answer(via_shop, "web", 200) == (200, "web.shop")
    assert _answer(via_data, "web", 200) == (200, "web.data")
    assert _answer(via_data, "web.shop", 200) == (200, "web.shop")
    assert _answer(via_shop, "web.data:8080", 200) == (200, "web.data")
    assert _answer(via_shop, "only", 200) == (200, "only.shop")
    assert _answer(via_data, "only.shop", 200) == (200, "only.shop")
    # From `data`, shop's short name `only` has no scope: refused as an undeclared destination, although
    # the configuration the scope `only.shop` picks (the same object) lists `only` among its domains.
    status, body = _answer(via_data, "only", 502)
    assert status == 502 and "REGISTRY_ONLY" in body, (status, body)
