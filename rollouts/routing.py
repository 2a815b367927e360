"""What the rollout state means for render: a copy of each governed Route with the rollout's say in it.

Pure. The overlay writes into a copy of the service's Route (a Route made for it when it has none):
the weights into the default rule (the first rule without match conditions), the ab/bluegreen match rule
just before it (human match rules above it keep their precedence), and mirroring as the default rule's
own `mirror` (rendered like a mirror a person writes; during a mirror run it takes the place of one
written there). Session affinity (canary runs with `sessionAffinity`) is two ordinary Route features: a
`Set-Cookie` added to the canary destination's answers in the default rule, and just before that rule a
copy of it that sends requests carrying the cookie to the canary only. Render sees an ordinary intent:
it has no rollout parameters and no special cases.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from mesh.intent import (
    Destination,
    HeaderOperations,
    Headers,
    HTTPMatch,
    HTTPRule,
    Intent,
    Metadata,
    Mirror,
    PresenceMatch,
    Route,
    RouteSpec,
)
from mesh.render import default_rule_index
from rollouts.advance import RolloutState, cluster_weight, destinations
from rollouts.intent import Rollout

CANARY_RULE = "rollout-canary"
AFFINITY_RULE = "rollout-affinity"
DEFAULT_RULE = "default"


def overlay(intent: Intent, states: Mapping[tuple[str, str], RolloutState], *, cluster: str | None = None) -> Intent:
    """The intent render should see in `cluster`, given each Rollout's state (keyed by the Rollout's
    (ns, name)): a run with waves has a weight per cluster (a later wave's cluster: 100% stable); without
    waves, or with no cluster given, the run's one weight applies everywhere."""
    routes = dict(intent.routes)
    for ro in intent.of_kind(Rollout):
        st = states.get((ro.metadata.namespace, ro.metadata.name))
        key = (ro.metadata.namespace, ro.spec.service)
        route = _with_weights(routes.get(key), ro, destinations(ro.spec, st, cluster=cluster))
        if st is not None and st.phase == "progressing" and st.canary is not None and st.waiting_for is None:
            if ro.spec.strategy in ("ab", "bluegreen") and ro.spec.match:
                route = _with_canary_rule(route, ro, st.canary)
            if ro.spec.strategy == "mirror":
                route = _with_mirror(route, st.canary)
            if ro.spec.strategy == "canary" and ro.spec.session_affinity is not None \
                    and cluster_weight(ro.spec, st, cluster) > 0:
                route = _with_affinity(route, ro, st)
        routes[key] = route
    if routes == intent.routes:
        return intent
    return intent.model_copy(update={"routes": routes})


def _route_for(ro: Rollout, rules: list[HTTPRule]) -> Route:
    """A Route for a governed service that has none: what Istio users would have written."""
    return Route(api_version="lockgate.io/v1alpha1", kind="Route",
                 metadata=Metadata(name=ro.spec.service, namespace=ro.metadata.namespace),
                 spec=RouteSpec(service=ro.spec.service, http=rules))


def _with_http(route: Route, http: list[HTTPRule]) -> Route:
    return route.model_copy(update={"spec": route.spec.model_copy(update={"http": http})})


def _with_weights(route: Route | None, ro: Rollout, weights: list[Destination]) -> Route:
    """The default rule's destinations are the rollout's (a Route without a default rule is left as is:
    nothing there is the rollout's to govern)."""
    if route is None:
        return _route_for(ro, [HTTPRule(name=DEFAULT_RULE, route=weights)])
    idx = default_rule_index(route)
    if idx is None:
        return route
    http = list(route.spec.http)
    http[idx] = http[idx].model_copy(update={"route": weights})
    return _with_http(route, http)


def _with_canary_rule(route: Route, ro: Rollout, canary: str) -> Route:
    rule = HTTPRule(name=CANARY_RULE, match=list(ro.spec.match), route=[Destination(version=canary, weight=100)])
    idx = default_rule_index(route)
    http = list(route.spec.http)
    http.insert(len(http) if idx is None else idx, rule)
    return _with_http(route, http)


def _with_mirror(route: Route, canary: str) -> Route:
    """The service's Route with its default rule mirroring every request to the canary."""
    idx = default_rule_index(route)
    if idx is None:  # no catch-all rule: nothing the weights govern, so nothing to mirror from
        return route
    http = list(route.spec.http)
    http[idx] = http[idx].model_copy(update={"mirror": Mirror(version=canary)})
    return _with_http(route, http)


def affinity_cookie(ro: Rollout, st: RolloutState) -> tuple[str, str]:
    """(name, value) of the run's canary cookie: the value is derived from the run (its Rollout, canary,
    starting commit and start time), so it is the same in every render of the run and new for the next."""
    assert ro.spec.session_affinity is not None
    run = f"{ro.metadata.namespace}/{ro.metadata.name}/{st.canary}/{st.canary_revision}/{st.started_at!r}"
    return ro.spec.session_affinity.cookie_name, hashlib.sha256(run.encode()).hexdigest()[:16]


def cookie_regex(name: str, value: str) -> str:
    """A `cookie` header holding `name=value` as one of its pairs: Envoy matches a regex against the whole
    value (RE2), so the pairs around it are optional; `xname=value` and `name=value2` do not match."""
    return rf"(?:.*;\s*)?{re.escape(name)}={re.escape(value)}(?:\s*;.*)?"


def _with_affinity(route: Route, ro: Rollout, st: RolloutState) -> Route:
    """The canary's answers in the default rule set the cookie; a copy of the default rule placed just
    before it (timeouts, retries, header edits and all) sends requests with the cookie to the canary."""
    assert ro.spec.session_affinity is not None and st.canary is not None
    idx = default_rule_index(route)
    if idx is None:
        return route
    name, value = affinity_cookie(ro, st)
    cookie = f"{name}={value}; Max-Age={ro.spec.session_affinity.max_age_s}; Path=/"
    set_cookie = Headers(response=HeaderOperations(add={"Set-Cookie": cookie}))  # add: the app's own cookies stay
    http = list(route.spec.http)
    default = http[idx]
    http[idx] = default.model_copy(update={"route": [
        d.model_copy(update={"headers": set_cookie}) if d.version == st.canary else d for d in default.route]})
    sticky = default.model_copy(update={
        "name": AFFINITY_RULE, "match": [HTTPMatch(headers={"cookie": PresenceMatch(regex=cookie_regex(name, value))})],
        "route": [Destination(version=st.canary, weight=100)], "mirror": None})
    http.insert(idx, sticky)
    return _with_http(route, http)
