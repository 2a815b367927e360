"""Golden tests for render: intent YAML in, expected xDS JSON out. `UPDATE_GOLDEN=1` rewrites them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh.render import cluster_name, duration, render
from mesh.render.routes import OUTBOUND_PREFIX
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE
from reconciler.load import load, read_worktree
from tests.fixtures.routes import ingress_vhost, outbound_configs, scopes
from tests.fixtures.topology import golden_topology as topology

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_golden(case: str) -> None:
    loaded = load(read_worktree(GOLDEN / case))
    assert loaded.intent is not None, loaded.problems
    snaps = render(intent=loaded.intent, topology=topology(), revision="r1")
    for snap in snaps.values():
        snap.consistent()
    got = {node: snap.to_json() for node, snap in sorted(snaps.items())}
    expected_path = GOLDEN / case / "xds.json"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(expected_path.read_text())


def test_render_is_deterministic_and_versions_track_content() -> None:
    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    a = render(intent=loaded.intent, topology=topology(), revision="r1")
    b = render(intent=loaded.intent, topology=topology(), revision="r2")
    assert {n: s.versions for n, s in a.items()} == {n: dict(s.versions) for n, s in b.items()}

    # One instance becoming ready changes endpoints, and nothing else.
    topo = topology()
    more = ClusterTopology(cluster="east", ingress=topo.ingress, sidecars=topo.sidecars,
                           ready=topo.ready | {"east/shop/reviews-v1-1"})
    c = render(intent=loaded.intent, topology=more, revision="r1")
    for node in a:
        changed = {t for t in a[node].versions if a[node].versions[t] != c[node].versions[t]}
        assert changed == {ENDPOINT}, (node, changed)
    eds = c["east/ingress"].items(ENDPOINT)[cluster_name("shop", "reviews", "v1")]
    assert len(eds["endpoints"][0]["lb_endpoints"]) == 2


def test_weights_and_unready_instances() -> None:
    loaded = load(read_worktree(GOLDEN / "matches"))
    assert loaded.intent is not None
    snap = render(intent=loaded.intent, topology=topology())["east/ingress"]
    vhost = ingress_vhost(snap, "reviews.shop")
    default = next(r for r in vhost["routes"] if r["name"] == "default")
    # A zero weight is dropped (Envoy rejects all-zero splits and needs no empty cluster).
    assert default["route"]["weighted_clusters"]["clusters"] == [
        {"name": "outbound|reviews.shop|v1", "weight": 75}, {"name": "outbound|reviews.shop|v2", "weight": 25}]
    assert [r["name"] for r in vhost["routes"]] == ["testers-0", "testers-1", "exact", "regex", "default"]
    # Services in other namespaces get clusters too; their endpoint sets may be empty.
    assert cluster_name("data", "ratings") in snap.items(CLUSTER)
    assert snap.items(ENDPOINT)[cluster_name("data", "ratings")]["endpoints"] == []


@pytest.mark.parametrize(("ms", "text"), [(2000, "2s"), (250, "0.250s"), (1500, "1.500s"), (0, "0s")])
def test_duration(ms: int, text: str) -> None:
    assert duration(ms) == text


def test_a_gateway_of_an_unknown_kind_gets_an_empty_configuration_unless_an_extension_renders_it() -> None:
    from typing import Any

    from mesh.intent import Intent
    from mesh.render import Extension, GatewayResources

    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    egress_gw = Gateway("east/egress", "127.0.1.1", 15000, kind="eastwest")
    topo = ClusterTopology(cluster="east", ingress=topology().ingress, gateways=(egress_gw,))
    plain = render(intent=loaded.intent, topology=topo)["east/egress"]
    assert plain.items(LISTENER) == {} and plain.items(CLUSTER) == {}  # answered, with nothing

    class Egress(Extension):
        def gateway(self, proxy: Gateway, *, intent: Intent, topology: ClusterTopology) -> GatewayResources | None:
            listener: dict[str, Any] = {"name": "egress", "address": {"socket_address": {
                "address": proxy.address, "port_value": proxy.port}}, "filter_chains": []}
            return GatewayResources(listeners=[listener]) if proxy.kind == "eastwest" else None

    made = render(intent=loaded.intent, topology=topo, extensions=[Egress()])["east/egress"]
    assert list(made.items(LISTENER)) == ["egress"]


def test_extensions_see_every_resource_and_add_secrets() -> None:
    from typing import Any

    from mesh.render import Extension, Proxy
    from mesh.xds.snapshot import SECRET

    class Tag(Extension):
        def listener(self, proxy: Proxy, listener: dict[str, Any]) -> dict[str, Any]:
            return {**listener, "per_connection_buffer_limit_bytes": 1024}

        def secrets(self, proxy: Proxy) -> list[dict[str, Any]]:
            return [{"name": f"cert-{proxy.node_id}"}]

    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    snaps = render(intent=loaded.intent, topology=topology(), extensions=[Tag()])
    for node, snap in snaps.items():
        assert all(x["per_connection_buffer_limit_bytes"] == 1024 for x in snap.items(LISTENER).values())
        assert list(snap.items(SECRET)) == [f"cert-{node}"]


def test_render_cache_changes_the_work_not_the_result() -> None:
    from mesh.render import RenderCache

    base = load(read_worktree(GOLDEN / "traffic"))
    assert base.intent is not None
    files = read_worktree(GOLDEN / "traffic")
    text = files["intent.yaml"].decode()
    assert "weight: 90}" in text
    files["intent.yaml"] = text.replace("weight: 90}", "weight: 70}").replace("weight: 10}", "weight: 30}").encode()
    changed = load(files)
    assert changed.intent is not None, changed.problems

    cache = RenderCache()
    first = render(intent=base.intent, topology=topology(), cache=cache)
    second = render(intent=changed.intent, topology=topology(), cache=cache)
    fresh = render(intent=changed.intent, topology=topology())
    assert {n: s.to_json() for n, s in second.items()} == {n: s.to_json() for n, s in fresh.items()}
    assert {n: dict(s.versions) for n, s in second.items()} == {n: dict(s.versions) for n, s in fresh.items()}
    # Unchanged resources keep their identity across renders; the changed route configuration does not.
    node = "east/ingress"
    assert first[node].parts[CLUSTER][0] is second[node].parts[CLUSTER][0]
    assert ingress_vhost(first[node], "reviews.shop") is not ingress_vhost(second[node], "reviews.shop")
    # Sidecars of one namespace share their outbound route configurations and scopes: the same objects,
    # in one shared set each (built and hashed once).
    sidecars = [s for n, s in second.items() if n.startswith("east/shop/")]
    assert len(sidecars) > 1
    names = {frozenset(outbound_configs(s)) for s in sidecars}
    assert len(names) == 1 and all(n.startswith(OUTBOUND_PREFIX) for n in next(iter(names))), names
    for name in next(iter(names)):
        assert len({id(outbound_configs(s)[name]) for s in sidecars}) == 1, name
    assert len({id(sc) for s in sidecars for sc in s.items(SCOPED_ROUTE).values()}) == len(scopes(sidecars[0])) > 0
    assert len({id(s.parts[SCOPED_ROUTE][0]) for s in sidecars}) == 1
    assert len({id(s.parts[ROUTE][-1]) for s in sidecars}) == 1  # the outbound set (after the sidecar's inbound)


def test_the_inbound_route_hook_shapes_one_sidecar_and_leaves_the_rest_shared() -> None:
    """What an extension adds to a sidecar's inbound route configuration reaches only that sidecar (and
    only its routes, not its listener); sidecars the hook hands back the configuration keep sharing one."""
    from typing import Any

    from mesh.render import Extension

    seen: list[str] = []

    class Tag(Extension):
        def inbound_route(self, proxy: Sidecar, route_config: dict[str, Any]) -> dict[str, Any]:
            seen.append(proxy.node_id)
            if proxy.service != "frontend":
                return route_config
            (vh,) = route_config["virtual_hosts"]
            return {**route_config, "virtual_hosts": [{**vh, "request_headers_to_remove": ["x-tag"]}]}

    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    plain = render(intent=loaded.intent, topology=topology())
    tagged = render(intent=loaded.intent, topology=topology(), extensions=[Tag()])
    assert sorted(seen) == sorted(s.node_id for s in topology().sidecars)  # sidecars only, once each
    front = tagged["east/shop/frontend-v1-0"].items(ROUTE)["inbound"]
    assert front["virtual_hosts"][0]["request_headers_to_remove"] == ["x-tag"]
    others = [s for n, s in tagged.items() if n.startswith("east/shop/reviews-")]
    assert len({id(s.items(ROUTE)["inbound"]) for s in others}) == 1
    assert len({id(s.parts[ROUTE][0]) for s in others}) == 1  # one shared ResourceSet, not one per sidecar
    for node, snap in tagged.items():
        assert snap.version(LISTENER) == plain[node].version(LISTENER)
        changed = snap.items(ROUTE).get("inbound") != plain[node].items(ROUTE).get("inbound")
        assert changed == (node == "east/shop/frontend-v1-0"), node
