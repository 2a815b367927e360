"""The mesh's resilient defaults, as Istio's: retries on failures that never reached an app (to another
instance), no route timeout, connection pools without limits; and each overridable per rule or policy.

Found: SIGKILLing one of two replicas' sidecars gave 502s under load, since nothing retried a connect
failure; Envoy's own defaults (a 15 s route timeout, 1024 connections, 3 retries in flight) were never
asked for either.
"""

from __future__ import annotations

from typing import Any

from mesh.intent import Retries
from mesh.render import cluster_name, render
from mesh.xds.snapshot import CLUSTER, ROUTE
from reconciler.load import Loaded, load
from tests.fixtures.intents import reviews_policy_yaml, with_reviews_rules
from tests.fixtures.routes import ingress_vhosts, outbound_vhosts
from tests.fixtures.topology import topology

UNLIMITED = 4_294_967_295
PREVIOUS_HOSTS = [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]
DEFAULT_RETRIES = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "retriable_status_codes": [503],
    "num_retries": 2,
    "retry_host_predicate": PREVIOUS_HOSTS,
    "host_selection_retry_max_attempts": 5,
}
NO_LIMITS = {"max_connections": UNLIMITED, "max_pending_requests": UNLIMITED, "max_requests": UNLIMITED,
             "max_retries": UNLIMITED}

FRONTEND = "frontend"


def intent(rules: str | None, extra: str = "") -> Loaded:
    """The template's mesh with reviews' rules replaced (None: no Route for reviews at all)."""
    loaded = load(with_reviews_rules(rules, extra))
    assert loaded.ok, loaded.problems
    return loaded


def snaps(rules: str | None, extra: str = "") -> dict[str, Any]:
    loaded = intent(rules, extra)
    assert loaded.intent is not None
    return render(intent=loaded.intent, topology=topology())


def virtual_host(snapshots: dict[str, Any], node: str = "east/shop/frontend-v1-0", config: str = "outbound",
                 vhost: str = "reviews.shop") -> dict[str, Any]:
    """One virtual host of a route configuration; `outbound`: of the sidecar's outbound ones, however cut."""
    snap = snapshots[node]
    hosts = outbound_vhosts(snap) if config == "outbound" else ingress_vhosts(snap)
    (found,) = [v for v in hosts if v["name"] == vhost]
    return dict(found)


def entries(snapshots: dict[str, Any], node: str = "east/shop/frontend-v1-0", config: str = "outbound",
            vhost: str = "reviews.shop") -> dict[str, dict[str, Any]]:
    """Route entries of one virtual host, by name."""
    return {r["name"]: r for r in virtual_host(snapshots, node, config, vhost)["routes"]}


def retries(snapshots: dict[str, Any], rule: str, node: str = "east/shop/frontend-v1-0", config: str = "outbound",
            vhost: str = "reviews.shop") -> dict[str, Any] | None:
    """The retry policy Envoy applies to one rule: the route entry's own, else its virtual host's."""
    vh = virtual_host(snapshots, node, config, vhost)
    entry = next(r for r in vh["routes"] if r["name"] == rule)
    found = entry["route"].get("retry_policy", vh.get("retry_policy"))
    return dict(found) if found is not None else None


def thresholds(snapshots: dict[str, Any], version: str | None) -> list[dict[str, Any]]:
    cluster = snapshots["east/ingress"].items(CLUSTER)[cluster_name("shop", "reviews", version)]
    return list(cluster["circuit_breakers"]["thresholds"])


RULES = """\
    - name: own
      match: [{uri: {prefix: /own}}]
      retries: {attempts: 4, retryOn: "reset,409", perTryTimeout: 1s}
      route: [{version: v1}]
    - name: opted-out
      match: [{uri: {prefix: /opted-out}}]
      retries: {attempts: 0}
      route: [{version: v1}]
    - name: slow
      match: [{uri: {prefix: /slow}}]
      timeout: 3s
      route: [{version: v1}]
    - name: moved
      match: [{uri: {prefix: /moved}}]
      redirect: {uri: /elsewhere}
    - name: default
      route: [{version: v1, weight: 90}, {version: v2, weight: 10}]
"""


def test_a_rule_without_retries_or_timeout_gets_the_defaults_on_sidecars_and_the_ingress() -> None:
    s = snaps(RULES)
    for node, config, vhost in (("east/shop/frontend-v1-0", "outbound", "reviews.shop"),
                                ("east/ingress", "ingress", "reviews.shop")):
        assert retries(s, "default", node, config, vhost) == DEFAULT_RETRIES, node
        action = entries(s, node, config, vhost)["default"]["route"]
        assert "retry_policy" not in action, node  # the virtual host's, once, not one per route entry
        assert action["timeout"] == "0s", node
    # The frontend's own Route (the template's, no retries either) gets them too.
    assert retries(s, "default", "east/ingress", "ingress", "frontend.shop") == DEFAULT_RETRIES


