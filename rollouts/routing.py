"""What the rollout state means for render: default-rule weights, canary match rules, mirroring.

Pure. Weights go through `render(weights=...)`; the ab/bluegreen match rules are inserted into a copy
of the service's Route just before its default rule (human match rules above it stay in force and keep
their precedence); mirroring is an `Extension` on the default rule's route action.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.intent import Destination, HTTPRule, Intent, Metadata, Route, RouteSpec
from mesh.render import Extension, Proxy, cluster_name, default_rule_index
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
    mirrors: dict[tuple[str, str], tuple[str, str]] = {}
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
            route = routes.get(key)
            idx = default_rule_index(route) if route else None
            rule = "default" if route is None else (
                (route.spec.http[idx].name or f"rule-{idx}") if idx is not None else "")
            mirrors[key] = (st.canary, rule)
    if routes != intent.routes:
        intent = intent.model_copy(update={"routes": routes})
    return Overlay(intent=intent, weights=weights, extensions=(MirrorExtension(mirrors),) if mirrors else ())


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


@dataclass(frozen=True)
class MirrorExtension(Extension):
    """Copies of the default rule's requests go to the canary too; Envoy discards their answers."""

    targets: Mapping[tuple[str, str], tuple[str, str]]
    """(namespace, service) -> (canary version, name of the default rule)."""

    def route(self, proxy: Proxy, *, namespace: str, service: str, rule: str,
              route: dict[str, Any]) -> dict[str, Any]:
        target = self.targets.get((namespace, service))
        if target is None or rule != target[1] or "route" not in route:
            return route
        action = {**route["route"], "request_mirror_policies": [
            {"cluster": cluster_name(namespace, service, target[0])}]}
        return {**route, "route": action}
