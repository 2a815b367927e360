"""Clusters and endpoints: one EDS cluster per service and per version, DestinationRule semantics on each."""

from __future__ import annotations

from typing import Any

from mesh.intent import H2_PROTOCOLS, L4_PROTOCOLS, Intent, PolicySettings
from mesh.names import cluster_name
from mesh.render.context import ADS, HTTP_OPTIONS, RenderCache, duration_field, service_policy
from mesh.topology import ClusterTopology, Sidecar

UNLIMITED = 4_294_967_295
"""2^32-1, Istio's connection-pool default. Envoy's own (1024 connections, pending and active requests,
3 retries in flight) sheds load nobody asked it to shed, and 3 parallel retries run out exactly when
instances churn and retries are needed most."""


Outbound = dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]]


def outbound_clusters(intent: Intent, topology: ClusterTopology, cache: RenderCache,
                      dirty: frozenset[tuple[str, str]] | None = None) -> Outbound:
    """Per service: an EDS cluster for the service and one per version (in the order None, *versions),
    with this cluster's ready instances. Grouped so that a sidecar's egress list can pick whole services.
    Extensions' endpoint hooks (instances elsewhere) apply afterwards, in `build`. With `dirty` (the
    topology and every Service as last time: `build.changed_services`), only those services are looked at."""
    ready: dict[tuple[str, str], list[Sidecar]] = {}
    for sc in topology.sidecars if dirty is None or dirty else ():
        if sc.node_id in topology.ready:
            ready.setdefault((sc.namespace, sc.service), []).append(sc)
    if dirty is not None and cache.outbound:
        out = dict(cache.outbound)
        for key in dirty:
            out[key] = _service_clusters(intent, key, intent.services[key], ready, cache)
    else:
        out = {key: _service_clusters(intent, key, service, ready, cache)
               for key, service in sorted(intent.services.items())}
    cache.outbound = out
    return out


