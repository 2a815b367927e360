"""The pure edges around advance: validation with file:line, the Git write-back edit, render overlay."""

from __future__ import annotations

import yaml

from mesh.render import render
from mesh.topology import ClusterTopology, Gateway
from reconciler.load import load
from rollouts.advance import Decision, RolloutState
from rollouts.analysis import BUILTIN_QUERIES, REQUESTS_QUERY, render_query
from rollouts.intent import Rollout
from rollouts.routing import overlay
from rollouts.writeback import commit_message, edit_rollout
from tests.fixtures.intents import with_rollout
from tests.fixtures.routes import ingress_vhost
from tests.fixtures.topology import topology

ROLLOUT = """\
# the reviews rollout
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata:
  name: reviews
  namespace: shop
spec:
  service: reviews
  stable: v1
  canary: v2   # the one being tried
  steps: [10, 50, 100]
  interval: 2s
  analysis:
    metrics:
      - {name: ok, builtin: request-success-rate, min: 99}
"""


def files(rollout: str = ROLLOUT) -> dict[str, bytes]:
    return with_rollout(rollout)


def test_a_valid_rollout_loads_and_governs_its_service() -> None:
    loaded = load(files())
    assert loaded.ok, loaded.problems
    assert loaded.intent is not None
    ro = loaded.intent.of_kind(Rollout)[0]
    assert ro.governs() == ("shop", "reviews")
    # the template's Route writes weights in the default rule: a warning, not an error
    assert any("Rollout owns this rule's weights" in str(w) for w in loaded.warnings)


def test_validation_errors_point_at_file_and_line() -> None:
    bad = (ROLLOUT.replace("builtin: request-success-rate", "builtin: request-sucess-rate")
           .replace("canary: v2", "canary: v9").replace("[10, 50, 100]", "[50, 10, 100]"))
    problems = sorted(str(p) for p in load(files(bad)).problems)
    assert problems == [
        "rollout.yaml:10: spec.canary: service 'reviews' has no version 'v9' (declared: v1, v2)",
        "rollout.yaml:11: spec.steps[1]: steps must increase: 50 then 10",
        "rollout.yaml:15: spec.analysis.metrics[0].builtin: unknown builtin metric 'request-sucess-rate' "
        "(did you mean 'request-success-rate'?)",
    ]


def test_a_metric_needs_a_threshold_and_one_source() -> None:
    both = ROLLOUT.replace("builtin: request-success-rate, min: 99", "builtin: request-success-rate, query: up, min: 1")
    assert [str(p) for p in load(files(both)).problems] == [
        "rollout.yaml:15: spec.analysis.metrics[0]: give exactly one of builtin, query"]
    unbounded = ROLLOUT.replace("builtin: request-success-rate, min: 99", "builtin: request-success-rate")
    assert [str(p) for p in load(files(unbounded)).problems] == [
        "rollout.yaml:15: spec.analysis.metrics[0]: give min, max or compare: a metric without a threshold judges "
        "nothing"]


def test_write_back_promotion_keeps_comments_and_clears_the_canary() -> None:
    out = edit_rollout(files(), namespace="shop", name="reviews", outcome="promoted", canary="v2")
    assert out is not None
    text = out["rollout.yaml"].decode()
    assert text == ROLLOUT.replace("stable: v1", "stable: v2").replace("  canary: v2   # the one being tried\n", "")
    spec = yaml.safe_load(text)["spec"]
    assert spec["stable"] == "v2" and "canary" not in spec


def test_write_back_rollback_reverts_the_canary_to_the_stable() -> None:
    out = edit_rollout(files(), namespace="shop", name="reviews", outcome="rolled-back", canary="v2")
    assert out is not None
    assert out["rollout.yaml"].decode() == ROLLOUT.replace("canary: v2", "canary: v1")


def test_write_back_in_flow_style_and_multi_document_files() -> None:
    flow = "---\nkind: Other\n---\n" + (
        "apiVersion: lockgate.io/v1alpha1\nkind: Rollout\nmetadata: {name: reviews, namespace: shop}\n"
        "spec: {service: reviews, stable: v1, canary: 'v2'}\n")
    out = edit_rollout({"a.yaml": flow.encode()}, namespace="shop", name="reviews", outcome="promoted", canary="v2")
    assert out is not None
    assert yaml.safe_load_all(out["a.yaml"].decode()).__next__() == {"kind": "Other"}
    assert list(yaml.safe_load_all(out["a.yaml"]))[1]["spec"] == {"service": "reviews", "stable": "v2", "canary": None}


def test_write_back_yields_to_a_human_change_of_the_canary() -> None:
    human = ROLLOUT.replace("canary: v2", "canary: v3")
    assert edit_rollout(files(human), namespace="shop", name="reviews", outcome="promoted", canary="v2") is None
    assert edit_rollout(files(), namespace="shop", name="other", outcome="promoted", canary="v2") is None


