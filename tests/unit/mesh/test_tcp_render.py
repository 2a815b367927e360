"""TCP services in render: per-destination tcp_proxy listeners split by the Route's weights, a TCP
inbound listener, clusters without HTTP options; and what validation lets through (TCP) and refuses (TLS)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh.intent import Intent
from mesh.render import render
from mesh.topology import ClusterTopology, Sidecar
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET, Snapshot
from reconciler.load import load
from tests.fixtures.routes import no_scope_reply, outbound_configs, outbound_vhosts, scopes

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: client, namespace: shop}
spec: {ports: [{name: http, port: 8080}], versions: [v1]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {ports: [{name: tcp-echo, port: 9000}, {name: tcp-admin, port: 9001}], versions: [v1, v2]}
---
apiVersion: lockgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: shop}
spec: {service: echo, connectionPool: {http: {maxRequestsPerConnection: 1}}}
"""
ROUTE_80_20 = """\
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  http:
    - route: [{version: v1, weight: 80}, {version: v2, weight: 20}]
"""
ADDRESS = "127.0.1.1"


def intent_of(text: str) -> Intent:
    loaded = load({"mesh.yaml": text.encode()})
    assert loaded.intent is not None, [str(p) for p in loaded.problems]
    return loaded.intent


def sidecar(service: str, version: str, base: int, tcp: tuple[tuple[str, str, int, int], ...] = ()) -> Sidecar:
    return Sidecar(node_id=f"east/shop/{service}-{version}-0", namespace="shop", service=service, version=version,
                   workload=f"{service}-{version}", address=ADDRESS, inbound_port=base, outbound_port=base + 1,
                   app_port=base + 2, tcp_outbound=tcp)


CLIENT_TCP = (("shop", "echo", 9000, 21000), ("shop", "echo", 9001, 21001))


def topo(client: Sidecar | None = None) -> ClusterTopology:
    sidecars = (client or sidecar("client", "v1", 20000, CLIENT_TCP), sidecar("echo", "v1", 20010),
                sidecar("echo", "v2", 20020))
    return ClusterTopology(cluster="east", sidecars=sidecars, ready=frozenset(s.node_id for s in sidecars))


def listeners(snap: Snapshot) -> dict[str, dict[str, Any]]:
    return {name: dict(r) for name, r in snap.items(LISTENER).items()}


