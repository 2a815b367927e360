"""What every part of one render shares: the extension hooks, the per-render memo, the cross-render cache.

Also the small value helpers (durations, percentages) that listeners, routes and clusters all need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from mesh.intent import Intent, PolicySettings, parse_duration_ms
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import ResourceSet

Proxy = Sidecar | Gateway


class Extension:
    """Hooks through which higher layers (policies, multicluster) shape what render produces.

    Each hook gets one resource as rendered so far and returns it (changed or not); this base class
    changes nothing. Hooks must be pure, like render itself.
    """

    def listener(self, proxy: Proxy, listener: dict[str, Any]) -> dict[str, Any]:
        return listener

    def cluster(self, proxy: Proxy, cluster: dict[str, Any]) -> dict[str, Any]:
        return cluster

    clusters_per_proxy: bool = False
    """Set True if `cluster()` depends on the proxy. Otherwise render calls it once per cluster per
    render and shares the result between proxies (what keeps a thousand-service mesh cheap)."""

    def fingerprint(self) -> object:
        """Equal fingerprints promise equal `cluster()` results for the same input, so results can be
        reused across renders. The default (the instance itself) reuses them within one render only."""
        return self

    def route(self, proxy: Proxy, *, namespace: str, service: str, rule: str,
              route: dict[str, Any]) -> dict[str, Any]:
        return route

    routes_per_proxy: bool = False
    """Set True if `route()` depends on the proxy; otherwise it runs once per route entry per render."""

    def routes_fingerprint(self) -> object:
        """Equal values across renders promise equal `route()` results for equal inputs, so a render may
        keep the last one's route entries of every service whose Route did not change (`Dirty`). The
        default promises that only for an extension that does not hook routes at all."""
        return () if type(self).route is Extension.route else self

    def inbound_route(self, proxy: Sidecar, route_config: dict[str, Any]) -> dict[str, Any]:
        """A sidecar's inbound route configuration. What a hook puts here (per-route filter configuration,
        say) applies to the next request on connections already open, because Envoy swaps a route
        configuration under live connections, while a changed listener reaches only new ones (old
        connections drain on the old filter chain). Return `route_config` itself where nothing changes:
        render then keeps one configuration for every such sidecar."""
        return route_config

    def secrets(self, proxy: Proxy) -> list[dict[str, Any]]:
        return []

    def endpoints(self, cla: dict[str, Any], *, namespace: str, service: str, version: str | None
                  ) -> dict[str, Any]:
        """One ClusterLoadAssignment of this cluster's instances (`version` None: every version). Endpoints
        are shared by every proxy of a cluster, so this hook cannot depend on the proxy; results are reused
        across renders while `fingerprint()` is equal."""
        return cla

    def gateway(self, proxy: Gateway, *, intent: Intent, topology: ClusterTopology) -> GatewayResources | None:
        """The whole configuration of a gateway whose kind render does not know (render knows `ingress`);
        None: not this extension's kind."""
        return None


@dataclass(frozen=True)
class GatewayResources:
    """What an extension renders for a gateway of its own kind."""

    listeners: Sequence[dict[str, Any]] = ()
    clusters: Sequence[dict[str, Any]] = ()
    endpoints: Sequence[dict[str, Any]] = ()


ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


FAULT_FILTER = "envoy.filters.http.fault"


FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


ADS = {"ads": {}, "resource_api_version": "V3"}


NOT_FOUND_BODY = "lockgate: no route for this host\n"


GroupConfig = tuple[tuple[object, ...], dict[str, Any]]
"""One destination's outbound route configuration and the virtual hosts it was made of."""
ScopedGroup = tuple[tuple[object, ...], ResourceSet, ResourceSet, tuple[tuple[tuple[Any, ...], GroupConfig], ...],
                    tuple[tuple[Any, ...], tuple[object, ...], tuple[Any, ...]]]
"""A bucket of per-destination outbound routes: its virtual hosts, its scopes, its route configurations,
its destinations' configurations (by key), and the cache entries it came from (its scope set's key in
`RenderCache.sets`, its scopes' entries in `RenderCache.configs`, its route configuration set's key in
`RenderCache.sets`)."""


Dirty = frozenset[tuple[str, str]] | None
"""The services whose route entries may differ from the last render's (their Route or TrafficPolicy is a
new object), everything else being the same; None: anything may differ (`build.changed_services`)."""


