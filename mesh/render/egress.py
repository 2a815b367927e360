"""Traffic leaving the mesh: ExternalServices and the Mesh's outboundTrafficPolicy on a sidecar's outbound side.

The outbound listener is the app's HTTP proxy. Every declared external host gets one virtual host per port.
HTTP ports (plain, or with TLS originated by the sidecar) are routed by Host, as mesh services are. HTTPS
passthrough, TLS and TCP ports are tunnelled: the app sends `CONNECT host:port` (what curl and requests do
for `https://` through a proxy) and the sidecar carries its bytes to the service as they are. Any other host
meets the catch-all: under REGISTRY_ONLY a 502 naming the policy (CONNECT included); under ALLOW_ANY Envoy's
dynamic forward proxy, which resolves the host by DNS. Its HTTP filter is in the chain only under ALLOW_ANY:
a filter costs every request.

External clusters do not pass through the extensions' cluster hooks: the mesh's mTLS (policies) and other
clusters' endpoints (multicluster) are for mesh services, never for a server outside the mesh.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Registers the dynamic forward proxy's messages for packing (mesh.xds.wire imports the others' modules).
from envoy.extensions.clusters.dynamic_forward_proxy.v3 import cluster_pb2  # noqa: F401
from envoy.extensions.filters.http.dynamic_forward_proxy.v3 import dynamic_forward_proxy_pb2  # noqa: F401

from mesh.intent import SYSTEM_CA_BUNDLE, ExternalPort, ExternalService, ExternalTLS, Intent, PolicySettings
from mesh.render.clusters import cluster_policy
from mesh.render.context import RenderCache, duration_field, shared_set
from mesh.render.routes import NO_TIMEOUT, VHOST_RETRIES, retry_policy
from mesh.xds.snapshot import ResourceSet

ALLOW_ANY_CLUSTER = "outbound|allow-any"
"""Where ALLOW_ANY sends undeclared hosts: a dynamic forward proxy cluster (Istio's PassthroughCluster)."""
DNS_CACHE = {"name": "outbound-allow-any", "dns_lookup_family": "V4_PREFERRED"}
"""One DNS cache, named alike by the filter and the cluster (Envoy requires the two configurations equal)."""
DFP_FILTER = "envoy.filters.http.dynamic_forward_proxy"
DFP_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig"
DFP_CLUSTER = "envoy.clusters.dynamic_forward_proxy"
DFP_CLUSTER_TYPE = "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig"
DFP_HTTP_FILTER = {"name": DFP_FILTER, "typed_config": {"@type": DFP_FILTER_TYPE, "dns_cache_config": DNS_CACHE}}
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CONNECT_TIMEOUT = "5s"
"""External services are across networks nobody here controls: more than the mesh's 1 s between sidecars
(connectionPool.tcp.connectTimeout sets it per service)."""
REFUSED_HEADER = "x-lockgate-refused"
REFUSED_BODY = ("lockgate: refused by outboundTrafficPolicy REGISTRY_ONLY: this host is neither declared "
                "(a Service or an ExternalService) nor in this workload's egress\n")
DENIED_BODY = "lockgate: refused: this host is not in this workload's egress\n"
TUNNEL = [{"upgrade_type": "CONNECT", "connect_config": {}}]
"""On a route: Envoy answers the CONNECT itself and carries the bytes that follow as raw TCP."""


def external_cluster_name(port: int, host: str) -> str:
    """`outbound_ext|<port>|<host>`: one cluster per host and port (each host has its own SNI and DNS name)."""
    return f"outbound_ext|{port}|{host}"


def tunnelled(port: ExternalPort, tls: ExternalTLS | None) -> bool:
    """Does the app reach this port by CONNECT (its bytes carried as they are) rather than by HTTP routing?
    HTTPS without `tls` is the app's own TLS, as with passthrough."""
    protocol = port.protocol.upper()
    if protocol == "HTTP":
        return False
    if protocol == "HTTPS":
        return tls is None or tls.mode == "passthrough"
    return True


def originates(port: ExternalPort, tls: ExternalTLS | None) -> bool:
    """Does the sidecar speak TLS to the service on this port (the app plain HTTP)?"""
    return tls is not None and tls.mode == "originate" and port.protocol.upper() in ("HTTP", "HTTPS")


def _refusal(body: str) -> dict[str, Any]:
    return {"status": 502, "body": {"inline_string": body}}


def _refusing_vhost(name: str, domains: list[str], body: str, why: str) -> dict[str, Any]:
    """Every request, CONNECT included, answered 502 with `body` and `why` in a header (CONNECT never
    matches a path prefix: it needs a route of its own)."""
    return {
        "name": name,
        "domains": domains,
        "routes": [{"name": "refused-connect", "match": {"connect_matcher": {}}, "direct_response": _refusal(body)},
                   {"name": "refused", "match": {"prefix": "/"}, "direct_response": _refusal(body)}],
        "response_headers_to_add": [{"header": {"key": REFUSED_HEADER, "value": why},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


REGISTRY_ONLY_VHOST = _refusing_vhost("registry-only", ["*"], REFUSED_BODY, "outboundTrafficPolicy=REGISTRY_ONLY")
"""The outbound catch-all under REGISTRY_ONLY (one object: route configurations compare vhosts by identity).
Under scopes (mesh.render.listeners.scoped) it is the local reply to "no route", counted in
`http.outbound.no_route`; as a virtual host (ALLOW_ANY's egress refusals) in `rq_direct_response`."""
ALLOW_ANY_VHOST: dict[str, Any] = {
    "name": "allow-any",
    "domains": ["*"],
    "routes": [
        {"name": "any-connect", "match": {"connect_matcher": {}},
         "route": {"cluster": ALLOW_ANY_CLUSTER, "timeout": NO_TIMEOUT, "upgrade_configs": TUNNEL}},
        {"name": "any", "match": {"prefix": "/"}, "route": {"cluster": ALLOW_ANY_CLUSTER, "timeout": NO_TIMEOUT}},
    ],
}
"""The outbound catch-all under ALLOW_ANY: HTTP by Host, and CONNECT tunnels, to wherever DNS says."""
ALLOW_ANY_CLUSTER_CONFIG: dict[str, Any] = {
    "name": ALLOW_ANY_CLUSTER,
    "connect_timeout": CONNECT_TIMEOUT,
    "lb_policy": "CLUSTER_PROVIDED",
    "cluster_type": {"name": DFP_CLUSTER, "typed_config": {"@type": DFP_CLUSTER_TYPE, "dns_cache_config": DNS_CACHE}},
}


def outbound_listener(listener: dict[str, Any], *, allow_any: bool) -> dict[str, Any]:
    """The outbound listener taking CONNECT (routes decide: tunnel or refuse; without it Envoy answers 403
    before any route is asked), also in HTTP/1.0 (Python 3.11's http.client, and urllib3 under it, send
    `CONNECT host:port HTTP/1.0`; Envoy answers 426 to HTTP/1.0 unless told), and under ALLOW_ANY the
    dynamic forward proxy filter before the router."""
    chains = []
    for chain in listener["filter_chains"]:
        filters = []
        for f in chain["filters"]:
            if f.get("name") == "envoy.filters.network.http_connection_manager":
                config = {**f["typed_config"], "upgrade_configs": [{"upgrade_type": "CONNECT"}]}
                config["http_protocol_options"] = {**config.get("http_protocol_options", {}), "accept_http_10": True}
                if allow_any:
                    *before, router = config["http_filters"]
                    config["http_filters"] = [*before, DFP_HTTP_FILTER, router]
                f = {**f, "typed_config": config}
            filters.append(f)
        chains.append({**chain, "filters": filters})
    return {**listener, "filter_chains": chains}


@dataclass(frozen=True)
class OutboundEgress:
    """What one sidecar's outbound side gets for traffic leaving the mesh."""

    key: tuple[tuple[str, str], ...]
    """Tells apart route configurations that differ by it: the policy and the ExternalServices in reach, as
    pairs no mesh service's (namespace, name) can spell (upper case, a colon)."""
    vhosts: tuple[dict[str, Any], ...]
    """The external services' virtual hosts, and under ALLOW_ANY the refusals of what egress leaves out."""
    catch_all: dict[str, Any]
    clusters: ResourceSet
    allow_any: bool


def _external_parts(es: ExternalService) -> dict[str, Any]:
    """One ExternalService's clusters and virtual hosts (in host, then port order)."""
    spec = es.spec
    clusters: list[dict[str, Any]] = []
    vhosts: list[dict[str, Any]] = []
    policy = cluster_policy(PolicySettings(connection_pool=spec.connection_pool,
                                            outlier_detection=spec.outlier_detection))
    for host in spec.hosts:
        bare = False  # `http://host/` (no port) goes to the first HTTP-routed port
        for port in spec.ports:
            name = external_cluster_name(port.number, host)
            clusters.append(_cluster(name, host, port, es, policy))
            if tunnelled(port, spec.tls):
                vhosts.append({"name": name, "domains": [f"{host}:{port.number}"], "routes": [
                    {"name": "tunnel", "match": {"connect_matcher": {}},
                     "route": {"cluster": name, "timeout": NO_TIMEOUT, "upgrade_configs": TUNNEL}}]})
                continue
            action: dict[str, Any] = {"cluster": name,
                                      "timeout": duration_field(spec.timeout) if spec.timeout else NO_TIMEOUT}
            if (retry := retry_policy(spec.retries, sticky=False)) is not None:
                action["retry_policy"] = retry
            domains = [f"{host}:{port.number}", *([] if bare else [host])]
            bare = True
            vhosts.append({"name": name, "domains": sorted(domains),
                           "routes": [{"name": "default", "match": {"prefix": "/"}, "route": action}],
                           "retry_policy": VHOST_RETRIES})
    return {"clusters": clusters, "vhosts": vhosts}


def _cluster(name: str, host: str, port: ExternalPort, es: ExternalService, policy: dict[str, Any]) -> dict[str, Any]:
    spec = es.spec
    targets = [(ep.address, ep.port or port.number) for ep in spec.endpoints] or [(host, port.number)]
    static = all(_is_ip(address) for address, _ in targets)
    cluster: dict[str, Any] = {"name": name, "type": "STATIC" if static else "STRICT_DNS",
                               "connect_timeout": CONNECT_TIMEOUT}
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}} for a, p in targets]}]}
    cluster.update(policy)
    if originates(port, spec.tls):
        assert spec.tls is not None
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls",
                                       "typed_config": upstream_tls(host, spec.tls)}
    return cluster


