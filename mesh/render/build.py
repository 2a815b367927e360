"""Pure render: intent at a revision + where things run -> one xDS Snapshot per proxy.

No clock, no environment, no I/O: the same inputs give byte-identical snapshots, which is what makes
versions meaningful and golden tests possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.intent import (
    REDIRECT_CODES,
    Destination,
    Fault,
    HeaderOperations,
    HTTPMatch,
    HTTPRule,
    Intent,
    PolicySettings,
    PresenceMatch,
    Retries,
    Route,
    Service,
    StringMatch,
    parse_duration_ms,
)
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import HCM, ResourceSet, Snapshot

Proxy = Sidecar | Gateway
Weights = Mapping[tuple[str, str], Sequence[Destination]]
"""(namespace, service) -> destinations that replace the Route's default rule (owned by a rollout)."""


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

    def secrets(self, proxy: Proxy) -> list[dict[str, Any]]:
        return []



ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT_FILTER = "envoy.filters.http.fault"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
ADS = {"ads": {}, "resource_api_version": "V3"}
NOT_FOUND_BODY = "lockgate: no route for this host\n"


@dataclass
class _Shared:
    """What every proxy of one render shares: route entries per service, virtual hosts and route
    configurations. Sharing objects is what makes a big mesh cheap: each is built, hashed and
    serialised once, however many proxies carry it (per-resource digests are memoised by identity)."""

    intent: Intent
    weights: Weights
    cache: RenderCache
    prints: tuple[object, ...] = ()
    hooked: dict[int, tuple[Any, tuple[object, ...], dict[str, Any]]] = field(default_factory=dict)
    routes: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    vhosts: dict[tuple[str, str, bool], dict[str, Any]] = field(default_factory=dict)
    faults: dict[tuple[str, str], bool] = field(default_factory=dict)
    hooked_routes: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    configs: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = field(default_factory=dict)
    """This render's outbound route configurations, by (namespace, reach)."""


@dataclass(frozen=True)
class _Ctx:
    extensions: Sequence[Extension]
    proxy: Proxy
    shared: _Shared

    @property
    def intent(self) -> Intent:
        return self.shared.intent

    @property
    def weights(self) -> Weights:
        return self.shared.weights

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

    def secrets(self) -> list[dict[str, Any]]:
        return [s for ext in self.extensions for s in ext.secrets(self.proxy)]


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
        self.vhosts: dict[tuple[str, str, bool], tuple[tuple[object, ...], dict[str, Any]]] = {}
        self.configs: dict[Any, tuple[tuple[object, ...], dict[str, Any]]] = {}
        self.sets: dict[Any, tuple[tuple[object, ...], ResourceSet]] = {}
        self.hooked: dict[int, tuple[Any, tuple[object, ...], dict[str, Any]]] = {}