def tcp_proxy(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (flt,) = chain["filters"]
    assert flt["name"] == "envoy.filters.network.tcp_proxy"
    config: dict[str, Any] = flt["typed_config"]
    return config


def test_a_caller_gets_one_tcp_listener_per_destination_port_split_by_the_route_weights() -> None:
    snaps = render(intent=intent_of(MESH + ROUTE_80_20), topology=topo())
    mine = listeners(snaps["east/shop/client-v1-0"])
    assert set(mine) == {"inbound", "outbound", "outbound_tcp|9000|echo.shop", "outbound_tcp|9001|echo.shop"}
    echo = mine["outbound_tcp|9000|echo.shop"]
    assert echo["address"] == {"socket_address": {"address": ADDRESS, "port_value": 21000}}
    proxy = tcp_proxy(echo)
    assert proxy["stat_prefix"] == "outbound_tcp_echo_shop_9000"
    assert proxy["weighted_clusters"] == {"clusters": [{"name": "outbound|echo.shop|v1", "weight": 80},
                                                       {"name": "outbound|echo.shop|v2", "weight": 20}]}
    assert tcp_proxy(mine["outbound_tcp|9001|echo.shop"])["stat_prefix"] == "outbound_tcp_echo_shop_9001"
    clusters = set(snaps["east/shop/client-v1-0"].items(CLUSTER))
    assert {"outbound|echo.shop|v1", "outbound|echo.shop|v2"} <= clusters  # what the listener names exists


@pytest.mark.parametrize(("route", "expected"), [
    ("", {"cluster": "outbound|echo.shop"}),  # no Route: every version shares, as on the HTTP path
    (ROUTE_80_20.replace("weight: 80}", "weight: 100}").replace("weight: 20}", "weight: 0}"),
     {"cluster": "outbound|echo.shop|v1"}),
])
def test_without_a_split_the_listener_names_one_cluster(route: str, expected: dict[str, Any]) -> None:
    snaps = render(intent=intent_of(MESH + route), topology=topo())
    proxy = tcp_proxy(listeners(snaps["east/shop/client-v1-0"])["outbound_tcp|9000|echo.shop"])
    assert {k: v for k, v in proxy.items() if k in ("cluster", "weighted_clusters")} == expected


def test_egress_and_stale_entries_get_no_listener() -> None:
    text = MESH + ROUTE_80_20 + """\
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: client-v1, namespace: shop}
spec: {service: client, version: v1, clusters: [east], command: [app], egress: [other]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: other, namespace: shop}
spec: {ports: [{name: http, port: 80}], versions: [v1]}
"""
    stale = (("shop", "echo", 9000, 21000), ("shop", "echo", 9999, 21002), ("shop", "other", 80, 21003))
    snaps = render(intent=intent_of(text), topology=topo(sidecar("client", "v1", 20000, stale)))
    # echo is outside its egress; port 9999 is no port of echo; `other` is no TCP service.
    assert set(listeners(snaps["east/shop/client-v1-0"])) == {"inbound", "outbound"}
    snaps = render(intent=intent_of(text.replace("egress: [other]", "egress: [other, echo]")),
                   topology=topo(sidecar("client", "v1", 20000, stale)))
    assert set(listeners(snaps["east/shop/client-v1-0"])) == {"inbound", "outbound", "outbound_tcp|9000|echo.shop"}


def test_a_tcp_service_inbound_listener_forwards_connections_and_its_clusters_carry_no_http_options() -> None:
    snaps = render(intent=intent_of(MESH + ROUTE_80_20), topology=topo())
    inbound = listeners(snaps["east/shop/echo-v1-0"])["inbound"]
    assert inbound["address"] == {"socket_address": {"address": ADDRESS, "port_value": 20010}}
    assert tcp_proxy(inbound) == {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                  "stat_prefix": "inbound_tcp", "cluster": "inbound|app"}
    clusters = {n: dict(c) for n, c in snaps["east/shop/client-v1-0"].items(CLUSTER).items()}
    # maxRequestsPerConnection is an HTTP option: it stays off a TCP service's clusters (the circuit breakers stay).
    assert all("typed_extension_protocol_options" not in clusters[f"outbound|echo.shop|{v}"] for v in ("v1", "v2"))
    assert "circuit_breakers" in clusters["outbound|echo.shop|v1"]
    client_inbound = listeners(snaps["east/shop/client-v1-0"])["inbound"]
    assert client_inbound["filter_chains"][0]["filters"][0]["name"] == "envoy.filters.network.http_connection_manager"


def test_tcp_and_tls_are_served_and_tls_is_carried_like_tcp() -> None:
    """A TLS port (`tls`, `https`, appProtocol tls) is the app's own TLS: carried as opaque bytes by
    tcp_proxy inside the mesh's mTLS, split by the same weights (no SNI routing: one Route rule decides)."""
    assert load({"mesh.yaml": (MESH + ROUTE_80_20).encode()}).problems == []
    tls = MESH.replace("{name: tcp-echo, port: 9000}, {name: tcp-admin, port: 9001}", "{name: https, port: 9443}")
    assert [str(p) for p in load({"mesh.yaml": (tls + ROUTE_80_20).encode()}).problems] == []
    client = sidecar("client", "v1", 20000, (("shop", "echo", 9443, 21443),))
    snaps = render(intent=intent_of(tls + ROUTE_80_20), topology=topo(client))
    listener = listeners(snaps["east/shop/client-v1-0"])["outbound_tcp|9443|echo.shop"]
    weights = {c["name"]: c["weight"] for c in tcp_proxy(listener)["weighted_clusters"]["clusters"]}
    assert weights == {"outbound|echo.shop|v1": 80, "outbound|echo.shop|v2": 20}
    inbound = listeners(snaps["east/shop/echo-v1-0"])["inbound"]
    assert tcp_proxy(inbound)["cluster"] == "inbound|app"


def test_envoy_accepts_what_the_pipeline_renders_for_tcp(tmp_path: Path) -> None:
    from mesh.envoy import static_bootstrap, validate_config
    from reconciler.pipeline import PLANNED_NOW, ephemeral_certificates, render_mesh
    from tests.unit.policies.test_l4 import POLICIES

    intent = intent_of(MESH + ROUTE_80_20 + POLICIES)
    rendered = render_mesh(intent=intent, states={}, topologies={"east": topo()},
                           certs=ephemeral_certificates(["east"]), now=PLANNED_NOW.timestamp(), revision="r1")
    snaps = rendered["east"].snapshots
    assert rendered["east"].error is None and set(snaps) == {s.node_id for s in topo().sidecars}

    async def check_all() -> list[tuple[str, str | None]]:
        out = []
        for node, snap in sorted(snaps.items()):
            parts = {key: [dict(r) for r in snap.items(t).values()] for key, t in (
                ("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER), ("endpoints", ENDPOINT),
                ("secrets", SECRET), ("scoped_routes", SCOPED_ROUTE))}
            out.append((node, await validate_config(static_bootstrap(**parts), workdir=tmp_path)))
        return out

    assert asyncio.run(check_all()) == [(node, None) for node in sorted(snaps)]


ROLLOUT = """\
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  http:
    - name: default          # weights come from the Rollout
---
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata: {name: echo, namespace: shop}
spec: {service: echo, stable: v1, canary: v2, steps: [20, 50, 100], interval: 5s}
"""


@pytest.mark.parametrize(("weight", "expected"), [
    (20, {"weighted_clusters": {"clusters": [{"name": "outbound|echo.shop|v1", "weight": 80},
                                             {"name": "outbound|echo.shop|v2", "weight": 20}]}}),
    (50, {"weighted_clusters": {"clusters": [{"name": "outbound|echo.shop|v1", "weight": 50},
                                             {"name": "outbound|echo.shop|v2", "weight": 50}]}}),
])
def test_a_tcp_canary_steps_its_weights_through_the_route_rule(weight: int, expected: dict[str, Any]) -> None:
    from reconciler.pipeline import PLANNED_NOW, ephemeral_certificates, render_mesh
    from rollouts.advance import RolloutState

    state = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", weight=weight)
    rendered = render_mesh(intent=intent_of(MESH + ROLLOUT), states={("shop", "echo"): state},
                           topologies={"east": topo()}, certs=ephemeral_certificates(["east"]),
                           now=PLANNED_NOW.timestamp(), revision="r1")
    proxy = tcp_proxy(listeners(rendered["east"].snapshots["east/shop/client-v1-0"])["outbound_tcp|9000|echo.shop"])
    assert {k: v for k, v in proxy.items() if k in ("cluster", "weighted_clusters")} == expected


def test_a_tcp_service_has_no_virtual_host_in_the_http_outbound_routes() -> None:
    """An HTTP request through HTTP_PROXY for a TCP service meets the outbound traffic policy's refusal (no
    scope for its host), not an app speaking no HTTP; its HTTP neighbour keeps its virtual host and scopes."""
    snaps = render(intent=intent_of(MESH + ROUTE_80_20), topology=topo())
    client = snaps["east/shop/client-v1-0"]
    domains = {d for vh in outbound_vhosts(client) for d in vh["domains"]}
    assert not any(d.startswith("echo") for d in domains), domains
    assert "client.shop" in domains
    assert set(outbound_configs(client)) == {"outbound|client.shop"}
    assert scopes(client) == {"client": "outbound|client.shop", "client.shop": "outbound|client.shop"}
    assert no_scope_reply(client)["status"] == 502
