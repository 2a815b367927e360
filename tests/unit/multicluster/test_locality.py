"""Locality load balancing rendered: priorities for failover, weights per locality for distribute, one pool
when off. Table tests on the east-west extension through render, and Envoy's own check of the result."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh.intent import LocalityLbSetting
from mesh.names import cluster_name
from mesh.render import render
from mesh.topology import Gateway
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET
from multicluster.eastwest import EASTWEST, EastWestExtension, RemoteCluster, locality_policies
from multicluster.locality import Place, matches, nearness
from reconciler.load import load
from tests.fixtures.intents import reviews_policy_yaml, template_files
from tests.fixtures.topology import topology as shop_topology

V1 = cluster_name("shop", "reviews", "v1")
ANY = cluster_name("shop", "reviews", None)


def remote(name: str, locality: str | None, n: int = 1, *, port: int) -> RemoteCluster:
    return RemoteCluster(cluster=name, address=f"127.0.{port}.1", port=15443, locality=locality,
                         instances=((("shop", "reviews", "v1"), n),))


WEST = remote("west", "us/us-west-2/a", 2, port=2)
EAST2 = remote("east2", "us/us-east-1/b", port=3)  # same region and zone as east, another subzone
CENTRAL = remote("central", "eu/eu-central-1", port=4)
TOKYO = remote("tokyo", "ap/ap-ne-1", 3, port=5)
LAB = remote("lab", None, port=6)
REMOTES = (WEST, EAST2, CENTRAL, TOKYO, LAB)
MESH = "apiVersion: lockgate.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec:\n  trustDomain: example.org\n" \
       "  clusters:\n    - {name: east, locality: us/us-east-1/a}\n" + "".join(
           f"    - {{name: {r.cluster}, locality: {r.locality}}}\n" if r.locality else f"    - {{name: {r.cluster}}}\n"
           for r in REMOTES)


def files_with(policy: str) -> dict[str, bytes]:
    """The template on the Mesh above, with a reviews TrafficPolicy of `policy` (its YAML under `spec:`)."""
    return {**template_files(), "mesh.yaml": MESH.encode(), "policy.yaml": reviews_policy_yaml(policy).encode()}


def rendered(policy: str | None, *, remotes: tuple[RemoteCluster, ...] = REMOTES, local_ready: bool = True
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """reviews v1's endpoint groups and its Envoy cluster as rendered in east (us/us-east-1/a) with the
    other clusters in `remotes`, under a TrafficPolicy whose loadBalancer is `policy` (None: no policy)."""
    files = template_files() if policy is None else files_with(
        f"  loadBalancer: {{localityLbSetting: {policy}}}\n  outlierDetection: {{consecutive5xxErrors: 1}}\n")
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems
    topo = shop_topology(ready=lambda s: local_ready or "reviews" not in s.node_id,
                         gateways=(Gateway("east/eastwest", "127.0.1.1", 15443, kind=EASTWEST),))
    ext = EastWestExtension(local="east", locality="us/us-east-1/a", remotes=remotes,
                            policies=locality_policies(loaded.intent))
    snap = render(intent=loaded.intent, topology=topo, extensions=[ext])["east/ingress"]
    snap.consistent()
    return snap.items(ENDPOINT)[V1]["endpoints"], dict(snap.items(CLUSTER)[V1])


def where(groups: list[dict[str, Any]]) -> list[tuple[int, str, int | None]]:
    """(priority, the group's zone or region, its locality weight) per group; a group's own instances
    show as `local`."""
    out = []
    for g in groups:
        loc = g["locality"]
        ports = {e["endpoint"]["address"]["socket_address"]["port_value"] for e in g["lb_endpoints"]}
        name = loc["zone"] if ports == {15443} else "local"
        out.append((g["priority"], name, g.get("load_balancing_weight")))
    return out


@pytest.mark.parametrize(("policy", "expected"), [
    # Istio's order: own cluster, same zone (other subzone), same region, other regions; then nowhere.
    (None, [(0, "local", None), (1, "us-east-1", None), (2, "us-west-2", None), (3, "eu-central-1", None),
            (3, "ap-ne-1", None), (3, "lab", None)]),
    # failover from us: eu first among the other regions, then the rest.
    ("{failover: [{from: us, to: eu}]}",
     [(0, "local", None), (1, "us-east-1", None), (2, "us-west-2", None), (3, "eu-central-1", None),
      (4, "ap-ne-1", None), (4, "lab", None)]),
    # Several rules from one place are tried in order; a cluster name stands for its cluster.
    ("{failover: [{from: east, to: lab}, {from: us, to: ap}]}",
     [(0, "local", None), (1, "us-east-1", None), (2, "us-west-2", None), (3, "lab", None),
      (4, "ap-ne-1", None), (5, "eu-central-1", None)]),
    # A rule for callers elsewhere changes nothing here.
    ("{failover: [{from: eu, to: ap}]}",
     [(0, "local", None), (1, "us-east-1", None), (2, "us-west-2", None), (3, "eu-central-1", None),
      (3, "ap-ne-1", None), (3, "lab", None)]),
    # failoverPriority outranks locality: matching the region counts more than nearness within it.
    ("{failoverPriority: [topology.kubernetes.io/region]}",
     [(0, "local", None), (1, "us-east-1", None), (2, "us-west-2", None), (3, "eu-central-1", None),
      (3, "ap-ne-1", None), (3, "lab", None)]),
    ("{failoverPriority: [topology.istio.io/subzone]}",  # west shares east's subzone name, east2 does not
     [(0, "local", None), (1, "us-west-2", None), (2, "us-east-1", None), (3, "eu-central-1", None),
      (3, "ap-ne-1", None), (3, "lab", None)]),
    # distribute: one priority, a weight per locality; a share split by instances (west 2, east2 1: 40 -> 27+14).
    ("{distribute: [{from: 'us/*', to: {'us/us-east-1/a': 50, 'us/*': 40, tokyo: 10}}]}",
     [(0, "local", 50), (0, "us-west-2", 27), (0, "us-east-1", 14), (0, "ap-ne-1", 10)]),
    # A distribute rule for callers elsewhere: failover as usual.
    ("{distribute: [{from: eu, to: {'*': 100}}]}",
     [(0, "local", None), (1, "us-east-1", None), (2, "us-west-2", None), (3, "eu-central-1", None),
      (3, "ap-ne-1", None), (3, "lab", None)]),
    # Off: one pool; each locality once, as Envoy wants.
    ("{enabled: false}",
     [(0, "local", None), (0, "us-west-2", None), (0, "us-east-1", None), (0, "eu-central-1", None),
      (0, "ap-ne-1", None), (0, "lab", None)]),
])
def test_priorities_and_weights(policy: str | None, expected: list[tuple[int, str, int | None]]) -> None:
    groups, cluster = rendered(policy)
    assert where(groups) == expected
    weighted = any(g.get("load_balancing_weight") for g in groups)
    # Envoy reads locality weights only where the cluster asks for locality-weighted balancing.
    assert ("locality_weighted_lb_config" in cluster.get("common_lb_config", {})) == weighted


def test_distribute_sends_nothing_where_no_rule_points_even_here() -> None:
    groups, cluster = rendered("{distribute: [{from: east, to: {central: 75, tokyo: 25}}]}")
    assert where(groups) == [(0, "eu-central-1", 75), (0, "ap-ne-1", 25)]
    assert cluster["common_lb_config"] == {"locality_weighted_lb_config": {}}
    # With no other cluster running it, the weight still goes on this cluster's own instances (Envoy would
    # send an unweighted locality nothing).
    alone, _ = rendered("{distribute: [{from: east, to: {east: 100}}]}", remotes=())
    assert where(alone) == [(0, "local", 100)]


def test_a_same_locality_elsewhere_merges_with_the_local_group_when_they_share_a_priority() -> None:
    twin = remote("twin", "us/us-east-1/a", 2, port=7)
    groups, _ = rendered("{enabled: false}", remotes=(twin,))
    [group] = groups
    assert len(group["lb_endpoints"]) == 2  # the local instance and twin's gateway (weight 2)
    assert group["lb_endpoints"][1]["load_balancing_weight"] == 2
    # Failover keeps them apart: this cluster's own instances first.
    groups, _ = rendered(None, remotes=(twin,))
    assert where(groups) == [(0, "local", None), (1, "us-east-1", None)]


def test_without_local_instances_the_nearest_cluster_is_priority_0() -> None:
    groups, _ = rendered("{failover: [{from: us, to: ap}]}", local_ready=False)
    assert where(groups) == [(0, "us-east-1", None), (1, "us-west-2", None), (2, "ap-ne-1", None),
                             (3, "eu-central-1", None), (3, "lab", None)]


def test_a_version_setting_applies_to_that_version_only() -> None:
    files = template_files()
    files["policy.yaml"] = reviews_policy_yaml(
        "  versions:\n    - version: v1\n      loadBalancer: {localityLbSetting: {enabled: false}}\n").encode()
    loaded = load(files)
    assert loaded.intent is not None
    policies = dict(locality_policies(loaded.intent))
    assert set(policies) == {("shop", "reviews", "v1")}
    assert policies[("shop", "reviews", "v1")] == LocalityLbSetting(enabled=False)


def test_a_policy_without_simple_keeps_envoys_default_lb_policy() -> None:
    _, cluster = rendered("{enabled: false}")
    assert "lb_policy" not in cluster
    assert cluster["outlier_detection"]["consecutive_5xx"] == 1


@pytest.mark.parametrize(("term", "place", "expected"), [
    ("us", Place("a", "us/z/s"), True), ("us/*", Place("a", "us/z"), True), ("us/z", Place("a", "us/z/s"), True),
    ("us/z/*", Place("a", "us/y/s"), False), ("eu", Place("a", "us/z"), False), ("*", Place("a", None), True),
    ("a", Place("a", None), True), ("us", Place("a", None), False), ("us/z/s", Place("a", "us/z"), False),
])
def test_matches(term: str, place: Place, expected: bool) -> None:
    assert matches(term, place) is expected


def test_nearness_is_istios_order() -> None:
    here = Place("a", "r/z/s")
    assert [nearness(here, Place("b", loc)) for loc in ("r/z/s", "r/z/t", "r/y", "q/z/s", None)] == [0, 1, 2, 3, 3]
    assert nearness(Place("a", None), Place("b", None)) == 3  # no region: elsewhere from everyone


def test_envoy_accepts_weights_and_priorities(tmp_path: Path) -> None:
    from mesh.envoy import static_bootstrap, validate_config

    loaded = load(files_with(
        "  loadBalancer: {localityLbSetting: {distribute: [{from: 'us/*', to: {'us/*': 80, 'eu/*': 20}}]}}\n"
        "  versions:\n    - version: v2\n      loadBalancer: {localityLbSetting: {failover: [{from: us, to: eu}]}}\n"
        "      outlierDetection: {consecutive5xxErrors: 2}\n"))
    assert loaded.intent is not None, loaded.problems
    central = RemoteCluster(cluster="central", address="127.0.4.1", port=15443, locality="eu/eu-central-1",
                            instances=((("shop", "reviews", "v1"), 1), (("shop", "reviews", "v2"), 1)))
    ext = EastWestExtension(local="east", locality="us/us-east-1/a", remotes=(WEST, central, TOKYO),
                            policies=locality_policies(loaded.intent))
    topo = shop_topology(gateways=(Gateway("east/eastwest", "127.0.1.1", 15443, kind=EASTWEST),))
    snap = render(intent=loaded.intent, topology=topo, extensions=[ext])["east/ingress"]
    eds = snap.items(ENDPOINT)
    v1 = eds[cluster_name("shop", "reviews", "v1")]  # 1 here and 2 in west (us), 1 in central (eu)
    here, west, eu = [g.get("load_balancing_weight") for g in v1["endpoints"]]
    assert abs(here + west - 80) <= 1 and eu == 20 and abs(west - 2 * here) <= 1  # us split by instances (rounded)
    assert [g["priority"] for g in eds[cluster_name("shop", "reviews", "v2")]["endpoints"]] == [0, 1]
    parts = {key: [dict(r) for r in snap.items(t).values()] for key, t in (
        ("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER), ("endpoints", ENDPOINT),
        ("secrets", SECRET), ("scoped_routes", SCOPED_ROUTE))}
    assert asyncio.run(validate_config(static_bootstrap(**parts), workdir=tmp_path)) is None