def render(
    *,
    intent: Intent,
    topology: ClusterTopology,
    revision: str = "",
    weights: Weights | None = None,
    extensions: Sequence[Extension] = (),
    cache: RenderCache | None = None,
) -> dict[str, Snapshot]:
    """Every proxy of one cluster -> its snapshot. Proxies absent from the topology get nothing.

    `weights` overrides the default rule of the services a rollout governs; `extensions` let higher
    layers add filters, transport sockets and secrets; `cache` (from the previous render of the same
    cluster) makes unchanged parts free."""
    cache = cache if cache is not None else RenderCache()
    shared = _Shared(intent=intent, weights=weights or {}, cache=cache,
                     prints=tuple(ext.fingerprint() for ext in extensions))
    by_service = _outbound_clusters(intent, topology, cache)
    inbound_routes = ResourceSet([_inbound_routes()])
    shared_hooks = not any(ext.clusters_per_proxy for ext in extensions)
    everything = tuple(by_service)
    per_reach: dict[tuple[tuple[str, str], ...], tuple[ResourceSet, ResourceSet, bool]] = {}

    def for_reach(ctx: _Ctx, reach: tuple[tuple[str, str], ...]) -> tuple[ResourceSet, ResourceSet, bool]:
        """Clusters, endpoints and "any fault" of one reach: computed once per render, not per proxy."""
        found = per_reach.get(reach)
        if found is None:
            clusters = _shared_set(cache, ("clusters", reach),
                                   [_hooked(cache, ctx, c) for key in reach for c in by_service[key][0]])
            endpoints = _shared_set(cache, ("endpoints", reach), [e for key in reach for e in by_service[key][1]],
                                    key="cluster_name")
            found = per_reach[reach] = (clusters, endpoints, _any_fault(shared, reach))
        return found

    out: dict[str, Snapshot] = {}
    if topology.eastwest is not None:
        gw = topology.eastwest
        ew_listeners, ew_clusters, ew_endpoints = _eastwest(intent, topology, gw)
        ctx = _Ctx(extensions=extensions, proxy=gw, shared=shared)
        out[gw.node_id] = Snapshot.of(listeners=[ctx.listener(x) for x in ew_listeners], clusters=ew_clusters,
                                      endpoints=ew_endpoints, revision=revision)
    proxies: list[Proxy] = [*([topology.ingress] if topology.ingress else []), *topology.sidecars]
    for proxy in proxies:
        ctx = _Ctx(extensions=extensions, proxy=proxy, shared=shared)
        if isinstance(proxy, Gateway):
            reach = everything  # the ingress may route to any service (hosts, and their mirrors)
            clusters, endpoints, _ = for_reach(ctx, reach)
            exposed = [key for key, r in intent.routes.items() if r.spec.hosts]
            listeners = [_listener("ingress", proxy.address, proxy.port, ingress=True,
                                   fault=_any_fault(shared, exposed))]
            routes = [ResourceSet([_route_config("ingress", _ingress_vhosts(ctx))])]
            own: list[dict[str, Any]] = []
        else:
            allowed = egress(intent, proxy)
            reach = everything if allowed is None else tuple(key for key in everything if key in allowed)
            clusters, endpoints, fault = for_reach(ctx, reach)
            listeners = [
                _listener("inbound", proxy.address, proxy.inbound_port, ingress=False),
                _listener("outbound", proxy.address, proxy.outbound_port, ingress=False, proxy=True, fault=fault),
            ]
            routes = [inbound_routes, _outbound_config(ctx, proxy, reach)]
            own = [ctx.cluster(_inbound_cluster(proxy))]
        if not shared_hooks:
            clusters = ResourceSet([ctx.cluster(c) for key in reach for c in by_service[key][0]])
        out[proxy.node_id] = Snapshot.compose(
            listeners=[ResourceSet([ctx.listener(x) for x in listeners])],
            routes=routes,
            clusters=[clusters, ResourceSet(own)],
            endpoints=[endpoints],
            secrets=[ResourceSet(ctx.secrets())],
            revision=revision,
        )
    cache.hooked = shared.hooked  # only what this render used: the cache does not grow with history
    return out


def _hooked(cache: RenderCache, ctx: _Ctx, cluster: dict[str, Any]) -> dict[str, Any]:
    """A shared cluster after the extensions' proxy-independent hooks, once per cluster object (and
    across renders while the extensions' fingerprints are equal)."""
    if not ctx.extensions:
        return cluster
    prints = ctx.shared.prints
    hit = cache.hooked.get(id(cluster))
    fresh = hit is None or hit[0] is not cluster or hit[1] != prints
    result = ctx.cluster(cluster) if fresh else hit[2]  # type: ignore[index]
    ctx.shared.hooked[id(cluster)] = (cluster, prints, result)
    return result


def _shared_set(cache: RenderCache, memo: Any, items: list[dict[str, Any]], *, key: str = "name") -> ResourceSet:
    """One ResourceSet for identical item lists (by identity), kept across renders."""
    hit = cache.sets.get(memo)
    if hit is not None and _same(hit[0], items):
        return hit[1]
    made = ResourceSet(items, key=key)
    cache.sets[memo] = (tuple(items), made)
    return made


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def cluster_name(namespace: str, service: str, version: str | None = None) -> str:
    """`outbound|reviews.shop|v1` for one version, `outbound|reviews.shop` for all of them."""
    base = f"outbound|{service}.{namespace}"
    return f"{base}|{version}" if version else base


