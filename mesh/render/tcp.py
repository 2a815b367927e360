"""TCP services: the sidecar's per-destination outbound TCP listeners and a TCP service's inbound listener.

No iptables: an app reaches a TCP service through a listener of its own sidecar, one per destination
port (`Sidecar.tcp_outbound`: the runtime picked the local port and told the app). Each forwards whole
connections with `tcp_proxy`, split over the service's version clusters by the Route's weights: a TCP
Route is one rule with weights only (validation), so the rollout overlay steps a TCP canary the way it
steps an HTTP one. The upstream clusters are the HTTP path's own (the security extension's mTLS on
them, without HTTP protocol options for a TCP service: clusters).

A TCP service's "inbound" listener forwards connections to the app with `tcp_proxy`; the security
extension puts network RBAC and a connection rate limit in front and the mTLS transport socket around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mesh.intent import L4_PROTOCOLS, Intent
from mesh.names import cluster_name
from mesh.topology import Sidecar

TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
INBOUND_STAT_PREFIX = "inbound_tcp"
"""`tcp.inbound_tcp.*` in a TCP service's sidecar stats."""


def listener_name(namespace: str, service: str, port: int) -> str:
    return f"outbound_tcp|{port}|{service}.{namespace}"


def stat_prefix(namespace: str, service: str, port: int) -> str:
    """Per destination, so each one's connections are counted apart (`tcp.<prefix>.downstream_cx_total`);
    no `|` or `.`, which Prometheus names would mangle."""
    return f"outbound_tcp_{service}_{namespace}_{port}".replace("-", "_")


def is_tcp(intent: Intent, namespace: str, service: str) -> bool:
    """Whether the proxies carry this service as plain TCP connections (TLS passthrough is refused by
    validation and never reaches render)."""
    svc = intent.services.get((namespace, service))
    return svc is not None and svc.spec.protocol in L4_PROTOCOLS


def destinations(intent: Intent, allowed: frozenset[tuple[str, str]] | None) -> tuple[tuple[str, str, int], ...]:
    """(namespace, service, port) of every TCP service port a workload may call (`allowed`: its egress;
    None: every service), sorted: what the runtime gives local ports to."""
    return tuple(sorted(
        (ns, svc, p.port) for (ns, svc), service in intent.services.items()
        if service.spec.protocol in L4_PROTOCOLS and (allowed is None or (ns, svc) in allowed)
        for p in service.spec.ports))


def outbound_listeners(intent: Intent, sc: Sidecar, reach: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One listener per `tcp_outbound` entry whose service is (still) a TCP service with that port and in
    the sidecar's reach (its egress): an entry the runtime has not caught up with gets no listener."""
    if not sc.tcp_outbound:
        return []  # most sidecars: no TCP destination (and a set of a 1000-service reach per sidecar adds up)
    reachable = set(reach)
    out = []
    for ns, svc, port, local in sc.tcp_outbound:
        service = intent.services.get((ns, svc))
        if (ns, svc) not in reachable or service is None or service.spec.protocol not in L4_PROTOCOLS \
                or port not in {p.port for p in service.spec.ports}:
            continue
        proxy = {"@type": TCP_PROXY, "stat_prefix": stat_prefix(ns, svc, port), **_split(intent, ns, svc)}
        out.append({
            "name": listener_name(ns, svc, port),
            "address": {"socket_address": {"address": sc.outbound_address or sc.address, "port_value": local}},
            "filter_chains": [{"filters": [{"name": TCP_PROXY_FILTER, "typed_config": proxy}]}],
        })
    return out


def _split(intent: Intent, ns: str, svc: str) -> dict[str, Any]:
    """`cluster` or `weighted_clusters` by the Route's one rule; no Route (or a rollout-governed rule
    before its weights exist): every version's instances share, as on the HTTP path."""
    route = intent.routes.get((ns, svc))
    live = [d for d in route.spec.http[0].route if d.weight > 0] if route is not None and route.spec.http else []
    if not live:
        return {"cluster": cluster_name(ns, svc)}
    if len(live) == 1:
        return {"cluster": cluster_name(ns, svc, live[0].version)}
    return {"weighted_clusters": {"clusters": [{"name": cluster_name(ns, svc, d.version), "weight": d.weight}
                                               for d in live]}}


def inbound_listener(listener: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's "inbound" listener (name and address kept) forwarding connections to the app."""
    proxy = {"@type": TCP_PROXY, "stat_prefix": INBOUND_STAT_PREFIX, "cluster": "inbound|app"}
    return {**listener, "filter_chains": [{"filters": [{"name": TCP_PROXY_FILTER, "typed_config": proxy}]}]}
