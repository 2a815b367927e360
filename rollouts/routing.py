"""What the rollout state means for render: default-rule weights, canary match rules, mirroring.

Pure. Weights go through `render(weights=...)`; the ab/bluegreen match rules are inserted into a copy
of the service's Route just before its default rule (human match rules above it stay in force and keep
their precedence); mirroring sets the default rule's own `mirror` (Route semantics, rendered like a
mirror a person writes; during a mirror run it takes the place of one written there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.intent import Destination, HTTPRule, Intent, Metadata, Mirror, Route, RouteSpec
from mesh.render import Extension, default_rule_index
from rollouts.advance import RolloutState, destinations
from rollouts.intent import Rollout

CANARY_RULE = "rollout-canary"


@dataclass(frozen=True)
class Overlay:
    intent: Intent
    weights: dict[tuple[str, str], Sequence[Destination]]
    extensions: tuple[Extension, ...]


def overlay(intent: Intent, states: Mapping[tuple[str, str], RolloutState]) -> Overlay:
    """The intent render should see, given each Rollout's state (keyed by the Rollout's (ns, name))."""
    weights: dict[tuple[str, str], Sequence[Destination]] = {}
    routes = dict(intent.routes)
    for ro in intent.of_kind(Rollout):
        st = states.get((ro.metadata.namespace, ro.metadata.name))
        key = (ro.metadata.namespace, ro.spec.service)
        weights[key] = destinations(ro.spec, st)
        if st is None or st.phase != "progressing" or st.canary is None:
            continue
        strategy = ro.spec.strategy
        if strategy in ("ab", "bluegreen") and ro.spec.match:
            routes[key] = _with_canary_rule(routes.get(key), ro, st.canary)
        if strategy == "mirror":
            routes[key] = _with_mirror(routes.get(key), ro, st.canary)
    if routes != intent.routes:
        intent = intent.model_copy(update={"routes": routes})
    return Overlay(intent=intent, weights=weights, extensions=())


def _with_canary_rule(route: Route | None, ro: Rollout, canary: str) -> Route:
    rule = HTTPRule(name=CANARY_RULE, match=list(ro.spec.match), route=[Destination(version=canary, weight=100)])
    if route is None:  # a service without a Route: the canary rule, then the governed default rule
        return Route(api_version="lockgate.io/v1alpha1", kind="Route",
                     metadata=Metadata(name=ro.spec.service, namespace=ro.metadata.namespace),
                     spec=RouteSpec(service=ro.spec.service, http=[rule, HTTPRule(name="default")]))
    idx = default_rule_index(route)
    http = list(route.spec.http)
    http.insert(len(http) if idx is None else idx, rule)
    return route.model_copy(update={"spec": route.spec.model_copy(update={"http": http})})


def _with_mirror(route: Route | None, ro: Rollout, canary: str) -> Route:
    """The service's Route with its default rule mirroring every request to the canary."""
    mirror = Mirror(version=canary)
    if route is None:
        return Route(api_version="lockgate.io/v1alpha1", kind="Route",
                     metadata=Metadata(name=ro.spec.service, namespace=ro.metadata.namespace),
                     spec=RouteSpec(service=ro.spec.service, http=[HTTPRule(name="default", mirror=mirror)]))
    idx = default_rule_index(route)
    if idx is None:  # no catch-all rule: nothing the weights govern, so nothing to mirror from
        return route
    http = list(route.spec.http)
    http[idx] = http[idx].model_copy(update={"mirror": mirror})
    return route.model_copy(update={"spec": route.spec.model_copy(update={"http": http})})
