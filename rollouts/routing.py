"""What the rollout state means for render: a copy of each governed Route with the rollout's say in it.

Pure. The overlay writes into a copy of the service's Route (a Route made for it when it has none):
the weights into the default rule (the first rule without match conditions), the ab/bluegreen match rule
just before it (human match rules above it keep their precedence), and mirroring as the default rule's
own `mirror` (rendered like a mirror a person writes; during a mirror run it takes the place of one
written there). Render sees an ordinary intent: it has no rollout parameters and no special cases.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.intent import Destination, HTTPRule, Intent, Metadata, Mirror, Route, RouteSpec
from mesh.render import default_rule_index
from rollouts.advance import RolloutState, destinations
from rollouts.intent import Rollout

CANARY_RULE = "rollout-canary"
DEFAULT_RULE = "default"


def overlay(intent: Intent, states: Mapping[tuple[str, str], RolloutState]) -> Intent:
    """The intent render should see, given each Rollout's state (keyed by the Rollout's (ns, name))."""
    routes = dict(intent.routes)
    for ro in intent.of_kind(Rollout):
        st = states.get((ro.metadata.namespace, ro.metadata.name))
        key = (ro.metadata.namespace, ro.spec.service)
        route = _with_weights(routes.get(key), ro, destinations(ro.spec, st))
        if st is not None and st.phase == "progressing" and st.canary is not None and st.waiting_for is None:
            if ro.spec.strategy in ("ab", "bluegreen") and ro.spec.match:
                route = _with_canary_rule(route, ro, st.canary)
            if ro.spec.strategy == "mirror":
                route = _with_mirror(route, st.canary)
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