def duration(ms: int) -> str:
    """Milliseconds -> protobuf JSON Duration (`2s`, `0.250s`)."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms // 1000}.{ms % 1000:03d}s"


def _duration(text: str) -> str:
    return duration(parse_duration_ms(text))


def egress(intent: Intent, sidecar: Sidecar) -> frozenset[tuple[str, str]] | None:
    """(namespace, service) pairs a sidecar's workload may call; None when its Workload does not say."""
    workload = intent.workloads.get((sidecar.namespace, sidecar.workload))
    if workload is None or workload.spec.egress is None:
        return None
    return frozenset(egress_key(name, sidecar.namespace) for name in workload.spec.egress)


def egress_key(name: str, namespace: str) -> tuple[str, str]:
    """`svc` (in the workload's own namespace) or `svc.ns` -> (ns, svc)."""
    svc, _, ns = name.partition(".")
    return (ns or namespace, svc)


def fractional(percentage: float) -> dict[str, Any]:
    """0-100 -> Envoy FractionalPercent: per hundred when whole, else per million (1/10000 of a percent)."""
    if percentage == int(percentage):
        return {"numerator": int(percentage), "denominator": "HUNDRED"}
    return {"numerator": round(percentage * 10_000), "denominator": "MILLION"}


# --- listeners and route configurations -------------------------------------------------------------


def _any_fault(shared: _Shared, services: Sequence[tuple[str, str]]) -> bool:
    """Does any rule of these services inject faults (memoised per service for the render)?"""
    def has(key: tuple[str, str]) -> bool:
        found = shared.faults.get(key)
        if found is None:
            r = shared.intent.routes.get(key)
            found = shared.faults[key] = r is not None and any(rule.fault is not None for rule in r.spec.http)
        return found

    return any(has(key) for key in services)


def _listener(name: str, address: str, port: int, *, ingress: bool, proxy: bool = False, fault: bool = False
              ) -> dict[str, Any]:
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "rds": {"route_config_name": name, "config_source": ADS},
        # The fault filter only where a route this listener serves injects faults: a filter in the
        # chain costs every request, faults or not.
        "http_filters": [{"name": FAULT_FILTER, "typed_config": {"@type": FAULT}}, router] if fault else [router],
    }
    if ingress:
        hcm["use_remote_address"] = True
    if proxy:
        # The workload uses this listener as HTTP_PROXY: requests arrive in absolute form.
        hcm["http_protocol_options"] = {"allow_absolute_url": True}
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _route_config(name: str, vhosts: list[dict[str, Any]]) -> dict[str, Any]:
    catch_all = {
        "name": "not-found",
        "domains": ["*"],
        "routes": [{"match": {"prefix": "/"},
                    "direct_response": {"status": 404, "body": {"inline_string": NOT_FOUND_BODY}}}],
    }
    return {"name": name, "virtual_hosts": [*vhosts, catch_all]}


def _inbound_routes() -> dict[str, Any]:
    return {
        "name": "inbound",
        "virtual_hosts": [{
            "name": "inbound",
            "domains": ["*"],
            # The caller's proxy already enforced the route timeout; do not add a second one here.
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|app", "timeout": "0s"}}],
        }],
    }


def _ingress_vhosts(ctx: _Ctx) -> list[dict[str, Any]]:
    vhosts = []
    for (ns, svc), route in sorted(ctx.intent.routes.items()):
        if route.spec.hosts:
            domains = sorted({d for h in route.spec.hosts for d in (h, f"{h}:*")})
            vhosts.append({"name": f"{svc}.{ns}", "domains": domains, "routes": _routes(ctx, route, ns, svc)})
    return vhosts


