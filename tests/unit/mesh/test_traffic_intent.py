"""Route and TrafficPolicy semantics beyond the golden files: Istio's spellings, warnings, override
merging, egress scoping and the checks that need more than one file (tests/invalid/ has one defect per file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest

from mesh.intent import Destination, Intent, ResourceBase, Route, TrafficPolicy
from mesh.render import egress_key, fractional, render
from mesh.validate import validate
from mesh.xds.snapshot import CLUSTER, ENDPOINT, Snapshot
from reconciler.load import load, read_worktree
from tests.fixtures.intents import with_reviews_rules
from tests.fixtures.routes import outbound_vhost
from tests.fixtures.topology import golden_topology as topology

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
GOLDEN = Path(__file__).parent / "golden"


def with_routes(rules: str, extra: str = "") -> dict[str, bytes]:
    """The template with reviews' rules replaced: the first line of `rules` is routes.yaml line 22."""
    return with_reviews_rules(rules, extra)


def test_istio_spellings_are_accepted() -> None:
    loaded = load(with_routes("""\
    - match: [{uri: {exact: /old}}]
      redirect: {uri: /new, responseCode: 307}
    - match: [{uri: {exact: /x}}]
      fault: {abort: {percentage: {value: 0.5}, httpStatus: 503}}
      directResponse: {status: 200, body: {string: ok}}
    - route: [{version: v1}]
"""))
    assert loaded.ok, loaded.problems
    assert loaded.intent is not None
    rules = loaded.intent.routes[("shop", "reviews")].spec.http
    assert rules[0].redirect is not None and rules[0].redirect.redirect_code == 307
    assert rules[1].fault is not None and rules[1].fault.abort is not None
    assert rules[1].fault.abort.percentage == 0.5
    assert rules[1].direct_response is not None and rules[1].direct_response.body == "ok"


def test_per_try_timeout_longer_than_the_timeout_is_a_warning() -> None:
    loaded = load(with_routes("""\
    - timeout: 1s
      retries: {attempts: 2, perTryTimeout: 2s}
      route: [{version: v1}]
"""))
    assert loaded.ok
    assert [str(w) for w in loaded.warnings] == [
        "routes.yaml:23: warning: spec.http[0].retries.perTryTimeout: perTryTimeout 2s exceeds the rule's "
        "timeout 1s: no retry can happen"]


def test_every_error_of_a_rule_at_once() -> None:
    errors = [str(p) for p in load(with_routes("""\
    - match: [{uri: {regex: "(?=x)"}, headers: {"bad header": {present: true}}}]
      redirect: {uri: /elsewhere}
      rewrite: {uri: /x}
      route: [{version: v1}]
    - route: [{version: v1}]
""")).problems]
    assert errors == [
        "routes.yaml:22: spec.http[0].match[0].headers.bad header: invalid header name 'bad header'",
        "routes.yaml:22: spec.http[0].match[0].uri.regex: invalid regex '(?=x)' (RE2 syntax, as Envoy uses): "
        "invalid perl operator: (?=",
        "routes.yaml:23: spec.http[0].redirect: a rule has exactly one of route, redirect, directResponse "
        "(got route, redirect)",
        "routes.yaml:24: spec.http[0].rewrite: rewrite applies only to a rule that routes (has `route`)",
    ]


class FakeRollout(ResourceBase):
    """Stands in for the rollouts layer's kind: it governs reviews' default rule."""

    kind: Literal["FakeRollout"]
    spec: dict[str, Any]

    def governs(self) -> tuple[str, str] | None:
        return ("shop", "reviews")


def test_a_rollout_governed_default_rule_must_route() -> None:
    loaded = load(with_routes("""\
    - redirect: {uri: /elsewhere}
"""))
    resources = [*loaded.resources, FakeRollout.model_validate(
        {"apiVersion": "lockgate.io/v1alpha1", "kind": "FakeRollout", "metadata": {"name": "r", "namespace": "shop"},
         "spec": {}})]
    found = [(f.loc, f.message) for f in validate(resources) if not f.warning]
    assert found == [(("spec", "http", 0, "redirect"),
                      "a Rollout owns this rule's destinations: it must route, not redirect or answer")]


def test_version_overrides_replace_whole_fields() -> None:
    tp = TrafficPolicy.model_validate({
        "apiVersion": "lockgate.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "p"},
        "spec": {"service": "reviews", "loadBalancer": {"simple": "RANDOM"},
                 "connectionPool": {"tcp": {"maxConnections": 5}, "http": {"maxRetries": 1}},
                 "versions": [{"version": "v2", "connectionPool": {"http": {"http2MaxRequests": 7}}}]}})
    v1, v2 = tp.spec.settings("v1"), tp.spec.settings("v2")
    assert v1.connection_pool is not None and v1.connection_pool.tcp is not None
    assert v2.load_balancer == v1.load_balancer  # not overridden: the service's
    assert v2.connection_pool is not None and v2.connection_pool.tcp is None  # replaced whole, as Istio does
    assert v2.connection_pool.http is not None and v2.connection_pool.http.http2_max_requests == 7


