"""Locality load balancing across clusters: Istio's LocalityLoadBalancerSetting on one cluster's endpoints.

Pure. The east-west extension hands `arrange` the groups of one ClusterLoadAssignment (this cluster's own
instances, and each other cluster's east-west gateway weighted by its instances there) and gets back Envoy
LocalityLbEndpoints:

- failover (the default): Envoy priorities. This cluster's own instances first; then the others by how
  near they are (Istio's order: same region/zone/subzone, same zone, same region, another region), with
  `failover` rules choosing which other region (or cluster) comes next and `failoverPriority` labels
  ranking above locality. Envoy sends a priority traffic only while the ones before it lack healthy
  hosts, and outlier detection is what makes an instance that answers errors unhealthy.
- `distribute`: one priority, a `load_balancing_weight` per locality (the cluster then needs
  `locality_weighted_lb_config`); a locality no `to` names gets nothing.
- `enabled: false`: one priority, no weights per locality: every instance anywhere shares the load.

Localities are the Mesh's (`Mesh.spec.clusters[].locality`, `region/zone/subzone`); every term of a rule
may also name a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.intent import FAILOVER_LABELS, LocalityDistribute, LocalityLbSetting


@dataclass(frozen=True)
class Place:
    """Where a group of instances runs: its cluster and that cluster's locality, as the Mesh gives it."""

    cluster: str
    locality: str | None = None

    def parts(self) -> tuple[str, str, str]:
        """(region, zone, subzone), "" where not given."""
        given = (self.locality or "").split("/") if self.locality else []
        padded = [*given, "", "", ""]
        return padded[0], padded[1], padded[2]

    def envoy_locality(self) -> dict[str, str]:
        """Envoy's Locality; a cluster without one stands as its own zone (so localities stay distinct)."""
        if not self.locality:
            return {"zone": self.cluster}
        return {k: v for k, v in zip(("region", "zone", "sub_zone"), self.parts(), strict=True) if v}

    def label(self, name: str) -> str:
        """The value of one of FAILOVER_LABELS here ("" when the locality does not say)."""
        region, zone, subzone = self.parts()
        return {FAILOVER_LABELS[0]: region, FAILOVER_LABELS[1]: zone, FAILOVER_LABELS[2]: subzone,
                FAILOVER_LABELS[3]: self.cluster}[name]


def matches(term: str, place: Place) -> bool:
    """Whether a rule's term (a cluster name, or a locality pattern as Istio's: `region`, `region/zone`,
    `region/zone/subzone`, `*` for any value of that part and every part after it) covers `place`."""
    if term == place.cluster or term == "*":
        return True
    if not place.locality:
        return False
    for want, have in zip(term.split("/"), place.parts(), strict=False):
        if want == "*":
            return True
        if want != have:
            return False
    return True


def region_or_cluster(term: str, place: Place) -> bool:
    """A failover term: a cluster's name, or a region."""
    return term == place.cluster or (bool(place.locality) and place.parts()[0] == term)


def nearness(here: Place, there: Place) -> int:
    """Istio's locality priority: 0 same region, zone and subzone; 1 same zone; 2 same region; 3 elsewhere
    (a cluster without a region is elsewhere from everyone but itself)."""
    (r1, z1, s1), (r2, z2, s2) = here.parts(), there.parts()
    if not r1 or r1 != r2:
        return 3
    if z1 != z2:
        return 2
    return 0 if s1 == s2 else 1


def failover_rank(setting: LocalityLbSetting | None, here: Place, there: Place) -> int:
    """0-3 as `nearness`; another region is reordered by the `failover` rules whose `from` is here: the
    first rule's `to` is 3, the next one's 4, ..., and regions no rule names come last."""
    near = nearness(here, there)
    if near < 3 or setting is None:
        return near
    rules = [f for f in setting.failover if region_or_cluster(f.from_, here)]
    if not rules:
        return near
    for j, rule in enumerate(rules):
        if region_or_cluster(rule.to, there):
            return 3 + j
    return 3 + len(rules)