def _outbound_config(ctx: _Ctx, me: Sidecar, reach: Sequence[tuple[str, str]]) -> ResourceSet:
    """The sidecar's outbound route configuration: one shared set for every sidecar of the same namespace
    and egress (unless an extension's route hook depends on the proxy), kept across renders while its
    virtual hosts are the same objects."""
    key = (me.namespace, tuple(sorted(reach)))
    if any(ext.routes_per_proxy for ext in ctx.extensions):
        return ResourceSet([_route_config("outbound", _mesh_vhosts(ctx, me, key[1]))])
    found = ctx.shared.configs.get(key)
    if found is None:
        vhosts = _mesh_vhosts(ctx, me, key[1])
        prev = ctx.shared.cache.configs.get(key)
        config = prev[1] if prev is not None and _same(prev[0], vhosts) else _route_config("outbound", vhosts)
        ctx.shared.cache.configs[key] = (tuple(vhosts), config)
        found = ctx.shared.configs[key] = config
    return _shared_set(ctx.shared.cache, ("routes", key), [found])


def _mesh_vhosts(ctx: _Ctx, me: Sidecar, reach: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One virtual host per Service it may call, addressed as `svc.ns` (and `svc` inside its own namespace).

    Route entries after the extensions' hooks are computed once per service per render (per proxy only
    when a hook says it depends on the proxy); a virtual host is reused across renders while its entries
    are the same objects."""
    per_proxy = any(ext.routes_per_proxy for ext in ctx.extensions)
    vhosts = []
    for ns, svc in reach:
        local = ns == me.namespace
        routes = _hooked_routes(ctx, ns, svc, per_proxy=per_proxy)
        memo_key = (ns, svc, local)
        vhost = None if per_proxy else ctx.shared.vhosts.get(memo_key)
        if vhost is None:
            prev = ctx.shared.cache.vhosts.get(memo_key)
            reuse = prev is not None and _same(prev[0], routes)
            vhost = prev[1] if prev is not None and reuse else _vhost(ns, svc, local, routes)
            if not per_proxy:
                ctx.shared.cache.vhosts[memo_key] = (tuple(routes), vhost)
                ctx.shared.vhosts[memo_key] = vhost
        vhosts.append(vhost)
    return vhosts


def _hooked_routes(ctx: _Ctx, ns: str, svc: str, *, per_proxy: bool) -> list[dict[str, Any]]:
    found = None if per_proxy else ctx.shared.hooked_routes.get((ns, svc))
    if found is None:
        base = _service_routes(ctx, ns, svc)
        found = [ctx.route(entry, namespace=ns, service=svc, rule=rule) for rule, entry in base]
        if not per_proxy:
            ctx.shared.hooked_routes[(ns, svc)] = found
    return found


def _vhost(ns: str, svc: str, local: bool, routes: list[dict[str, Any]]) -> dict[str, Any]:
    names = [f"{svc}.{ns}"] + ([svc] if local else [])
    return {"name": f"{svc}.{ns}", "domains": sorted({d for n in names for d in (n, f"{n}:*")}), "routes": routes}


def _service_routes(ctx: _Ctx, ns: str, svc: str) -> list[tuple[str, dict[str, Any]]]:
    """(rule name, route entry) of one service, before extensions: built once per render."""
    found = ctx.shared.routes.get((ns, svc))
    if found is None:
        route = ctx.intent.routes.get((ns, svc))
        service = ctx.intent.services[(ns, svc)]
        inputs = (route, service, tuple(ctx.weights.get((ns, svc), ())), ctx.intent.traffic_policies.get((ns, svc)))
        prev = ctx.shared.cache.routes.get((ns, svc))
        if prev is not None and prev[0] == inputs:
            found = prev[1]
        else:
            found = _base_routes(ctx, route, ns, svc) if route else _default_base(ctx, service)
            ctx.shared.cache.routes[(ns, svc)] = (inputs, found)
        ctx.shared.routes[(ns, svc)] = found
    return found


def _default_base(ctx: _Ctx, service: Service) -> list[tuple[str, dict[str, Any]]]:
    """No Route: every version's instances share the traffic, as in Istio without a VirtualService."""
    ns, svc = service.metadata.namespace, service.metadata.name
    override = ctx.weights.get((ns, svc))
    entry = {"name": "default", "match": {"prefix": "/"},
             "route": _action(ctx, HTTPRule(route=list(override or [])), ns, svc)}
    return [("default", entry)]


