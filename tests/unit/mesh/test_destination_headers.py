"""Header edits per destination (Istio's HTTPRouteDestination.headers): checked like a rule's, with
file:line, and rendered on the destination's weighted cluster (the golden case `destination-headers`)."""

from __future__ import annotations

from typing import Any

from mesh.render import render
from reconciler.load import load
from tests.fixtures.intents import with_reviews_rules
from tests.fixtures.routes import ingress_vhost
from tests.fixtures.topology import golden_topology as topology

RULES = """\
    - match: [{uri: {prefix: /a}}]
      route:
        - {version: v1, weight: 50}
        - version: v2
          weight: 50
          headers:
            response: {add: {Set-Cookie: "c=1; Max-Age=60"}}
"""


def entries(rules: str) -> dict[str, Any]:
    loaded = load(with_reviews_rules(rules))
    assert loaded.intent is not None, loaded.problems
    snap = render(intent=loaded.intent, topology=topology())["east/ingress"]
    vhost = ingress_vhost(snap, "reviews.shop")
    return {r["match"].get("prefix"): r for r in vhost["routes"]}


def test_only_the_destination_s_answers_get_its_headers() -> None:
    clusters = entries(RULES)["/a"]["route"]["weighted_clusters"]["clusters"]
    assert [c["name"].rsplit("|", 1)[1] for c in clusters] == ["v1", "v2"]
    assert "response_headers_to_add" not in clusters[0]
    assert clusters[1]["response_headers_to_add"] == [
        {"header": {"key": "set-cookie", "value": "c=1; Max-Age=60"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}]
    assert "response_headers_to_add" not in entries(RULES)["/a"]  # not the rule's: the stable's answers lack it


def test_one_destination_with_headers_is_a_weighted_cluster_of_one_and_without_a_plain_cluster() -> None:
    one = RULES.replace("        - {version: v1, weight: 50}\n", "").replace("weight: 50", "weight: 100")
    action = entries(one)["/a"]["route"]
    assert [c["weight"] for c in action["weighted_clusters"]["clusters"]] == [100] and "cluster" not in action
    plain = entries("    - match: [{uri: {prefix: /a}}]\n      route: [{version: v2}]\n")["/a"]["route"]
    assert plain["cluster"].endswith("|v2") and "weighted_clusters" not in plain


def test_destination_header_errors_point_at_file_and_line() -> None:
    bad = RULES.replace('add: {Set-Cookie: "c=1; Max-Age=60"}', "set: {Host: x, 'bad name': y}")
    problems = [str(p) for p in load(with_reviews_rules(bad.replace("response:", "request:"))).problems]
    assert problems == [
        "routes.yaml:28: spec.http[0].route[1].headers.request.set.Host: Envoy refuses to set or remove the Host "
        "header here; use rewrite.authority",
        "routes.yaml:28: spec.http[0].route[1].headers.request.set.bad name: invalid header name 'bad name'"], problems