def test_a_service_without_a_route_gets_the_defaults() -> None:
    s = snaps(None)
    action = entries(s)["default"]["route"]
    assert action["cluster"] == cluster_name("shop", "reviews")
    assert retries(s, "default") == DEFAULT_RETRIES
    assert action["timeout"] == "0s"


def test_a_rules_own_retries_replace_the_default() -> None:
    s = snaps(RULES)
    policy = entries(s)["own"]["route"]["retry_policy"]  # the entry's own: Envoy does not merge it with the host's
    # Nothing of the default's conditions, codes or count: only where a retry goes stays (as in Istio).
    assert policy == {"retry_on": "reset,retriable-status-codes", "retriable_status_codes": [409],
                      "num_retries": 4, "per_try_timeout": "1s", "retry_host_predicate": PREVIOUS_HOSTS,
                      "host_selection_retry_max_attempts": 5}


def test_attempts_0_is_valid_and_renders_no_retry_policy() -> None:
    loaded = intent(RULES)
    assert loaded.warnings == []
    assert loaded.intent is not None
    off = next(r for r in loaded.intent.routes[("shop", "reviews")].spec.http if r.name == "opted-out")
    assert off.retries == Retries(attempts=0)
    s = snaps(RULES)
    for node, config in (("east/shop/frontend-v1-0", "outbound"), ("east/ingress", "ingress")):
        # Its own policy without conditions and with no retries: nothing of the virtual host's default.
        assert retries(s, "opted-out", node, config) == {"num_retries": 0}, node
        assert entries(s, node, config)["opted-out"]["route"]["timeout"] == "0s"  # not Envoy's 15 s either


def test_a_rule_timeout_wins_over_no_timeout() -> None:
    s = snaps(RULES)
    e = entries(s)
    assert e["slow"]["route"]["timeout"] == "3s"
    assert retries(s, "slow") == DEFAULT_RETRIES  # a timeout alone keeps the default retries
    assert "route" not in e["moved"]  # a redirect sends nowhere: nothing to time out


def test_the_inbound_route_has_no_timeout_and_no_retries() -> None:
    (vh,) = snaps(RULES)["east/shop/reviews-v1-0"].items(ROUTE)["inbound"]["virtual_hosts"]
    (entry,) = vh["routes"]
    assert entry["route"]["timeout"] == "0s"  # the caller's proxy holds the rule's timeout
    assert "retry_policy" not in entry["route"] and "retry_policy" not in vh  # and retries: no doubling here


def test_hashed_routes_retry_on_the_same_instance() -> None:
    """As Istio: with consistent hashing a retry keeps the key's instance, so no previous-hosts predicate."""
    policy = reviews_policy_yaml("  loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n")
    s = snaps(RULES, policy)
    action = entries(s)["default"]["route"]
    assert action["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    assert retries(s, "default") == {k: v for k, v in DEFAULT_RETRIES.items()
                                     if k not in ("retry_host_predicate", "host_selection_retry_max_attempts")}


def test_clusters_have_no_connection_limits_unless_a_policy_sets_them() -> None:
    s = snaps(RULES)
    for version in ("v1", "v2"):
        assert thresholds(s, version) == [NO_LIMITS], version  # no track_remaining either
    # Every rule names a version, so nothing routes to the every-version cluster: it is not rendered.
    assert cluster_name("shop", "reviews") not in s["east/ingress"].items(CLUSTER)
    frontend = s["east/shop/reviews-v1-0"].items(CLUSTER)
    assert frontend[cluster_name("shop", FRONTEND, "v1")]["circuit_breakers"]["thresholds"] == [NO_LIMITS]


def test_a_policy_value_wins_for_its_field_only() -> None:
    policy = reviews_policy_yaml("""\
  connectionPool: {tcp: {maxConnections: 7}}
  versions:
    - version: v2
      connectionPool: {http: {http2MaxRequests: 9, maxRetries: 0}}
""")
    s = snaps(RULES, policy)
    assert thresholds(s, "v1") == [{**NO_LIMITS, "max_connections": 7}]
    # A version's connectionPool replaces the service's whole (DestinationRule subsets), so v2 has no 7.
    assert thresholds(s, "v2") == [{**NO_LIMITS, "max_requests": 9, "max_retries": 0}]
    # A policy without a connection pool keeps the unlimited defaults.
    balanced = snaps(RULES, policy.replace("  connectionPool: {tcp: {maxConnections: 7}}\n",
                                           "  loadBalancer: {simple: RANDOM}\n"))
    assert thresholds(balanced, "v1") == [NO_LIMITS]