def default_rule_index(route: Route) -> int | None:
    """The rule a rollout's weights replace: the first rule without match conditions."""
    return next((i for i, rule in enumerate(route.spec.http) if not rule.match), None)


def _routes(ctx: _Ctx, route: Route, ns: str, svc: str) -> list[dict[str, Any]]:
    return [ctx.route(entry, namespace=ns, service=svc, rule=rule) for rule, entry in _service_routes(ctx, ns, svc)]



def _base_routes(ctx: _Ctx, route: Route, ns: str, svc: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    override = ctx.weights.get((ns, svc))
    default = default_rule_index(route) if override else None
    for i, rule in enumerate(route.spec.http):
        if i == default and override:
            rule = rule.model_copy(update={"route": list(override)})
        body = _rule_body(ctx, rule, ns, svc)
        name = rule.name or f"rule-{i}"
        for j, match in enumerate(rule.match or [HTTPMatch()]):
            entry: dict[str, Any] = {"match": _match(match), **body}
            entry["name"] = name if len(rule.match) <= 1 else f"{name}-{j}"
            out.append((name, entry))
    return out


def _rule_body(ctx: _Ctx, rule: HTTPRule, ns: str, svc: str) -> dict[str, Any]:
    """Everything of a route entry but its name and match: the action, header edits, the fault."""
    body: dict[str, Any]
    if rule.redirect is not None:
        r = rule.redirect
        body = {"redirect": {
            **({"path_redirect": r.uri} if r.uri is not None else {}),
            **({"host_redirect": r.authority} if r.authority is not None else {}),
            "response_code": REDIRECT_CODES[r.redirect_code],
        }}
    elif rule.direct_response is not None:
        d = rule.direct_response
        body = {"direct_response": {"status": d.status,
                                    **({"body": {"inline_string": d.body}} if d.body is not None else {})}}
    else:
        body = {"route": _action(ctx, rule, ns, svc)}
    if rule.headers is not None:
        for side, ops in (("request", rule.headers.request), ("response", rule.headers.response)):
            if ops is not None:
                body.update(_header_operations(side, ops))
    if rule.fault is not None:
        body["typed_per_filter_config"] = {FAULT_FILTER: _fault(rule.fault)}
    return body


def _action(ctx: _Ctx, rule: HTTPRule, ns: str, svc: str) -> dict[str, Any]:
    live = [d for d in rule.route if d.weight > 0]
    action: dict[str, Any]
    if not live:  # a rollout-governed rule before the rollout state exists: every version shares
        action = {"cluster": cluster_name(ns, svc)}
    elif len(live) == 1:
        action = {"cluster": cluster_name(ns, svc, live[0].version)}
    else:
        action = {"weighted_clusters": {"clusters": [
            {"name": cluster_name(ns, svc, d.version), "weight": d.weight} for d in live]}}
    if rule.rewrite is not None:
        if rule.rewrite.uri is not None:
            action["prefix_rewrite"] = rule.rewrite.uri
        if rule.rewrite.authority is not None:
            action["host_rewrite_literal"] = rule.rewrite.authority
    if rule.timeout is not None:
        action["timeout"] = _duration(rule.timeout)
    if rule.retries is not None:
        action["retry_policy"] = _retry_policy(rule.retries)
    if rule.mirror is not None:
        mirror: dict[str, Any] = {"cluster": cluster_name(ns, svc, rule.mirror.version)}
        if rule.mirror.percentage < 100:
            mirror["runtime_fraction"] = {"default_value": fractional(rule.mirror.percentage)}
        action["request_mirror_policies"] = [mirror]
    if hashes := _hash_policies(ctx, ns, svc, [d.version for d in live] or [None]):
        action["hash_policy"] = hashes
    return action


def _retry_policy(retries: Retries) -> dict[str, Any]:
    """Istio's retryOn: Envoy conditions, plus bare status codes (-> retriable-status-codes)."""
    tokens = [t.strip() for t in retries.retry_on.split(",") if t.strip()]
    codes = [int(t) for t in tokens if t.isdigit()]
    conditions = [t for t in tokens if not t.isdigit()]
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    policy: dict[str, Any] = {"retry_on": ",".join(conditions), "num_retries": retries.attempts}
    if codes:
        policy["retriable_status_codes"] = codes
    if retries.per_try_timeout is not None:
        policy["per_try_timeout"] = _duration(retries.per_try_timeout)
    if retries.backoff is not None:
        backoff = {"base_interval": _duration(retries.backoff.base_interval)}
        if retries.backoff.max_interval is not None:
            backoff["max_interval"] = _duration(retries.backoff.max_interval)
        policy["retry_back_off"] = backoff
    return policy


def _fault(fault: Fault) -> dict[str, Any]:
    out: dict[str, Any] = {"@type": FAULT}
    if fault.delay is not None:
        out["delay"] = {"fixed_delay": _duration(fault.delay.fixed_delay),
                        "percentage": fractional(fault.delay.percentage)}
    if fault.abort is not None:
        out["abort"] = {"http_status": fault.abort.http_status, "percentage": fractional(fault.abort.percentage)}
    return out


def _header_operations(side: str, ops: HeaderOperations) -> dict[str, Any]:
    """`set` overwrites, `add` appends; names lower-cased as Envoy stores them."""
    add = [{"header": {"key": k.lower(), "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
           for k, v in sorted(ops.set.items())]
    add += [{"header": {"key": k.lower(), "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
            for k, v in sorted(ops.add.items())]
    out: dict[str, Any] = {}
    if add:
        out[f"{side}_headers_to_add"] = add
    if ops.remove:
        out[f"{side}_headers_to_remove"] = [h.lower() for h in ops.remove]
    return out


def _policy(intent: Intent, ns: str, svc: str, version: str | None) -> PolicySettings | None:
    tp = intent.traffic_policies.get((ns, svc))
    return tp.spec.settings(version) if tp is not None else None


def _hash_policies(ctx: _Ctx, ns: str, svc: str, versions: Sequence[str | None]) -> list[dict[str, Any]]:
    """The hash keys of the ring-hash clusters a route sends to (a route carries them, not the cluster)."""
    out: list[dict[str, Any]] = []
    for version in versions:
        settings = _policy(ctx.intent, ns, svc, version)
        ch = settings.load_balancer.consistent_hash if settings and settings.load_balancer else None
        if ch is None:
            continue
        policy: dict[str, Any]
        if ch.http_header_name is not None:
            policy = {"header": {"header_name": ch.http_header_name.lower()}}
        elif ch.http_cookie is not None:
            policy = {"cookie": {
                "name": ch.http_cookie.name,
                **({"ttl": _duration(ch.http_cookie.ttl)} if ch.http_cookie.ttl is not None else {}),
                **({"path": ch.http_cookie.path} if ch.http_cookie.path is not None else {}),
            }}
        elif ch.http_query_parameter_name is not None:
            policy = {"query_parameter": {"name": ch.http_query_parameter_name}}
        else:
            policy = {"connection_properties": {"source_ip": True}}
        if policy not in out:
            out.append(policy)
    return out


def _string_match(m: StringMatch | PresenceMatch) -> dict[str, Any]:
    if m.exact is not None:
        return {"exact": m.exact}
    if m.prefix is not None:
        return {"prefix": m.prefix}
    return {"safe_regex": {"regex": m.regex}}


def _condition(name: str, m: PresenceMatch) -> dict[str, Any]:
    return {"name": name, "present_match": True} if m.present else {"name": name, "string_match": _string_match(m)}


def _match(m: HTTPMatch) -> dict[str, Any]:
    out: dict[str, Any]
    if m.uri is None or m.uri.prefix is not None:
        out = {"prefix": m.uri.prefix if m.uri else "/"}
    elif m.uri.exact is not None:
        out = {"path": m.uri.exact}
    else:
        out = {"safe_regex": {"regex": m.uri.regex}}
    headers = [_condition(name.lower(), hm) for name, hm in sorted(m.headers.items(), key=lambda x: x[0].lower())]
    if m.method is not None:
        headers.append({"name": ":method", "string_match": {"exact": m.method}})
    if headers:
        out["headers"] = headers
    if m.query_params:
        out["query_parameters"] = [_condition(name, qm) for name, qm in sorted(m.query_params.items())]
    return out


# --- clusters and endpoints -------------------------------------------------------------------------


def _outbound_clusters(
    intent: Intent, topology: ClusterTopology, cache: RenderCache
) -> dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Per service: an EDS cluster for the service and one per version, with this cluster's ready
    instances. Grouped so that a sidecar's egress list can pick whole services."""
    out: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    ready: dict[tuple[str, str], list[Sidecar]] = {}
    for sc in topology.sidecars:
        if sc.node_id in topology.ready:
            ready.setdefault((sc.namespace, sc.service), []).append(sc)
    for (ns, svc), service in sorted(intent.services.items()):
        members_all = tuple(sorted((sc.version, sc.address, sc.inbound_port) for sc in ready.get((ns, svc), ())))
        remote_all = tuple((r.cluster, r.address, r.port, tuple(r.count(ns, svc, v) for v in service.spec.versions))
                           for r in topology.remotes)
        inputs = (service, intent.traffic_policies.get((ns, svc)), members_all, remote_all)
        prev = cache.clusters.get((ns, svc))
        if prev is not None and prev[0] == inputs:
            out[(ns, svc)] = prev[1]
            continue
        clusters, endpoints = [], []
        for version in [None, *service.spec.versions]:
            name = cluster_name(ns, svc, version)
            cluster: dict[str, Any] = {
                "name": name,
                "type": "EDS",
                "connect_timeout": "1s",
                "eds_cluster_config": {"service_name": name, "eds_config": ADS},
            }
            settings = _policy(intent, ns, svc, version)
            if settings is not None:
                cluster.update(_cluster_policy(settings))
            clusters.append(cluster)
            members = sorted((sc.address, sc.inbound_port) for sc in ready.get((ns, svc), ())
                             if version is None or sc.version == version)
            lb = [{"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                  for a, p in members]
            endpoints.append({"cluster_name": name, "endpoints": _localities(topology, lb, ns, svc, version)})
        out[(ns, svc)] = (clusters, endpoints)
        cache.clusters[(ns, svc)] = (inputs, out[(ns, svc)])
    return out


def _localities(topology: ClusterTopology, local: list[dict[str, Any]], ns: str, svc: str, version: str | None
                ) -> list[dict[str, Any]]:
    """This cluster's instances first; other clusters' (through their east-west gateways, weighted by how
    many instances each has) as failover: Envoy sends them traffic only while no local instance is healthy."""
    remote = [(r, n) for r in topology.remotes if (n := r.count(ns, svc, version)) > 0]
    if not remote:
        return [{"lb_endpoints": local}] if local else []
    out: list[dict[str, Any]] = [{"locality": {"zone": topology.cluster}, "lb_endpoints": local}] if local else []
    priority = 1 if local else 0
    for r, n in remote:
        out.append({"locality": {"zone": r.cluster}, "priority": priority, "lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": r.address, "port_value": r.port}}},
            "load_balancing_weight": n}]})
    return out


def sni(namespace: str, service: str, version: str | None) -> str:
    """The TLS server name a sidecar sends to a service (version), by which an east-west gateway routes
    the still-encrypted connection to its own instances: mTLS stays end to end."""
    return f"{version or 'any'}.{service}.{namespace}.lockgate"


def _eastwest(intent: Intent, topology: ClusterTopology, gw: Gateway) -> tuple[list[Any], list[Any], list[Any]]:
    """The east-west gateway: one TLS passthrough filter chain per service (version) with instances here,
    chosen by SNI, each to a cluster of this cluster's instances only (never onward: no loops)."""
    chains, clusters, endpoints = [], [], []
    ready = [sc for sc in topology.sidecars if sc.node_id in topology.ready]
    for (ns, svc), service in sorted(intent.services.items()):
        for version in [None, *service.spec.versions]:
            members = sorted((sc.address, sc.inbound_port) for sc in ready
                             if sc.namespace == ns and sc.service == svc and (version is None or sc.version == version))
            if not members:
                continue
            name = f"eastwest|{svc}.{ns}|{version or 'any'}"
            chains.append({"filter_chain_match": {"server_names": [sni(ns, svc, version)]}, "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": TCP_PROXY, "stat_prefix": name.replace("|", "_"), "cluster": name}}]})
            clusters.append({"name": name, "type": "EDS", "connect_timeout": "1s",
                             "eds_cluster_config": {"service_name": name, "eds_config": ADS}})
            endpoints.append({"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}} for a, p in members]}]})
    listener = {
        "name": "eastwest",
        "address": {"socket_address": {"address": gw.address, "port_value": gw.port}},
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                              "typed_config": {"@type": TLS_INSPECTOR}}],
        "filter_chains": chains,
    }
    return [listener] if chains else [], clusters, endpoints