def label_rank(labels: Sequence[str], here: Place, there: Place) -> int:
    """`failoverPriority`: 0 when `there` matches `here` on every label, otherwise how many labels are
    left from the first one it differs on (a label neither side has counts as a difference)."""
    for j, name in enumerate(labels):
        mine = here.label(name)
        if not mine or mine != there.label(name):
            return len(labels) - j
    return 0


def distribute_rule(setting: LocalityLbSetting | None, here: Place) -> LocalityDistribute | None:
    """The first `distribute` rule for callers here, if locality balancing is on; None: failover applies."""
    if setting is None or setting.enabled is False:
        return None
    return next((d for d in setting.distribute if matches(d.from_, here)), None)


@dataclass(frozen=True)
class Group:
    """Instances in one place: this cluster's own (`local`), or another cluster's gateway endpoint."""

    place: Place
    endpoints: tuple[dict[str, Any], ...]
    local: bool = False

    @property
    def weight(self) -> int:
        """What the group counts for: its endpoints' weights (1 each unless given)."""
        return sum(int(e.get("load_balancing_weight", 1)) for e in self.endpoints)


@dataclass
class _Out:
    priority: int
    locality: dict[str, str]
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    weight: int | None = None


def arrange(groups: Sequence[Group], *, here: Place, setting: LocalityLbSetting | None) -> list[dict[str, Any]]:
    """Envoy LocalityLbEndpoints for `groups`, in priority order; groups of one locality at one priority
    merge into one entry (their endpoints together, their locality weights summed)."""
    placed: list[tuple[int, Group, int | None]]
    if setting is not None and setting.enabled is False:
        placed = [(0, g, None) for g in groups]
    elif (rule := distribute_rule(setting, here)) is not None:
        placed = _distribute(groups, rule)
    else:
        placed = _failover(groups, here=here, setting=setting)
    merged: dict[tuple[int, tuple[tuple[str, str], ...]], _Out] = {}
    for priority, g, weight in placed:
        locality = g.place.envoy_locality()
        key = (priority, tuple(sorted(locality.items())))
        out = merged.setdefault(key, _Out(priority=priority, locality=locality))
        out.endpoints.extend(g.endpoints)
        if weight is not None:
            out.weight = (out.weight or 0) + weight
    result = []
    for out in sorted(merged.values(), key=lambda o: o.priority):  # stable: local first within a priority
        entry: dict[str, Any] = {"locality": out.locality, "lb_endpoints": out.endpoints, "priority": out.priority}
        if out.weight is not None:
            entry["load_balancing_weight"] = out.weight
        result.append(entry)
    return result


def _failover(groups: Sequence[Group], *, here: Place, setting: LocalityLbSetting | None
              ) -> list[tuple[int, Group, int | None]]:
    """Dense priorities (0, 1, 2 ...): this cluster's instances first, then each rank of the others."""
    labels = setting.failover_priority if setting is not None else []
    # Istio's composition: the label rank is the major key, locality (0-3, failover up to 3+rules) the minor.
    span = 4 + (len(setting.failover) if setting is not None else 0)
    keys = {id(g): (-1 if g.local else label_rank(labels, here, g.place) * span
                    + failover_rank(setting, here, g.place)) for g in groups}
    order = sorted(set(keys.values()))
    return [(order.index(keys[id(g)]), g, None) for g in groups]


def _distribute(groups: Sequence[Group], rule: LocalityDistribute) -> list[tuple[int, Group, int | None]]:
    """Istio's applyLocalityWeights: each `to` entry in order claims the groups it matches that no earlier
    one claimed, and splits its share among them by their instances (rounded up); the rest get nothing."""
    left = list(groups)
    out: list[tuple[int, Group, int | None]] = []
    for term, share in rule.to.items():
        claimed = [g for g in left if matches(term, g.place)]
        left = [g for g in left if all(g is not c for c in claimed)]
        total = sum(g.weight for g in claimed)
        for g in claimed:
            weight = math.ceil(g.weight * share / total) if total else 0
            if weight > 0:
                out.append((0, g, weight))
    return out
