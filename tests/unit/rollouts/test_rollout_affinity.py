"""Session affinity for canaries: validation, the overlay (a Set-Cookie on the canary's answers and a
cookie rule before the weighted one, for the run only), and what render makes of it."""

from __future__ import annotations

from typing import Any

import pytest
import re2

from mesh.intent import HTTPRule, Intent
from mesh.render import render
from reconciler.load import load
from rollouts.advance import RolloutState
from rollouts.intent import Rollout
from rollouts.routing import AFFINITY_RULE, affinity_cookie, cookie_regex, overlay
from tests.fixtures.intents import rollout_yaml, with_reviews_rules, with_rollout
from tests.fixtures.routes import ingress_vhost
from tests.fixtures.topology import golden_topology as topology

KEY = ("shop", "reviews")
T = 10_000.0


def intent(**spec: Any) -> Intent:
    loaded = load(with_rollout(rollout_yaml(sessionAffinity=spec.pop("affinity", {}), **spec)))
    assert loaded.intent is not None, loaded.problems
    return loaded.intent


def running(weight: int = 20, step: int = 0, **kw: Any) -> RolloutState:
    return RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", canary_revision="abc",
                        step=step, weight=weight, started_at=T, next_analysis_at=T + 10, **kw)


def rules(i: Intent, st: RolloutState | None) -> list[HTTPRule]:
    return list(overlay(i, {KEY: st} if st else {}).routes[KEY].spec.http)


def test_during_a_run_the_canary_sets_the_cookie_and_a_rule_before_the_weights_honours_it() -> None:
    i = intent()
    st = running()
    name, value = affinity_cookie(i.of_kind(Rollout)[0], st)
    assert name == "lockgate-canary" and len(value) == 16
    sticky, default = rules(i, st)
    assert sticky.name == AFFINITY_RULE and [(d.version, d.weight) for d in sticky.route] == [("v2", 100)]
    (match,) = sticky.match
    assert set(match.headers) == {"cookie"} and match.headers["cookie"].regex == cookie_regex(name, value)
    assert sticky.route[0].headers is None  # the client has the cookie already
    stable, canary = default.route
    assert (stable.version, stable.weight, stable.headers) == ("v1", 80, None)  # the stable's answers: no cookie
    assert (canary.version, canary.weight) == ("v2", 20)
    assert canary.headers is not None and canary.headers.response is not None
    assert canary.headers.response.add == {"Set-Cookie": f"lockgate-canary={value}; Max-Age=86400; Path=/"}
    assert not canary.headers.response.set  # added, never overwriting the app's own Set-Cookie


def test_the_cookie_name_and_max_age_come_from_the_spec() -> None:
    i = intent(affinity={"cookieName": "flagger-cookie", "maxAge": "90m"})
    default = rules(i, running())[1]
    headers = default.route[1].headers
    assert headers is not None and headers.response is not None
    (cookie,) = headers.response.add.values()
    assert cookie.startswith("flagger-cookie=") and cookie.endswith("; Max-Age=5400; Path=/")


def test_the_cookie_value_is_the_run_s_same_in_every_render_new_for_the_next_run() -> None:
    ro = intent().of_kind(Rollout)[0]
    a = affinity_cookie(ro, running())
    assert a == affinity_cookie(ro, running(weight=50, step=1))  # the same run at its next step
    assert a != affinity_cookie(ro, running().model_copy(update={"canary_revision": "def", "started_at": T + 99}))


@pytest.mark.parametrize(("header", "matches"), [
    ("lockgate-canary=VALUE", True),
    ("a=1; lockgate-canary=VALUE", True),
    ("a=1;lockgate-canary=VALUE;b=2", True),
    ("lockgate-canary=VALUE; b=2", True),
    ("xlockgate-canary=VALUE", False),
    ("lockgate-canary=VALUEx", False),
    ("lockgate-canary=other", False),
    ("a=lockgate-canary=VALUE", False),
    ("", False),
])
def test_the_cookie_regex_matches_the_pair_whole_as_envoy_does(header: str, matches: bool) -> None:
    value = "0123456789abcdef"
    regex = cookie_regex("lockgate-canary", value)
    assert bool(re2.fullmatch(regex, header.replace("VALUE", value))) is matches  # RE2, a whole-value match