@dataclass
class Shared:
    """What every proxy of one render shares: route entries per service, virtual hosts and route
    configurations. Sharing objects is what makes a big mesh cheap: each is built, hashed and
    serialised once, however many proxies carry it (per-resource digests are memoised by identity)."""

    intent: Intent
    cache: RenderCache
    prints: tuple[object, ...] = ()
    dirty: Dirty = None
    hooked: dict[int, tuple[Any, tuple[object, ...], dict[str, Any]]] = field(default_factory=dict)
    routes: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    vhosts: dict[tuple[str, str, bool], dict[str, Any]] = field(default_factory=dict)
    faulty: frozenset[tuple[str, str]] | None = None
    """This render's `listeners.faulty`."""
    ingress_swaps: dict[int, dict[str, Any]] = field(default_factory=dict)
    """With `dirty`: the ingress virtual hosts that changed, new by the old one's id (`routes.ingress_vhosts`)."""
    buckets: dict[tuple[bool, tuple[tuple[str, str], ...]], Any] = field(default_factory=dict)
    """This render's `RenderCache.buckets`."""
    reaches: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = field(default_factory=dict)
    """This render's `RenderCache.reaches`."""
    hooked_routes: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    configs: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = field(default_factory=dict)
    """This render's outbound route configurations, by (namespace, reach)."""
    scoped: dict[Any, tuple[list[ResourceSet], list[ResourceSet]]] = field(default_factory=dict)
    scoped_groups: dict[tuple[Any, ...], ScopedGroup] = field(default_factory=dict)
    """This render's `RenderCache.scoped` (what the next render finds)."""
    layouts: dict[int, tuple[object, tuple[tuple[str, tuple[tuple[str, str], ...]], ...]]] = field(
        default_factory=dict)
    """A reach's services in buckets (routes._layout), by the identity of _http_reach's tuple."""
    remote_buckets: dict[tuple[tuple[str, str], ...], tuple[ResourceSet, ResourceSet]] = field(default_factory=dict)
    """Scopes and route configurations of one bucket as callers outside its namespace see it, by its services."""
    group_configs: dict[tuple[Any, ...], GroupConfig] = field(default_factory=dict)
    """This render's `RenderCache.group_configs`: one destination's route configuration, by its virtual hosts."""
    http_reach: dict[int, tuple[object, tuple[tuple[str, str], ...]]] = field(default_factory=dict)
    """A reach (by identity, held) -> its services that are not TCP, sorted (routes._http_reach)."""
    """This render's outbound scopes and per-destination route configurations, by (namespace, reach)."""