def _service_clusters(intent: Intent, key: tuple[str, str], service: Any, ready: dict[tuple[str, str], list[Sidecar]],
                      cache: RenderCache) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ns, svc = key
    members_all = tuple(sorted((sc.version, sc.address, sc.inbound_port) for sc in ready.get(key, ())))
    inputs = (service, intent.traffic_policies.get(key), members_all, all_versions_used(intent, ns, svc))
    prev = cache.clusters.get(key)
    if prev is not None and prev[0] == inputs:
        return prev[1]
    clusters, endpoints = [], []
    for version in cluster_versions(intent, ns, svc):
        name = cluster_name(ns, svc, version)
        cluster: dict[str, Any] = {
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"service_name": name, "eds_config": ADS},
        }
        settings = service_policy(intent, ns, svc, version)
        cluster.update(cluster_policy(settings) if settings is not None else _unlimited())
        if service.spec.protocol in H2_PROTOCOLS:
            cluster = with_http2(cluster)
        elif service.spec.protocol in L4_PROTOCOLS:  # tcp_proxy: HTTP protocol options mean nothing here
            cluster.pop("typed_extension_protocol_options", None)
        clusters.append(cluster)
        members = sorted((sc.address, sc.inbound_port) for sc in ready.get(key, ())
                         if version is None or sc.version == version)
        lb = [{"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
              for a, p in members]
        endpoints.append({"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []})
    found = (clusters, endpoints)
    cache.clusters[key] = (inputs, found)
    return found


def all_versions_used(intent: Intent, ns: str, svc: str) -> bool:
    """Whether anything routes to the service's every-version cluster (`outbound|svc.ns`): a service
    without a Route, a rule whose destinations all weigh 0 (a rollout-governed rule before its state
    exists), a Route without rules (TCP splits by the first rule). Mirrors always name a version.
    Kept in step with `routes._action` and `tcp._split`, which make those references."""
    route = intent.routes.get((ns, svc))
    if route is None or not route.spec.http:
        return True
    hit = _USED.get(id(route))  # by identity (held): asked twice per service per render, models are frozen
    if hit is not None and hit[0] is route:
        return hit[1]
    used = any(rule.redirect is None and rule.direct_response is None and not any(d.weight > 0 for d in rule.route)
               for rule in route.spec.http)
    if len(_USED) >= 100_000:
        _USED.clear()
    _USED[id(route)] = (route, used)
    return used


_USED: dict[int, tuple[Any, bool]] = {}
"""all_versions_used's memo: id of a Route -> (the Route, the answer)."""


def cluster_versions(intent: Intent, ns: str, svc: str) -> list[str | None]:
    """The versions a service has outbound clusters for, in cluster order (None: every version)."""
    versions: list[str | None] = list(intent.services[(ns, svc)].spec.versions)
    return [None, *versions] if all_versions_used(intent, ns, svc) else versions


def _unlimited() -> dict[str, Any]:
    """Circuit breakers as Istio sets them without a connection pool: effectively none (track_remaining
    stays off: it adds gauges per cluster that nothing here reads)."""
    return {"circuit_breakers": UNLIMITED_BREAKERS}


_UNLIMITED_THRESHOLDS: dict[str, Any] = {key: UNLIMITED for key in (
    "max_connections", "max_pending_requests", "max_requests", "max_retries")}
UNLIMITED_BREAKERS: dict[str, Any] = {"thresholds": [_UNLIMITED_THRESHOLDS]}
"""What every cluster without a connection pool holds: one object, never mutated (`cluster_policy` copies
before it sets a threshold), so the encoder writes it once per render, not once per cluster."""


def cluster_policy(p: PolicySettings) -> dict[str, Any]:
    """DestinationRule semantics on one EDS cluster: balancing, circuit breaking, outlier ejection."""
    out = _unlimited()
    lb = p.load_balancer
    if lb is not None and (lb.consistent_hash is not None or lb.simple is not None):
        # localityLbSetting alone leaves the policy as it is; the east-west extension renders it.
        out["lb_policy"] = "RING_HASH" if lb.consistent_hash else lb.simple
    pool = p.connection_pool
    if pool is not None:
        thresholds: dict[str, Any] = dict(_UNLIMITED_THRESHOLDS)  # a value set wins for its field
        out["circuit_breakers"] = {"thresholds": [thresholds]}
        if pool.tcp is not None:
            if pool.tcp.connect_timeout is not None:
                out["connect_timeout"] = duration_field(pool.tcp.connect_timeout)
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
    od = p.outlier_detection
    if od is not None:
        # As Istio: only the consecutive-5xx rule ejects; Envoy's success-rate rule is switched off.
        detection: dict[str, Any] = {"enforcing_success_rate": 0}
        if od.consecutive_5xx_errors is not None:
            detection["consecutive_5xx"] = od.consecutive_5xx_errors
            detection["enforcing_consecutive_5xx"] = 100 if od.consecutive_5xx_errors > 0 else 0
        if od.interval is not None:
            detection["interval"] = duration_field(od.interval)
        if od.base_ejection_time is not None:
            detection["base_ejection_time"] = duration_field(od.base_ejection_time)
        if od.max_ejection_percent is not None:
            detection["max_ejection_percent"] = od.max_ejection_percent
        out["outlier_detection"] = detection
    return out


def with_http2(cluster: dict[str, Any]) -> dict[str, Any]:
    """The cluster speaking HTTP/2 upstream (a gRPC or HTTP2 port), whatever else its protocol options
    say (maxRequestsPerConnection). Between sidecars it runs inside the mTLS, offered by ALPN."""
    options = cluster.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {
        "@type": f"type.googleapis.com/{HTTP_OPTIONS}"})
    options = {**options, "explicit_http_config": {"http2_protocol_options": {}}}
    return {**cluster, "typed_extension_protocol_options": {HTTP_OPTIONS: options}}


def for_protocol(intent: Intent, sc: Sidecar, cluster: dict[str, Any]) -> dict[str, Any]:
    """A sidecar's `inbound|app` cluster in its app's protocol: HTTP/2 to a gRPC or HTTP2 app."""
    service = intent.services.get((sc.namespace, sc.service))
    return with_http2(cluster) if service is not None and service.spec.protocol in H2_PROTOCOLS else cluster


def inbound_cluster(sc: Sidecar) -> dict[str, Any]:
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
