"""Pure render: intent at a revision + where things run -> one xDS Snapshot per proxy.

No clock, no environment, no I/O: the same inputs give byte-identical snapshots, which is what makes
versions meaningful and golden tests possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.intent import Destination, HTTPMatch, HTTPRule, Intent, Route, Service, StringMatch, parse_duration_ms
from mesh.snapshot import HCM, Snapshot
from mesh.topology import ClusterTopology, Gateway, Sidecar

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

    def route(self, proxy: Proxy, *, namespace: str, service: str, rule: str,
              route: dict[str, Any]) -> dict[str, Any]:
        return route

    def secrets(self, proxy: Proxy) -> list[dict[str, Any]]:
        return []



ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ADS = {"ads": {}, "resource_api_version": "V3"}
NOT_FOUND_BODY = "lockgate: no route for this host\n"


@dataclass(frozen=True)
class _Ctx:
    intent: Intent
    weights: Weights
    extensions: Sequence[Extension]
    proxy: Proxy

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


def render(
    *,
    intent: Intent,
    topology: ClusterTopology,
    revision: str = "",
    weights: Weights | None = None,
    extensions: Sequence[Extension] = (),
) -> dict[str, Snapshot]:
    """Every proxy of one cluster -> its snapshot. Proxies absent from the topology get nothing.

    `weights` overrides the default rule of the services a rollout governs; `extensions` let higher
    layers add filters, transport sockets and secrets."""
    clusters, endpoints = _outbound_clusters(intent, topology)
    out: dict[str, Snapshot] = {}
    proxies: list[Proxy] = [*([topology.ingress] if topology.ingress else []), *topology.sidecars]
    for proxy in proxies:
        ctx = _Ctx(intent=intent, weights=weights or {}, extensions=extensions, proxy=proxy)
        if isinstance(proxy, Gateway):
            listeners = [_listener("ingress", proxy.address, proxy.port, ingress=True)]
            routes = [_route_config("ingress", _ingress_vhosts(ctx))]
            own_clusters = clusters
        else:
            listeners = [
                _listener("inbound", proxy.address, proxy.inbound_port, ingress=False),
                _listener("outbound", proxy.address, proxy.outbound_port, ingress=False, proxy=True),
            ]
            routes = [_inbound_routes(), _route_config("outbound", _mesh_vhosts(ctx, proxy))]
            own_clusters = [*clusters, _inbound_cluster(proxy)]
        out[proxy.node_id] = Snapshot.of(
            listeners=[ctx.listener(x) for x in listeners],
            routes=routes,
            clusters=[ctx.cluster(c) for c in own_clusters],
            endpoints=endpoints,
            secrets=ctx.secrets(),
            revision=revision,
        )
    return out


def cluster_name(namespace: str, service: str, version: str | None = None) -> str:
    """`outbound|reviews.shop|v1` for one version, `outbound|reviews.shop` for all of them."""
    base = f"outbound|{service}.{namespace}"
    return f"{base}|{version}" if version else base


def duration(ms: int) -> str:
    """Milliseconds -> protobuf JSON Duration (`2s`, `0.250s`)."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms // 1000}.{ms % 1000:03d}s"


# --- listeners and route configurations -------------------------------------------------------------


def _listener(name: str, address: str, port: int, *, ingress: bool, proxy: bool = False) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "rds": {"route_config_name": name, "config_source": ADS},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
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


def _mesh_vhosts(ctx: _Ctx, me: Sidecar) -> list[dict[str, Any]]:
    """One virtual host per Service, addressed as `svc.ns` (and `svc` inside its own namespace)."""
    vhosts = []
    for (ns, svc), service in sorted(ctx.intent.services.items()):
        names = [f"{svc}.{ns}"] + ([svc] if ns == me.namespace else [])
        domains = sorted({d for n in names for d in (n, f"{n}:*")})
        route = ctx.intent.routes.get((ns, svc))
        routes = _routes(ctx, route, ns, svc) if route else _default_routes(ctx, service)
        vhosts.append({"name": f"{svc}.{ns}", "domains": domains, "routes": routes})
    return vhosts