@dataclass(frozen=True)
class Ctx:
    extensions: Sequence[Extension]
    proxy: Proxy
    shared: Shared

    @property
    def intent(self) -> Intent:
        return self.shared.intent

    def listener(self, res: dict[str, Any]) -> dict[str, Any]:
        for ext in self.extensions:
            res = ext.listener(self.proxy, res)
        return res

    def cluster(self, res: dict[str, Any]) -> dict[str, Any]:
        for ext in self.extensions:
            res = ext.cluster(self.proxy, res)
        return res

    def route(self, res: dict[str, Any], *, namespace: str, service: str, rule: str) -> dict[str, Any]:
        for ext in self.extensions:
            res = ext.route(self.proxy, namespace=namespace, service=service, rule=rule, route=res)
        return res

    def inbound_route(self, res: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(self.proxy, Sidecar), "only sidecars have an inbound side"
        for ext in self.extensions:
            res = ext.inbound_route(self.proxy, res)
        return res

    def secrets(self) -> list[dict[str, Any]]:
        return [s for ext in self.extensions for s in ext.secrets(self.proxy)]


K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class Swept(dict[K, V]):
    """A render cache's memo that can forget what a full render did not use.

    Its keys name reaches, host lists and scopes, so without this it held every one the mesh ever had: a
    commit adding a service made a new reach, and with it a set of every cluster, every endpoint and a
    namespace's scopes (measured at 1000 services: 0.4 MB per such commit, for as long as the reconciler
    ran). A render that walks every service (`Dirty` None) tracks which entries it read or wrote (by the
    identity of the value, so no key is hashed twice) and drops the rest at its end (`sweep`); a render
    that walks only the changed services neither tracks nor sweeps, since what it skipped is still what the
    next render needs. The memos keyed by service alone are pruned by key instead (`build._prune`): a
    method call per lookup cost a full render ~25 ms there."""

    __slots__ = ("_used",)

    def __init__(self) -> None:
        super().__init__()
        self._used: set[int] | None = None

    @overload
    def get(self, key: K, default: None = None, /) -> V | None: ...

    @overload
    def get(self, key: K, default: V, /) -> V: ...

    @overload
    def get(self, key: K, default: T, /) -> V | T: ...

    def get(self, key: K, default: object = None, /) -> object:
        found = super().get(key, default)
        if self._used is not None and found is not default:
            self._used.add(id(found))
        return found

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        if self._used is not None:
            self._used.add(id(value))

    @property
    def tracking(self) -> bool:
        return self._used is not None

    def track(self) -> None:
        """From now on, remember which entries are used."""
        self._used = set()

    def keep(self, values: Sequence[object]) -> None:
        """Count these entries (values held by this memo) as used, without looking each up."""
        if self._used is not None:
            self._used.update(map(id, values))

    def sweep(self, *, drop: bool) -> int:
        """Stop tracking; with `drop`, forget every entry not used since `track` (how many)."""
        used, self._used = self._used, None
        if not drop or used is None:
            return 0
        stale = [k for k, v in self.items() if id(v) not in used]
        for k in stale:
            del self[k]
        return len(stale)


class RenderCache:
    """What one render leaves for the next: per-service outputs with the inputs they came from.

    A render given the cache reuses an output whenever its inputs are equal, so a one-route commit
    rebuilds that route and the few objects that hold it, and every unchanged resource keeps its
    identity (and with it its digest, its serialised form and the versions of the sets holding it).
    The output is the same as without the cache; only the work differs."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[tuple[Any, ...], list[tuple[str, dict[str, Any]]]]] = {}
        self.clusters: dict[tuple[str, str], tuple[tuple[Any, ...], tuple[list[Any], list[Any]]]] = {}
        # Identity-keyed entries hold the objects themselves (compared with `is`), never bare ids: a freed
        # object's id can be reused by a different one.
        self.vhosts: dict[tuple[Any, ...], tuple[tuple[object, ...], dict[str, Any]]] = {}
        """Virtual hosts by (ns, svc, local) for sidecars, ("ingress", ns, svc, *hosts) for the ingress."""
        self.configs: Swept[Any, tuple[tuple[object, ...], dict[str, Any]]] = Swept()
        self.sets: Swept[Any, tuple[tuple[object, ...], ResourceSet]] = Swept()
        self.scoped: dict[tuple[Any, ...], ScopedGroup] = {}
        self.group_configs: dict[tuple[Any, ...], GroupConfig] = {}
        """Per destination and its virtual host objects: those, its route configuration and its scopes."""
        self.hooked: dict[int, tuple[Any, tuple[object, ...], dict[str, Any]]] = {}
        self.own: dict[tuple[str, str], tuple[list[dict[str, Any]], ResourceSet]] = {}
        """Per (node id, kind): a proxy's own resources of the last render and their set (build.render)."""
        self.prints: tuple[object, ...] = ()
        """The extensions' fingerprints of the last render (one object while they stay equal)."""
        self.route_prints: tuple[object, ...] = ()
        """The extensions' `routes_fingerprint()`s of the last render."""
        self.intent: Intent | None = None
        self.topology: ClusterTopology | None = None
        """The last render's inputs, against which the next finds what changed (`build.changed_services`)."""
        self.outbound: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        """The last render's `clusters.outbound_clusters` answer (a `clusters.Outbound`)."""
        self.ingress: tuple[list[dict[str, Any]], dict[tuple[str, str], int]] | None = None
        """The last render's ingress virtual hosts, and the index of each service's."""
        self.ingress_cut: Any = None
        """The last render's `routes.ingress_scoped` layout (its buckets, and which host is in which)."""
        self.buckets: dict[tuple[bool, tuple[tuple[str, str], ...]], Any] = {}
        """A sidecar's bucket of per-destination scopes and route configurations, by (its own namespace's,
        its services): what a render whose `Dirty` misses every member takes unchanged."""
        self.reaches: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
        """`routes._http_reach` answers by reach, for a render whose Services are the last one's."""
        self.layout_of: dict[int, tuple[object, Any]] = {}
        """`routes._layout` answers by the identity of their (held) input, from the last render."""
        self.faulty: frozenset[tuple[str, str]] = frozenset()
        """Services with a rule that injects faults, at the last render."""
        self.reach_sets: dict[tuple[tuple[str, str], ...], tuple[ResourceSet, ResourceSet]] = {}
        """Each reach's (clusters, endpoints) sets: kept by a render whose changed services' clusters are
        the same objects as last time (`build.render`)."""
        self.exposed: list[tuple[str, str]] | None = None
        """The services whose Routes have hosts (the ingress's): kept while every Route's hosts are."""
        self.snapshots: dict[str, Any] = {}
        """The last render's snapshot per proxy (`Snapshot.compose(previous=)`)."""


def shared_set(cache: RenderCache, memo: Any, items: list[dict[str, Any]], *, key: str = "name") -> ResourceSet:
    """One ResourceSet for identical item lists (by identity), kept across renders."""
    hit = cache.sets.get(memo)
    if hit is not None and same(hit[0], items):
        return hit[1]
    made = ResourceSet(items, key=key)
    cache.sets[memo] = (tuple(items), made)
    return made


def same(a: Sequence[object], b: Sequence[object]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def duration(ms: int) -> str:
    """Milliseconds -> protobuf JSON Duration (`2s`, `0.250s`)."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms // 1000}.{ms % 1000:03d}s"


def duration_field(text: str) -> str:
    return duration(parse_duration_ms(text))


def fractional(percentage: float) -> dict[str, Any]:
    """0-100 -> Envoy FractionalPercent: per hundred when whole, else per million (1/10000 of a percent)."""
    if percentage == int(percentage):
        return {"numerator": int(percentage), "denominator": "HUNDRED"}
    return {"numerator": round(percentage * 10_000), "denominator": "MILLION"}


def service_policy(intent: Intent, ns: str, svc: str, version: str | None) -> PolicySettings | None:
    tp = intent.traffic_policies.get((ns, svc))
    return tp.spec.settings(version) if tp is not None else None