def test_a_policy_that_sets_nothing_is_a_warning() -> None:
    files = read_worktree(TEMPLATE)
    files["policy.yaml"] = (b"apiVersion: lockgate.io/v1alpha1\nkind: TrafficPolicy\n"
                            b"metadata: {name: reviews, namespace: shop}\nspec:\n  service: reviews\n")
    loaded = load(files)
    assert loaded.ok
    assert [str(w) for w in loaded.warnings] == [
        "policy.yaml:4: warning: spec: sets nothing: give loadBalancer, connectionPool or outlierDetection"]


def _default_rule(intent: Intent, destinations: list[Destination]) -> Intent:
    """carts.data's Route with these destinations in its catch-all rule (as a person, or a rollout, writes)."""
    route = intent.routes[("data", "carts")]
    http = [r.model_copy(update={"route": destinations}) if not r.match else r for r in route.spec.http]
    routes = {**intent.routes, ("data", "carts"): route.model_copy(
        update={"spec": route.spec.model_copy(update={"http": http})})}
    return intent.model_copy(update={"routes": routes})


def _catch_all_rule(snap: Snapshot) -> dict[str, Any]:
    """The action of carts.data's rule without a match (`prefix: /`) on the frontend's outbound side."""
    (rule,) = [r for r in outbound_vhost(snap, "carts.data")["routes"] if r["match"] == {"prefix": "/"}]
    action: dict[str, Any] = rule["route"]
    return action


def test_hash_policy_follows_the_destinations_ring_hash_clusters() -> None:
    loaded = load(read_worktree(GOLDEN / "policy"))
    assert loaded.intent is not None
    # Weights for carts (v1 cookie-hashed, v2 RANDOM): only v1's key is carried.
    weighted = _default_rule(loaded.intent, [Destination(version="v1", weight=10),
                                             Destination(version="v2", weight=90)])
    snap = render(intent=weighted, topology=topology())["east/shop/frontend-v1-0"]
    default = _catch_all_rule(snap)
    assert default["hash_policy"] == [{"cookie": {"name": "session", "ttl": "3600s", "path": "/"}}]
    weighted = _default_rule(loaded.intent, [Destination(version="v2", weight=100)])
    snap = render(intent=weighted, topology=topology())["east/shop/frontend-v1-0"]
    assert "hash_policy" not in _catch_all_rule(snap)


def test_egress_scopes_sidecars_only() -> None:
    loaded = load(read_worktree(GOLDEN / "egress"))
    assert loaded.intent is not None
    snaps = render(intent=loaded.intent, topology=topology())
    for snap in snaps.values():
        snap.consistent()
    assert set(snaps["east/shop/frontend-v1-0"].items(CLUSTER)) == {
        "inbound|app", "outbound|reviews.shop", "outbound|reviews.shop|v1", "outbound|reviews.shop|v2"}
    assert set(snaps["east/shop/reviews-v2-0"].items(CLUSTER)) == {"inbound|app"}
    assert snaps["east/shop/reviews-v2-0"].items(ENDPOINT) == {}
    # Every service's versions; the every-version cluster only where something routes to it (ratings has no
    # Route, reviews a rollout-governed rule; frontend's Route names v1 only).
    assert sorted(snaps["east/ingress"].items(CLUSTER)) == [
        "outbound|frontend.shop|v1", "outbound|ratings.data", "outbound|ratings.data|v1",
        "outbound|reviews.shop", "outbound|reviews.shop|v1", "outbound|reviews.shop|v2"]
    # Without the egress lists every sidecar sees every service again.
    plain = loaded.intent.model_copy(update={"workloads": {}})
    assert len(render(intent=plain, topology=topology())["east/shop/reviews-v2-0"].items(CLUSTER)) == 7


@pytest.mark.parametrize(("name", "key"), [("reviews", ("shop", "reviews")), ("ratings.data", ("data", "ratings"))])
def test_egress_names(name: str, key: tuple[str, str]) -> None:
    assert egress_key(name, "shop") == key


@pytest.mark.parametrize(("pct", "expected"), [
    (30, {"numerator": 30, "denominator": "HUNDRED"}),
    (100, {"numerator": 100, "denominator": "HUNDRED"}),
    (0, {"numerator": 0, "denominator": "HUNDRED"}),
    (12.5, {"numerator": 125_000, "denominator": "MILLION"}),
    (0.0001, {"numerator": 1, "denominator": "MILLION"}),
])
def test_fractional(pct: float, expected: dict[str, object]) -> None:
    assert fractional(pct) == expected


def test_route_type_is_still_the_route_kind() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    assert all(isinstance(r, Route) for r in loaded.intent.routes.values())
    assert loaded.intent.traffic_policies == {}