def test_commit_message_carries_reason_numbers_and_trailers() -> None:
    d = Decision(action="rollback", at=1.0, reasons=("analysis failed (2/2): ok 70 < min 99",),
                 state=RolloutState(phase="rolled-back", stable="v1", canary="v2", canary_revision="c" * 40))
    msg = commit_message(namespace="shop", name="reviews", decision=d, stable_before="v1")
    assert msg.splitlines()[0] == "rollout shop/reviews: roll back v2 (100% to v1)"
    assert "ok 70 < min 99" in msg and "Lockgate-Decision: rollback" in msg


def _topology() -> ClusterTopology:
    return topology((("reviews", "v1", 0, 1000), ("reviews", "v2", 0, 2000)),
                    ingress=Gateway(node_id="east/ingress", address="127.0.1.1", port=80))


def _ingress_routes(rollout: str, state: RolloutState) -> list[dict[str, object]]:
    loaded = load(files(rollout))
    assert loaded.intent is not None, loaded.problems
    shaped = overlay(loaded.intent, {("shop", "reviews"): state})
    snaps = render(intent=shaped, topology=_topology())
    vhost = ingress_vhost(snaps["east/ingress"], "reviews.shop")
    return [r for r in vhost["routes"] if not r.get("name", "").startswith("no-rule-matched")]


def test_overlay_canary_weights_replace_the_default_rule() -> None:
    st = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", weight=10)
    [route] = _ingress_routes(ROLLOUT, st)
    clusters = route["route"]["weighted_clusters"]["clusters"]  # type: ignore[index]
    assert [(c["name"], c["weight"]) for c in clusters] == [("outbound|reviews.shop|v1", 90),
                                                            ("outbound|reviews.shop|v2", 10)]


def test_overlay_writes_weights_into_a_copy_of_the_default_rule_only() -> None:
    from mesh.intent import HTTPMatch, HTTPRule, Route, StringMatch

    loaded = load(files())
    assert loaded.intent is not None, loaded.problems
    route = loaded.intent.routes[("shop", "reviews")]
    exact = HTTPRule(name="exact", match=[HTTPMatch(uri=StringMatch(exact="/pinned"))],
                     route=[{"version": "v1"}])  # type: ignore[list-item]
    default = next(r for r in route.spec.http if not r.match).model_copy(update={"timeout": "2s"})
    edited: Route = route.model_copy(update={"spec": route.spec.model_copy(update={"http": [exact, default]})})
    intent = loaded.intent.model_copy(update={"routes": {**loaded.intent.routes, ("shop", "reviews"): edited}})
    st = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", weight=10)
    shaped = overlay(intent, {("shop", "reviews"): st})
    assert intent.routes[("shop", "reviews")] is edited  # the intent itself is untouched
    rules = shaped.routes[("shop", "reviews")].spec.http
    assert rules[0] == exact  # rules with matches stay as written
    assert [(d.version, d.weight) for d in rules[1].route] == [("v1", 90), ("v2", 10)]
    assert rules[1].timeout == "2s"  # the rest of the default rule stays
    # A governed service without a Route gets one, with the weights as its only rule.
    bare = intent.model_copy(update={"routes": {k: v for k, v in intent.routes.items() if k != ("shop", "reviews")}})
    [rule] = overlay(bare, {("shop", "reviews"): st}).routes[("shop", "reviews")].spec.http
    assert rule.name == "default" and [(d.version, d.weight) for d in rule.route] == [("v1", 90), ("v2", 10)]


def test_overlay_ab_sends_only_matching_requests_to_the_canary() -> None:
    ab = ROLLOUT.replace("  steps: [10, 50, 100]\n",
                         "  strategy: ab\n  match: [{headers: {x-canary: {exact: 'yes'}}}]\n")
    st = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2")
    canary, default = _ingress_routes(ab, st)
    assert canary["match"] == {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "yes"}}]}
    assert canary["route"]["cluster"] == "outbound|reviews.shop|v2"  # type: ignore[index]
    assert default["route"]["cluster"] == "outbound|reviews.shop|v1"  # type: ignore[index]
    done = st.model_copy(update={"phase": "rolled-back"})
    assert [r["route"]["cluster"] for r in _ingress_routes(ab, done)] == ["outbound|reviews.shop|v1"]  # type: ignore[index]


def test_overlay_mirror_copies_the_default_rule_to_the_canary() -> None:
    mirror = ROLLOUT.replace("  steps: [10, 50, 100]\n", "  strategy: mirror\n")
    st = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2")
    [route] = _ingress_routes(mirror, st)
    assert route["route"]["cluster"] == "outbound|reviews.shop|v1"  # type: ignore[index]
    assert route["route"]["request_mirror_policies"] == [{"cluster": "outbound|reviews.shop|v2"}]  # type: ignore[index]


def test_builtin_queries_select_the_canary_inbound_stats() -> None:
    v = {"service": "reviews", "version": "v2", "namespace": "shop", "cluster": "east", "interval": "2000ms"}
    q = render_query(BUILTIN_QUERIES["request-success-rate"], v)
    assert 'envoy_http_conn_manager_prefix="inbound"' in q and 'version="v2"' in q and "[2000ms]" in q
    assert "{{" not in render_query(REQUESTS_QUERY, v)
    assert render_query("x{{ unknown }}", v) == "x{{ unknown }}"