def _default_routes(ctx: _Ctx, service: Service) -> list[dict[str, Any]]:
    """No Route: every version's instances share the traffic, as in Istio without a VirtualService."""
    ns, svc = service.metadata.namespace, service.metadata.name
    override = ctx.weights.get((ns, svc))
    action = _action(HTTPRule(route=list(override)), ns, svc) if override else {"cluster": cluster_name(ns, svc)}
    entry = {"name": "default", "match": {"prefix": "/"}, "route": action}
    return [ctx.route(entry, namespace=ns, service=svc, rule="default")]


def default_rule_index(route: Route) -> int | None:
    """The rule a rollout's weights replace: the first rule without match conditions."""
    return next((i for i, rule in enumerate(route.spec.http) if not rule.match), None)


def _routes(ctx: _Ctx, route: Route, ns: str, svc: str) -> list[dict[str, Any]]:
    out = []
    override = ctx.weights.get((ns, svc))
    default = default_rule_index(route) if override else None
    for i, rule in enumerate(route.spec.http):
        if i == default and override:
            rule = rule.model_copy(update={"route": list(override)})
        action = _action(rule, ns, svc)
        name = rule.name or f"rule-{i}"
        for j, match in enumerate(rule.match or [HTTPMatch()]):
            entry: dict[str, Any] = {"match": _match(match), "route": action}
            entry["name"] = name if len(rule.match) <= 1 else f"{name}-{j}"
            out.append(ctx.route(entry, namespace=ns, service=svc, rule=name))
    return out


def _action(rule: HTTPRule, ns: str, svc: str) -> dict[str, Any]:
    live = [d for d in rule.route if d.weight > 0]
    action: dict[str, Any]
    if not live:  # a rollout-governed rule before the rollout state exists: every version shares
        action = {"cluster": cluster_name(ns, svc)}
    elif len(live) == 1:
        action = {"cluster": cluster_name(ns, svc, live[0].version)}
    else:
        action = {"weighted_clusters": {"clusters": [
            {"name": cluster_name(ns, svc, d.version), "weight": d.weight} for d in live]}}
    if rule.timeout is not None:
        action["timeout"] = duration(parse_duration_ms(rule.timeout))
    if rule.retries is not None:
        policy: dict[str, Any] = {"retry_on": rule.retries.retry_on, "num_retries": rule.retries.attempts}
        if rule.retries.per_try_timeout is not None:
            policy["per_try_timeout"] = duration(parse_duration_ms(rule.retries.per_try_timeout))
        action["retry_policy"] = policy
    return action


def _string_match(m: StringMatch) -> dict[str, Any]:
    if m.exact is not None:
        return {"exact": m.exact}
    if m.prefix is not None:
        return {"prefix": m.prefix}
    return {"safe_regex": {"regex": m.regex}}


def _match(m: HTTPMatch) -> dict[str, Any]:
    out: dict[str, Any]
    if m.uri is None or m.uri.prefix is not None:
        out = {"prefix": m.uri.prefix if m.uri else "/"}
    elif m.uri.exact is not None:
        out = {"path": m.uri.exact}
    else:
        out = {"safe_regex": {"regex": m.uri.regex}}
    headers = [{"name": name.lower(), "string_match": _string_match(sm)}
               for name, sm in sorted(m.headers.items())]
    if m.method is not None:
        headers.append({"name": ":method", "string_match": {"exact": m.method}})
    if headers:
        out["headers"] = headers
    return out


# --- clusters and endpoints -------------------------------------------------------------------------


def _outbound_clusters(
    intent: Intent, topology: ClusterTopology
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An EDS cluster per service and per (service, version), with this cluster's ready instances."""
    clusters, endpoints = [], []
    for (ns, svc), service in sorted(intent.services.items()):
        for version in [None, *service.spec.versions]:
            name = cluster_name(ns, svc, version)
            clusters.append({
                "name": name,
                "type": "EDS",
                "connect_timeout": "1s",
                "eds_cluster_config": {"service_name": name, "eds_config": ADS},
            })
            members = sorted(
                (sc.address, sc.inbound_port)
                for sc in topology.sidecars
                if sc.namespace == ns and sc.service == svc and (version is None or sc.version == version)
                and sc.node_id in topology.ready
            )
            lb = [{"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                  for a, p in members]
            endpoints.append({"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []})
    return clusters, endpoints


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