@pytest.mark.parametrize("st", [
    None,
    RolloutState(stable="v1"),
    running(weight=0, waiting_for="confirm-rollout"),
    running().model_copy(update={"phase": "promoted", "stable": "v2", "weight": 0}),
    running().model_copy(update={"phase": "rolled-back", "weight": 0}),
])
def test_outside_a_run_with_traffic_there_is_no_cookie_and_no_affinity_rule(st: RolloutState | None) -> None:
    http = rules(intent(), st)
    assert [r.name for r in http] == ["default"]
    assert all(d.headers is None for d in http[0].route)


def test_at_full_weight_the_canary_still_sets_it_and_without_affinity_nothing_changes() -> None:
    sticky, default = rules(intent(), running(weight=100))
    assert sticky.name == AFFINITY_RULE and [d.version for d in default.route] == ["v2"]
    assert default.route[0].headers is not None
    plain = load(with_rollout(rollout_yaml()))
    assert plain.intent is not None
    assert [r.name for r in rules(plain.intent, running())] == ["default"]


def test_human_rules_keep_their_precedence_and_the_copy_keeps_the_default_rule_s_settings() -> None:
    files = with_reviews_rules("""\
    - name: testers
      match: [{headers: {x-user: {exact: tester}}}]
      route: [{version: v1}]
    - name: default
      timeout: 2s
      retries: {attempts: 1}
""")
    files["rollout.yaml"] = rollout_yaml(sessionAffinity={}).encode()
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems
    http = rules(loaded.intent, running())
    assert [r.name for r in http] == ["testers", AFFINITY_RULE, "default"]
    assert (http[1].timeout, http[1].retries) == (http[2].timeout, http[2].retries) == ("2s", http[2].retries)
    assert http[1].retries is not None and http[1].retries.attempts == 1


def test_render_sets_the_cookie_on_the_canary_cluster_only_and_routes_the_cookie_first() -> None:
    i = intent()
    st = running()
    snap = render(intent=overlay(i, {KEY: st}), topology=topology())["east/ingress"]
    vhost = ingress_vhost(snap, "reviews.shop")
    sticky, default = [r for r in vhost["routes"] if not r["name"].startswith("no-rule-matched")]
    assert sticky["name"] == AFFINITY_RULE and sticky["route"]["cluster"].endswith("|v2")
    name, value = affinity_cookie(i.of_kind(Rollout)[0], st)
    assert sticky["match"]["headers"] == [{"name": "cookie",
                                          "string_match": {"safe_regex": {"regex": cookie_regex(name, value)}}}]
    v1, v2 = default["route"]["weighted_clusters"]["clusters"]
    assert "response_headers_to_add" not in v1
    assert v2["response_headers_to_add"] == [{"header": {"key": "set-cookie", "value": f"{name}={value}; "
                                                         "Max-Age=86400; Path=/"},
                                              "append_action": "APPEND_IF_EXISTS_OR_ADD"}]


@pytest.mark.parametrize(("affinity", "extra", "problem"), [
    ({"cookieName": "a b"}, {}, "rollout.yaml:11: spec.sessionAffinity.cookieName: String should match pattern"),
    ({"maxAge": "500ms"}, {}, "rollout.yaml:11: spec.sessionAffinity.maxAge: maxAge 500ms is under 1s"),
    ({}, {"strategy": "mirror"}, "rollout.yaml:10: warning: spec.sessionAffinity: sessionAffinity has no effect with "
                                 "strategy mirror"),
])
def test_affinity_errors_point_at_file_and_line(affinity: dict[str, str], extra: dict[str, str], problem: str) -> None:
    loaded = load(with_rollout(rollout_yaml(sessionAffinity=affinity, **extra)))
    found = [str(p) for p in [*loaded.problems, *loaded.warnings]]
    assert any(p.startswith(problem) for p in found), found