def _cluster_policy(p: PolicySettings) -> dict[str, Any]:
    """DestinationRule semantics on one EDS cluster: balancing, circuit breaking, outlier ejection."""
    out: dict[str, Any] = {}
    if p.load_balancer is not None:
        out["lb_policy"] = "RING_HASH" if p.load_balancer.consistent_hash else p.load_balancer.simple
    pool = p.connection_pool
    if pool is not None:
        thresholds: dict[str, Any] = {}
        if pool.tcp is not None:
            if pool.tcp.connect_timeout is not None:
                out["connect_timeout"] = _duration(pool.tcp.connect_timeout)
            if pool.tcp.max_connections is not None:
                thresholds["max_connections"] = pool.tcp.max_connections
        if pool.http is not None:
            h = pool.http
            for key, value in (("max_pending_requests", h.http1_max_pending_requests),
                               ("max_requests", h.http2_max_requests), ("max_retries", h.max_retries)):
                if value is not None:
                    thresholds[key] = value
            if h.max_requests_per_connection is not None:
                out["typed_extension_protocol_options"] = {HTTP_OPTIONS: {
                    "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                    "common_http_protocol_options": {"max_requests_per_connection": h.max_requests_per_connection},
                    "explicit_http_config": {"http_protocol_options": {}},  # HTTP/1.1, as without the option
                }}
        if thresholds:
            out["circuit_breakers"] = {"thresholds": [thresholds]}
    od = p.outlier_detection
    if od is not None:
        # As Istio: only the consecutive-5xx rule ejects; Envoy's success-rate rule is switched off.
        detection: dict[str, Any] = {"enforcing_success_rate": 0}
        if od.consecutive_5xx_errors is not None:
            detection["consecutive_5xx"] = od.consecutive_5xx_errors
            detection["enforcing_consecutive_5xx"] = 100 if od.consecutive_5xx_errors > 0 else 0
        if od.interval is not None:
            detection["interval"] = _duration(od.interval)
        if od.base_ejection_time is not None:
            detection["base_ejection_time"] = _duration(od.base_ejection_time)
        if od.max_ejection_percent is not None:
            detection["max_ejection_percent"] = od.max_ejection_percent
        out["outlier_detection"] = detection
    return out


def _inbound_cluster(sc: Sidecar) -> dict[str, Any]:
    return {
        "name": "inbound|app",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "inbound|app",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": sc.address, "port_value": sc.app_port}}}}]}],
        },
    }
