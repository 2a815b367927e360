"""A sidecar's outbound routes cut per destination under REGISTRY_ONLY (issue 15): one route configuration per
mesh service and per external host, picked by scopes keyed on the request's host.

What the cut is for: a one-rule commit changes one small route configuration, the same object for every
sidecar of a namespace, and no scope, so delta xDS sends each proxy that one resource. What it must keep:
each name a caller may use has a scope (the short name only inside its own namespace), egress still decides
what is reachable, an ExternalService's ports share their host's configuration, and a request for a known
service that no rule matches is a 404 of its own, never Envoy's "no route" (the REGISTRY_ONLY refusal now).
"""

from __future__ import annotations

from typing import Any

import yaml

from mesh.intent import Intent
from mesh.render import RenderCache, render
from mesh.render.context import NOT_FOUND_BODY
from mesh.render.egress import external_cluster_name
from mesh.render.listeners import LOWERCASE_HOST
from mesh.render.routes import NO_RULE_BODY
from mesh.topology import ClusterTopology
from mesh.xds.snapshot import LISTENER, ROUTE, SCOPED_ROUTE, Snapshot, part_diff
from reconciler.load import load
from tests.fixtures.intents import template_files
from tests.fixtures.routes import ingress_vhost, no_scope_reply, outbound_configs, outbound_vhost, scopes
from tests.fixtures.topology import INGRESS, SHOP, sidecar

FRONTEND, REVIEWS_V1, REVIEWS_V2, RATINGS = ("east/shop/frontend-v1-0", "east/shop/reviews-v1-0",
                                             "east/shop/reviews-v2-0", "east/data/ratings-v1-0")
API = "api.external.test"