def upstream_tls(host: str, tls: ExternalTLS) -> dict[str, Any]:
    """TLS to the service: SNI the host (or `sni`), its certificate chained to `caCertificates` (or the system
    bundle) and naming the host (or one of `subjectAltNames`)."""
    ca = {"inline_string": tls.ca_certificates} if tls.ca_certificates else {"filename": SYSTEM_CA_BUNDLE}
    sans = tls.subject_alt_names or [host]
    return {"@type": UPSTREAM_TLS, "sni": tls.sni or host, "common_tls_context": {"validation_context": {
        "trusted_ca": ca,
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": s}} for s in sans]}}}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


@dataclass
class EgressRender:
    """One render's view of the ExternalServices and the outbound traffic policy; parts are built once per
    render, and kept across renders (in the render cache) while their ExternalService is the same object."""

    intent: Intent
    cache: RenderCache
    externals: dict[tuple[str, str], ExternalService] = field(init=False)
    _made: dict[object, OutboundEgress] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        found = {(es.metadata.namespace, es.metadata.name): es for es in self.intent.of_kind(ExternalService)}
        self.externals = dict(sorted(found.items()))

    @property
    def allow_any(self) -> bool:
        return self.intent.mesh.spec.outbound_traffic_policy.mode == "ALLOW_ANY"

    def for_sidecar(self, *, namespace: str, allowed: frozenset[tuple[str, str]] | None,
                    reach: Sequence[tuple[str, str]]) -> OutboundEgress:
        """What a sidecar in `namespace` gets, `allowed` its workload's egress (None: everything) and `reach`
        the mesh services it may call."""
        ext_reach = tuple(k for k in self.externals if allowed is None or k in allowed)
        memo = (namespace if allowed is not None else "", tuple(reach) if allowed is not None else (), ext_reach)
        found = self._made.get(memo)
        if found is None:
            found = self._made[memo] = self._make(namespace, allowed, reach, ext_reach)
        return found

    def _parts(self, key: tuple[str, str]) -> dict[str, Any]:
        es = self.externals[key]
        hit = self.cache.configs.get(("egress", key))
        if hit is not None and hit[0][0] is es:
            return hit[1]
        parts = _external_parts(es)
        self.cache.configs[("egress", key)] = ((es,), parts)
        return parts

    def _make(self, namespace: str, allowed: frozenset[tuple[str, str]] | None, reach: Sequence[tuple[str, str]],
              ext_reach: tuple[tuple[str, str], ...]) -> OutboundEgress:
        allow_any = self.allow_any
        vhosts = [v for key in ext_reach for v in self._parts(key)["vhosts"]]
        clusters = [c for key in ext_reach for c in self._parts(key)["clusters"]]
        if allow_any:
            clusters.append(ALLOW_ANY_CLUSTER_CONFIG)
            if allowed is not None:
                vhosts += self._denied(namespace, reach, ext_reach)
        mode = "ALLOW_ANY" if allow_any else "REGISTRY_ONLY"
        return OutboundEgress(
            key=(("policy:", mode), *((f"external:{ns}", name) for ns, name in ext_reach)), vhosts=tuple(vhosts),
            catch_all=ALLOW_ANY_VHOST if allow_any else REGISTRY_ONLY_VHOST,
            clusters=shared_set(self.cache, ("egress-clusters", mode, ext_reach), clusters), allow_any=allow_any)

    def _denied(self, namespace: str, reach: Sequence[tuple[str, str]], ext_reach: tuple[tuple[str, str], ...]
                ) -> list[dict[str, Any]]:
        """Under ALLOW_ANY, the names egress leaves out, refused: else they would go out through DNS (on
        Kubernetes `svc.ns` resolves, and so would a declared external host)."""
        callable_ = set(reach)
        names = [n for ns, svc in self.intent.services if (ns, svc) not in callable_
                 for n in ([f"{svc}.{ns}"] + ([svc] if ns == namespace else []))]
        names += [h for key, es in self.externals.items() if key not in ext_reach for h in es.spec.hosts]
        if not names:
            return []
        inputs = tuple(sorted(names))
        hit = self.cache.configs.get(("egress-denied", inputs))  # the same names: the same vhost object
        if hit is not None:
            return [hit[1]]
        domains = sorted({d for n in names for d in (n, f"{n}:*")})
        vhost = _refusing_vhost("egress-denied", domains, DENIED_BODY, "egress")
        self.cache.configs[("egress-denied", inputs)] = (inputs, vhost)
        return [vhost]
