"""Golden tests for render: intent YAML in, expected xDS JSON out. `UPDATE_GOLDEN=1` rewrites them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh.render import cluster_name, duration, render
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE
from reconciler.load import load, read_worktree

GOLDEN = Path(__file__).parent / "golden"


def topology() -> ClusterTopology:
    def sc(ns: str, svc: str, ver: str, i: int, base: int) -> Sidecar:
        return Sidecar(node_id=f"east/{ns}/{svc}-{ver}-{i}", namespace=ns, service=svc, version=ver,
                       workload=f"{svc}-{ver}", address="127.0.1.1", inbound_port=base,
                       outbound_port=base + 1, app_port=base + 2)

    sidecars = (sc("shop", "frontend", "v1", 0, 20000), sc("shop", "reviews", "v1", 0, 20010),
                sc("shop", "reviews", "v1", 1, 20020), sc("shop", "reviews", "v2", 0, 20030))
    ready = frozenset(s.node_id for s in sidecars if not s.node_id.endswith("v1-1"))
    return ClusterTopology(cluster="east", ingress=Gateway("east/ingress", "127.0.1.1", 18080),
                           sidecars=sidecars, ready=ready)


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
    vhost = next(v for v in snap.items(ROUTE)["ingress"]["virtual_hosts"] if v["name"] == "reviews.shop")
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


def test_rollout_weights_replace_the_default_rule_only() -> None:
    from mesh.intent import Destination

    loaded = load(read_worktree(GOLDEN / "matches"))
    assert loaded.intent is not None
    weights = {("shop", "reviews"): [Destination(version="v1", weight=90), Destination(version="v3", weight=10)]}
    snap = render(intent=loaded.intent, topology=topology(), weights=weights)["east/ingress"]
    vhost = next(v for v in snap.items(ROUTE)["ingress"]["virtual_hosts"] if v["name"] == "reviews.shop")
    by_name = {r["name"]: r["route"] for r in vhost["routes"]}
    assert by_name["default"]["weighted_clusters"]["clusters"] == [
        {"name": "outbound|reviews.shop|v1", "weight": 90}, {"name": "outbound|reviews.shop|v3", "weight": 10}]
    assert by_name["default"]["timeout"] == "2s"  # the rest of the rule stays
    assert by_name["exact"] == {"cluster": "outbound|reviews.shop|v1"}  # rules with matches stay
    # A service without a Route gets the override as its only rule.
    weights = {("data", "ratings"): [Destination(version="v1", weight=100)]}
    side = render(intent=loaded.intent, topology=topology(), weights=weights)["east/shop/frontend-v1-0"]
    vh = next(v for v in side.items(ROUTE)["outbound"]["virtual_hosts"] if v["name"] == "ratings.data")
    assert vh["routes"][0]["route"] == {"cluster": "outbound|ratings.data|v1"}


def test_extensions_see_every_resource_and_add_secrets() -> None:
    from typing import Any

    from mesh.render import Extension, Proxy
    from mesh.xds.snapshot import LISTENER, SECRET

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
    assert first[node].items(ROUTE)["ingress"] is not second[node].items(ROUTE)["ingress"]
    # Sidecars of one namespace share one route configuration object.
    sidecars = [s for n, s in second.items() if n.startswith("east/shop/")]
    assert len({id(s.items(ROUTE)["outbound"]) for s in sidecars}) == 1


def test_other_clusters_are_failover_through_their_east_west_gateways() -> None:
    from mesh.render import sni
    from mesh.topology import RemoteCluster

    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    base = topology()
    west = RemoteCluster(cluster="west", address="127.0.2.1", port=15443,
                         instances=((("shop", "reviews", "v1"), 2), (("shop", "reviews", "v2"), 1)))
    ew = Gateway("east/eastwest", "127.0.1.1", 15443)
    ready = base.ready - {"east/shop/reviews-v2-0"}  # east's v2 instance is not ready
    topo = ClusterTopology(cluster="east", ingress=base.ingress, sidecars=base.sidecars, ready=ready,
                           eastwest=ew, remotes=(west,))
    snaps = render(intent=loaded.intent, topology=topo)
    eds = snaps["east/ingress"].items(ENDPOINT)
    v1 = eds[cluster_name("shop", "reviews", "v1")]["endpoints"]
    # Local instance first (priority 0), the other cluster's gateway as failover, weighted by its instances.
    assert [(g.get("priority", 0), g["locality"]["zone"], len(g["lb_endpoints"])) for g in v1] == [
        (0, "east", 1), (1, "west", 1)]
    assert v1[1]["lb_endpoints"][0]["load_balancing_weight"] == 2
    assert v1[1]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {"address": "127.0.2.1",
                                                                                 "port_value": 15443}
    # A version with no ready local instance goes to the other cluster, at priority 0.
    v2 = eds[cluster_name("shop", "reviews", "v2")]["endpoints"]
    assert [(g["priority"], g["locality"]["zone"]) for g in v2] == [(0, "west")]
    # A service the other cluster does not run has no remote endpoints at all.
    fe = eds[cluster_name("shop", "frontend", "v1")]["endpoints"]
    assert all("priority" not in g for g in fe)
    # This cluster's gateway passes TLS through by SNI, to local instances only.
    gw = snaps["east/eastwest"]
    [listener] = gw.items(LISTENER).values()
    names = [c["filter_chain_match"]["server_names"][0] for c in listener["filter_chains"]]
    assert sni("shop", "reviews", "v1") in names and sni("shop", "reviews", None) in names
    assert all(not n.startswith("outbound|") for n in gw.items(CLUSTER))  # never onward to another cluster
    gw.consistent()
    for snap in snaps.values():
        snap.consistent()