def _doc(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "lockgate.io/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


RATINGS_DOCS = [
    _doc("Service", "ratings", "data", {"ports": [{"name": "http", "port": 7070}], "versions": ["v1"]}),
    _doc("Workload", "ratings-v1", "data", {"service": "ratings", "version": "v1", "clusters": ["east"],
                                            "command": ["app"]}),
]
API_DOC = _doc("ExternalService", "api", "shop", {
    "hosts": [API], "ports": [{"name": "http", "number": 80, "protocol": "HTTP"},
                              {"name": "https", "number": 443, "protocol": "HTTPS"}],
    "tls": {"mode": "originate"}})
HEADER_ONLY = _doc("Route", "ratings", "data", {"service": "ratings", "http": [
    {"name": "testers", "match": [{"headers": {"x-tester": {"exact": "yes"}}}], "route": [{"version": "v1"}]}]})


def intent(*, reviews_v2: int = 0, frontend_egress: list[str] | None = None,
           extra: tuple[dict[str, Any], ...] = ()) -> Intent:
    """The template (frontend -> reviews, namespace shop), reviews' v2 at `reviews_v2` percent, a `ratings`
    service in namespace `data`, and `extra` documents."""
    files = template_files()
    routes = files["routes.yaml"].decode()
    assert "weight: 100\n        - version: v2\n          weight: 0" in routes
    files["routes.yaml"] = routes.replace("weight: 100\n        - version: v2\n          weight: 0",
                                          f"weight: {100 - reviews_v2}\n        - version: v2\n"
                                          f"          weight: {reviews_v2}").encode()
    if frontend_egress is not None:
        docs = list(yaml.safe_load_all(files["workloads.yaml"]))
        (front,) = [d for d in docs if d["metadata"]["name"] == "frontend-v1"]
        front["spec"]["egress"] = frontend_egress
        files["workloads.yaml"] = yaml.safe_dump_all(docs).encode()
    files["more.yaml"] = yaml.safe_dump_all([*RATINGS_DOCS, *extra]).encode()
    loaded = load(files)
    assert loaded.intent is not None and not loaded.problems, loaded.problems
    return loaded.intent


def topo() -> ClusterTopology:
    sidecars = (*(sidecar(*i) for i in SHOP), sidecar("ratings", "v1", 0, 20040, namespace="data"))
    return ClusterTopology(cluster="east", ingress=INGRESS, sidecars=sidecars,
                           ready=frozenset(s.node_id for s in sidecars))


def snapshots(it: Intent, cache: RenderCache | None = None) -> dict[str, Snapshot]:
    snaps = render(intent=it, topology=topo(), cache=cache)
    for snap in snaps.values():
        snap.consistent()
    return snaps


def sidecars(snaps: dict[str, Snapshot]) -> dict[str, Snapshot]:
    return {n: s for n, s in snaps.items() if n != INGRESS.node_id}


def test_one_rule_change_changes_one_route_configuration_and_no_scope_on_every_sidecar() -> None:
    cache = RenderCache()
    before = snapshots(intent(extra=(API_DOC,)), cache)
    after = snapshots(intent(reviews_v2=10, extra=(API_DOC,)), cache)
    assert set(sidecars(after)) == {FRONTEND, REVIEWS_V1, REVIEWS_V2, RATINGS}
    for node, new in sidecars(after).items():
        old = before[node]
        was, now = outbound_configs(old), outbound_configs(new)
        assert set(was) == set(now) and {"outbound|reviews.shop", "outbound|ratings.data",
                                          f"outbound|{API}"} <= set(now), node
        assert {n for n in now if now[n] is not was[n]} == {"outbound|reviews.shop"}, node
        assert {n for n in now if new.digests[ROUTE][n] != old.digests[ROUTE][n]} == {"outbound|reviews.shop"}, node
        # Nothing else moved: not a scope (same objects, same version), not a listener, not another route.
        assert all(new.items(SCOPED_ROUTE)[n] is old.items(SCOPED_ROUTE)[n] for n in old.items(SCOPED_ROUTE)), node
        assert set(new.items(SCOPED_ROUTE)) == set(old.items(SCOPED_ROUTE)) and len(scopes(new)) > 0, node
        assert new.version(SCOPED_ROUTE) == old.version(SCOPED_ROUTE), node
        assert new.version(LISTENER) == old.version(LISTENER), node
        assert {n for n in new.items(ROUTE) if new.digests[ROUTE][n] != old.digests[ROUTE].get(n)} == {
            "outbound|reviews.shop"}, node
        # What delta xDS sends this proxy: the one configuration. The outbound configurations are held in
        # buckets; only the one holding reviews.shop is a new part, every other is the same object.
        replaced = [(a, b) for a, b in zip(old.parts[ROUTE], new.parts[ROUTE], strict=True)
                    if a is not b and "inbound" not in b]  # the inbound set is rebuilt, equal in content
        assert len(replaced) == 1 and len(new.parts[ROUTE]) > 2, node
        diff = part_diff(*replaced[0])
        assert set(diff.changed) == {"outbound|reviews.shop"} and not diff.added and not diff.removed, node
        weights = [c["weight"] for c in outbound_vhost(new, "reviews.shop")["routes"][0]["route"][
            "weighted_clusters"]["clusters"]]
        assert weights == [90, 10], node
    # Every sidecar holds the same new object, in every namespace (the scopes differ: the short name's).
    held = {id(outbound_configs(after[n])["outbound|reviews.shop"]) for n in sidecars(after)}
    assert len(held) == 1
    bucket = {id(part) for n in sidecars(after) for part in after[n].parts[ROUTE] if "outbound|reviews.shop" in part}
    assert len(bucket) == 1  # one set: one version, one serialised form, one diff for the delta server
    assert "reviews" in scopes(after[FRONTEND]) and "reviews" not in scopes(after[RATINGS])


def test_scopes_follow_names_egress_external_hosts_and_rules_that_can_fall_through() -> None:
    snaps = snapshots(intent(frontend_egress=["reviews", "api"], extra=(API_DOC, HEADER_ONLY)))
    # Short names only for callers in the service's own namespace; `svc.ns` for everyone.
    assert scopes(snaps[REVIEWS_V1]) == {
        "frontend": "outbound|frontend.shop", "frontend.shop": "outbound|frontend.shop",
        "reviews": "outbound|reviews.shop", "reviews.shop": "outbound|reviews.shop",
        "ratings.data": "outbound|ratings.data", API: f"outbound|{API}"}
    assert scopes(snaps[RATINGS]) == {
        "frontend.shop": "outbound|frontend.shop", "reviews.shop": "outbound|reviews.shop",
        "ratings": "outbound|ratings.data", "ratings.data": "outbound|ratings.data", API: f"outbound|{API}"}
    # The virtual host carries every name for every caller: a scope picks it, and RATINGS has none for
    # `reviews` (above), so its short name never reaches this configuration from namespace `data`.
    assert {d.split(":")[0] for d in outbound_vhost(snaps[RATINGS], "reviews.shop")["domains"]} == {
        "reviews", "reviews.shop"}
    assert outbound_configs(snaps[RATINGS])["outbound|reviews.shop"] is outbound_configs(
        snaps[REVIEWS_V1])["outbound|reviews.shop"]
    # One scope resource per name (the mapping above lost none to a repeated key).
    assert all(len(snaps[n].items(SCOPED_ROUTE)) == len(scopes(snaps[n])) for n in sidecars(snaps))
    # Egress restricts the scopes: frontend reaches reviews and the API only; the rest is refused as undeclared.
    assert scopes(snaps[FRONTEND]) == {"reviews": "outbound|reviews.shop", "reviews.shop": "outbound|reviews.shop",
                                       API: f"outbound|{API}"}
    assert set(outbound_configs(snaps[FRONTEND])) == {"outbound|reviews.shop", f"outbound|{API}"}
    assert no_scope_reply(snaps[FRONTEND])["status"] == 502
    # An ExternalService host: one scope, its configuration holding a virtual host per port.
    api = snaps[FRONTEND].items(ROUTE)[f"outbound|{API}"]
    assert [v["name"] for v in api["virtual_hosts"]] == [external_cluster_name(80, API),
                                                         external_cluster_name(443, API)]
    assert all(d.split(":")[0] == API for v in api["virtual_hosts"] for d in v["domains"])
    # A Route whose only rule matches a header can fall through: a 404 that says so (HTTP, and CONNECT).
    ratings = outbound_vhost(snaps[REVIEWS_V1], "ratings.data")
    assert [(r["name"], r["match"]) for r in ratings["routes"]] == [
        ("testers", {"prefix": "/", "headers": [{"name": "x-tester", "string_match": {"exact": "yes"}}]}),
        ("no-rule-matched", {"prefix": "/"}), ("no-rule-matched-connect", {"connect_matcher": {}})]
    for tail in ratings["routes"][1:]:
        assert tail["direct_response"] == {"status": 404, "body": {"inline_string": NO_RULE_BODY}}
    # A rule without a match already catches every HTTP request: no 404 before it could ever be reached.
    reviews = outbound_vhost(snaps[REVIEWS_V1], "reviews.shop")
    assert [r["name"] for r in reviews["routes"]] == ["default", "no-rule-matched-connect"]


def test_a_proxys_own_resources_keep_their_sets_until_they_change() -> None:
    """Listeners, the inbound cluster and secrets are built afresh for each proxy every render; equal in
    content, last render's ResourceSet is kept (its identity carries versions, serialised bytes and the delta
    server's per-part bookkeeping), and a change anywhere in them gives that proxy a new set."""
    from mesh.xds.snapshot import CLUSTER

    cache = RenderCache()
    before = snapshots(intent(), cache)
    after = snapshots(intent(reviews_v2=10), cache)
    for node, new in sidecars(after).items():
        assert new.parts[LISTENER][0] is before[node].parts[LISTENER][0], node
        assert any(p is q for p in new.parts[CLUSTER] for q in before[node].parts[CLUSTER] if len(p) == 1), node
    # A fault on reviews puts the fault filter in the outbound listener of the sidecars that call it.
    fault = _doc("Route", "ratings", "data", {"service": "ratings", "http": [
        {"name": "slow", "fault": {"delay": {"fixedDelay": "1s", "percentage": 50}}, "route": [{"version": "v1"}]}]})
    faulty = snapshots(intent(reviews_v2=10, extra=(fault,)), cache)
    changed = {n for n, s in sidecars(faulty).items() if s.parts[LISTENER][0] is not after[n].parts[LISTENER][0]}
    assert changed and all(faulty[n].version(LISTENER) != after[n].version(LISTENER) for n in changed)
    kept = set(sidecars(faulty)) - changed
    assert all(faulty[n].version(LISTENER) == after[n].version(LISTENER) for n in kept)


# --- the ingress: one route configuration per exposed host -----------------------------------------------


def ingress_listener(snap: Snapshot) -> dict[str, Any]:
    config: dict[str, Any] = snap.items(LISTENER)["ingress"]["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def test_the_ingress_is_cut_per_host_and_a_one_rule_change_changes_one_host_and_no_scope() -> None:
    cache = RenderCache()
    before = snapshots(intent(), cache)[INGRESS.node_id]
    after = snapshots(intent(reviews_v2=10), cache)[INGRESS.node_id]
    assert scopes(after) == {"shop.example.com": "ingress|shop.example.com",
                             "reviews.example.com": "ingress|reviews.example.com"}
    assert set(after.items(ROUTE)) == {"ingress|shop.example.com", "ingress|reviews.example.com"}
    hcm = ingress_listener(after)
    assert "scoped_routes" in hcm and "rds" not in hcm
    # Host names are case-insensitive, scope keys are not: the host is lowercased first, before any filter.
    assert hcm["http_filters"][0] == LOWERCASE_HOST and hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    # A host no Route exposes stays the mesh's 404; a known host whose rules all fall through says so.
    assert no_scope_reply(after, "ingress") == {"status": 404, "body": NOT_FOUND_BODY, "headers": {}}
    tail = ingress_vhost(after, "reviews.shop")["routes"][-1]
    assert tail["direct_response"] == {"status": 404, "body": {"inline_string": NO_RULE_BODY}}
    # The rule change: one configuration, the same scopes, the other host's configuration the same object.
    changed = {n for n in after.items(ROUTE) if after.digests[ROUTE][n] != before.digests[ROUTE][n]}
    assert changed == {"ingress|reviews.example.com"}
    assert after.items(ROUTE)["ingress|shop.example.com"] is before.items(ROUTE)["ingress|shop.example.com"]
    assert after.version(SCOPED_ROUTE) == before.version(SCOPED_ROUTE)
    assert after.version(LISTENER) == before.version(LISTENER)
    weights = [c["weight"] for c in ingress_vhost(after, "reviews.shop")["routes"][0]["route"]["weighted_clusters"][
        "clusters"]]
    assert weights == [90, 10]


def _route(name: str, hosts: list[str]) -> dict[str, Any]:
    return _doc("Route", name, "data", {"service": "ratings", "hosts": hosts, "http": [{"route": [{"version": "v1"}]}]})


def test_hosts_with_a_port_share_their_hosts_scope_and_one_route_exposes_several_hosts() -> None:
    snap = snapshots(intent(extra=(_route("ratings", ["ratings.example.com:8080", "rates.example.com"]),)))[
        INGRESS.node_id]
    keys = scopes(snap)
    assert keys["ratings.example.com"] == "ingress|ratings.example.com"
    assert keys["rates.example.com"] == "ingress|rates.example.com"
    configs = snap.items(ROUTE)
    for name in ("ingress|ratings.example.com", "ingress|rates.example.com"):
        assert [vh["name"] for vh in configs[name]["virtual_hosts"]] == ["ratings.data"]


def test_a_wildcard_host_keeps_one_route_configuration_matched_by_suffix() -> None:
    snap = snapshots(intent(extra=(_route("ratings", ["*.ratings.example.com"]),)))[INGRESS.node_id]
    assert set(snap.items(ROUTE)) == {"ingress"} and snap.items(SCOPED_ROUTE) == {}
    hcm = ingress_listener(snap)
    assert hcm["rds"]["route_config_name"] == "ingress" and "scoped_routes" not in hcm
    assert LOWERCASE_HOST not in hcm["http_filters"]  # Envoy's own virtual host matching ignores case
    vhosts = {vh["name"]: vh for vh in snap.items(ROUTE)["ingress"]["virtual_hosts"]}
    assert vhosts["ratings.data"]["domains"] == ["*.ratings.example.com", "*.ratings.example.com:*"]
    assert vhosts["not-found"]["domains"] == ["*"]
