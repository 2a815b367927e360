"""Pure render of the security intent into what mesh.render produces: transport sockets, filters, secrets.

`SecurityExtension` is a `mesh.render.Extension`. Its inputs are the intent and, issued at the edge,
each proxy's certificate and the trust bundle; it reads no clock, no environment and no files, so the
same inputs give the same snapshots. A rotation changes only the SECRET resources: every listener and
cluster names the secrets (`workload-cert`, `trust-bundle`), never their content.

Authorization and inbound rate limits live in the sidecar's inbound *route configuration* (per-route
filter config), not in its listener: Envoy applies a new route configuration to the next request on
connections already open, while a changed listener only reaches new connections and lets old ones drain
on the old filter chain (a revoked caller kept being served until its connection closed). The inbound
listener always carries the same neutral filters, so a policy or a rate-limit change leaves it alone;
only the mTLS mode (a property of the connection) is still the listener's. A TCP service has no routes:
its rules are network filters of its inbound listener, reaching new connections only (policies/l4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mesh.intent import H2_PROTOCOLS, L4_PROTOCOLS, Intent
from mesh.render import ADS, Extension, Proxy, cluster_name, sni
from mesh.topology import Sidecar
from policies.identity import IssuedCert, every_service_identity
from policies.intent import AuthorizationPolicy, Mode, Operation, PeerAuthentication, RateLimit, Source
from policies.l4 import network_filters, with_network_filters

WORKLOAD_CERT = "workload-cert"
TRUST_BUNDLE = "trust-bundle"
RATELIMITED_HEADER = "x-lockgate-ratelimited"

_TLS = "envoy.transport_sockets.tls"
_DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_RBAC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
AUTHZ_FILTERS = {"DENY": "lockgate.authz.deny", "ALLOW": "lockgate.authz.allow"}
"""Both always in every sidecar's inbound chain, DENY first (as Istio evaluates), each without rules
(allowing everything) unless the route configuration gives it rules under its name."""
_LOCAL_RL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
LOCAL_RL_FILTER = "envoy.filters.http.local_ratelimit"
_ROUTER = "envoy.filters.http.router"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UNIT_MS = {"second": 1_000, "minute": 60_000, "hour": 3_600_000}
_MIN_FILL_MS = 50  # Envoy refuses shorter fill intervals


def mtls_mode(intent: Intent, namespace: str, service: str) -> Mode:
    """What a service's sidecars accept: its own PeerAuthentication, else its namespace's, else the Mesh's."""
    ns_mode: Mode | None = None
    for pa in intent.of_kind(PeerAuthentication):
        if pa.metadata.namespace != namespace:
            continue
        if pa.spec.selector is None:
            ns_mode = pa.spec.mtls.mode
        elif pa.spec.selector.service == service:
            return pa.spec.mtls.mode
    return ns_mode or intent.mesh.spec.mtls.mode


@dataclass(frozen=True)
class SecurityExtension(Extension):
    """mTLS everywhere between proxies, authorization and rate limits on the inbound side."""

    intent: Intent
    certs: Mapping[str, IssuedCert]
    """node id -> that proxy's certificate (issued outside render)."""
    trust_bundle: Sequence[str]
    """Root certificates (PEM) peers' chains must lead to; two during a root rotation."""

    # --- hooks ------------------------------------------------------------------------------------------

    def listener(self, proxy: Proxy, listener: dict[str, Any]) -> dict[str, Any]:
        name = listener.get("name")
        if isinstance(proxy, Sidecar) and name == "inbound":
            return self._inbound(proxy, listener)
        if name in ("outbound", "ingress"):
            # Rule-scoped buckets come per route and need the filter in the chain; it is always there (without
            # a bucket of its own it limits nothing), so adding the first RateLimit leaves the listener alone.
            disabled = {"name": LOCAL_RL_FILTER, "typed_config": {"@type": _LOCAL_RL, "stat_prefix": "lockgate_rule"}}
            return _with_http_filters(listener, [disabled])
        return listener

    def inbound_route(self, proxy: Sidecar, route_config: dict[str, Any]) -> dict[str, Any]:
        """Authorization and the service's rate limit, per route: applied to the next request on open
        connections. Sidecars without either get `route_config` back (shared); those of one service one
        object between them (their own only where a rule names ports)."""
        key = (proxy.namespace, proxy.service, proxy.inbound_port if self._uses_ports(proxy) else None)
        hit = self._inbound_memo.get(key)
        if hit is None or hit[0] is not route_config:
            per_filter = self._inbound_filters(proxy)
            made = _with_route_filters(route_config, per_filter) if per_filter else route_config
            hit = self._inbound_memo[key] = (route_config, made)
        return hit[1]

    def fingerprint(self) -> object:
        """What `cluster()` depends on: the trust domain and each cluster's expected identities."""
        return _expected_sans(self.intent)[1]

    def routes_fingerprint(self) -> object:
        """What `route()` depends on: the RateLimits that name a rule."""
        return tuple(sorted(self._rule_limits.items(), key=lambda item: item[0]))

    def cluster(self, proxy: Proxy, cluster: dict[str, Any]) -> dict[str, Any]:
        sans = self._upstream_sans.get(cluster["name"])
        if sans is None:
            return cluster
        # The SNI names the destination service (version): another cluster's east-west gateway routes the
        # still-encrypted connection by it; a sidecar's inbound listener ignores it.
        _, host, *version = cluster["name"].split("|")
        svc, _, ns = host.partition(".")
        common = self._common([_uri(exact=s) for s in sans])
        if _speaks_http2(cluster):
            common["alpn_protocols"] = ["h2"]  # the peer's inbound picks its HTTP/2 codec from ALPN
        ctx = {"@type": _UPSTREAM, "sni": sni(ns, svc, version[0] if version else None), "common_tls_context": common}
        return {**cluster, "transport_socket": {"name": _TLS, "typed_config": ctx}}

    def route(self, proxy: Proxy, *, namespace: str, service: str, rule: str,
              route: dict[str, Any]) -> dict[str, Any]:
        limit = self._rule_limits.get((namespace, service, rule))
        if limit is None:
            return route
        per_filter = {**route.get("typed_per_filter_config", {}),
                      LOCAL_RL_FILTER: _bucket(limit, stat_prefix=f"lockgate_rule_{service}_{namespace}_{rule}")}
        return {**route, "typed_per_filter_config": per_filter}

    def secrets(self, proxy: Proxy) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cert = self.certs.get(proxy.node_id)
        if cert is not None:
            out.append({"name": WORKLOAD_CERT, "tls_certificate": {
                "certificate_chain": {"inline_string": cert.cert_chain_pem},
                "private_key": {"inline_string": cert.private_key_pem}}})
        if self.trust_bundle:
            bundle = "".join(pem if pem.endswith("\n") else pem + "\n" for pem in self.trust_bundle)
            out.append({"name": TRUST_BUNDLE, "validation_context": {"trusted_ca": {"inline_string": bundle}}})
        return out

    # --- inbound ---------------------------------------------------------------------------------------

    def _inbound(self, sc: Sidecar, listener: dict[str, Any]) -> dict[str, Any]:
        service = self.intent.services.get((sc.namespace, sc.service))
        if service is not None and service.spec.protocol in L4_PROTOCOLS:
            # No routes at L4: the rules are the listener's own network filters (policies/l4).
            limit = self._service_limits.get((sc.namespace, sc.service))
            listener = with_network_filters(listener, network_filters(
                self._authz_rules(sc), _token_bucket(limit) if limit is not None else None))
        else:
            # The same filters for every sidecar and every policy: what they enforce comes per route (RDS).
            listener = _with_http_filters(listener, _NEUTRAL_INBOUND, first=True)
        td = self.intent.mesh.spec.trust_domain
        # Any peer of the mesh's trust domain may connect; which of them may call is AuthorizationPolicy's job.
        common = self._common([_uri(prefix=f"spiffe://{td}/")])
        if service is not None and service.spec.protocol in H2_PROTOCOLS:
            common["alpn_protocols"] = ["h2", "http/1.1"]
        tls = {"name": _TLS, "typed_config": {
            "@type": _DOWNSTREAM, "require_client_certificate": True, "common_tls_context": common}}
        (chain,) = listener["filter_chains"]
        mtls_chain = {**chain, "name": "inbound-mtls", "transport_socket": tls}
        if mtls_mode(self.intent, sc.namespace, sc.service) == "STRICT":
            return {**listener, "filter_chains": [mtls_chain]}
        return {
            **listener,
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                                  "typed_config": {"@type": _TLS_INSPECTOR}}],
            "filter_chains": [
                {**mtls_chain, "filter_chain_match": {"transport_protocol": "tls"}},
                {**chain, "name": "inbound-plaintext", "filter_chain_match": {"transport_protocol": "raw_buffer"}},
            ],
        }

    def _inbound_filters(self, sc: Sidecar) -> dict[str, Any]:
        """Filter name -> per-route config for the sidecar's inbound routes: its authorization rules (DENY,
        ALLOW) and its rate-limit bucket; empty when its service has none."""
        out: dict[str, Any] = {}
        for action, policies in self._authz_rules(sc).items():
            out[AUTHZ_FILTERS[action]] = {"@type": _RBAC_PER_ROUTE, "rbac": {
                "rules_stat_prefix": _authz_stat_prefix(action), "rules": {"action": action, "policies": policies}}}
        limit = self._service_limits.get((sc.namespace, sc.service))
        if limit is not None:
            out[LOCAL_RL_FILTER] = _bucket(limit, stat_prefix="lockgate_ratelimit")
        return out

    def _authz_rules(self, sc: Sidecar) -> dict[str, dict[str, Any]]:
        """Action -> RBAC policies of the sidecar's service, DENY first; no ALLOW policy means no ALLOW
        rules (the neutral filter allows), while an ALLOW policy without rules denies everything."""
        mine = self._selecting(sc)
        out: dict[str, dict[str, Any]] = {}
        for action in AUTHZ_FILTERS:
            chosen = [p for p in mine if p.spec.action == action]
            if chosen:
                out[action] = {
                    f"{p.metadata.namespace}/{p.metadata.name}[{i}]": {
                        "permissions": [_operation(op, sc) for op in rule.to] or [{"any": True}],
                        "principals": [_source(src) for src in rule.from_] or [{"any": True}],
                    }
                    for p in sorted(chosen, key=lambda p: p.metadata.name)
                    for i, rule in enumerate(p.spec.rules)
                }
        return out

    def _selecting(self, sc: Sidecar) -> list[AuthorizationPolicy]:
        """The AuthorizationPolicies that select the sidecar's service (its namespace's included)."""
        return [p for p in self._authz_by_namespace.get(sc.namespace, [])
                if p.spec.selector is None or p.spec.selector.service == sc.service]

    def _uses_ports(self, sc: Sidecar) -> bool:
        """Whether the sidecar's rules name ports (rendered with its own inbound port, so not shareable)."""
        return any(op.ports for p in self._selecting(sc) for rule in p.spec.rules for op in rule.to)

    @cached_property
    def _authz_by_namespace(self) -> dict[str, list[AuthorizationPolicy]]:
        out: dict[str, list[AuthorizationPolicy]] = {}
        for p in self.intent.of_kind(AuthorizationPolicy):
            out.setdefault(p.metadata.namespace, []).append(p)
        return out

    @cached_property
    def _inbound_memo(self) -> dict[tuple[str, str, int | None], tuple[dict[str, Any], dict[str, Any]]]:
        """Sidecars of one service get one inbound route configuration object (shared, hashed once)."""
        return {}

    # --- shared pieces ---------------------------------------------------------------------------------

    def _common(self, peer_sans: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificate_sds_secret_configs": [{"name": WORKLOAD_CERT, "sds_config": ADS}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": peer_sans},
                "validation_context_sds_secret_config": {"name": TRUST_BUNDLE, "sds_config": ADS},
            },
        }

    @cached_property
    def _upstream_sans(self) -> dict[str, list[str]]:
        """Outbound cluster name -> the SPIFFE ids its endpoints may present (exact SAN match)."""
        return _expected_sans(self.intent)[0]

    @cached_property
    def _service_limits(self) -> dict[tuple[str, str], RateLimit]:
        return {(r.metadata.namespace, r.spec.service): r
                for r in self.intent.of_kind(RateLimit) if r.spec.rule is None}

    @cached_property
    def _rule_limits(self) -> dict[tuple[str, str, str], RateLimit]:
        return {(r.metadata.namespace, r.spec.service, r.spec.rule): r
                for r in self.intent.of_kind(RateLimit) if r.spec.rule is not None}


_SANS: list[tuple[tuple[object, ...], dict[str, list[str]], object]] = []
"""The last `_expected_sans` answer and the objects it was made from (one entry)."""


def _expected_sans(intent: Intent) -> tuple[dict[str, list[str]], object]:
    """Outbound cluster name -> the SPIFFE ids its endpoints may present, and the fingerprint of that
    (`SecurityExtension.fingerprint`). Kept from the last render while the Mesh, the Services and the
    Workloads are the same objects (frozen models the loader keeps across revisions): a Route commit
    changes none of them, and at 1000 services this was 3000 identities and a sort per render (~10 ms).
    The answer is shared: never mutated."""
    inputs = (intent.mesh, *intent.services.values(), None, *intent.workloads.values())
    last = _SANS[0] if _SANS else None
    if last is not None and len(last[0]) == len(inputs) and all(a is b for a, b in zip(last[0], inputs, strict=True)):
        return last[1], last[2]
    sans = {cluster_name(ns, svc, version): ids for (ns, svc, version), ids in every_service_identity(intent).items()}
    fingerprint = (intent.mesh.spec.trust_domain, tuple(sorted((name, tuple(ids)) for name, ids in sans.items())))
    _SANS[:] = [(inputs, sans, fingerprint)]
    return sans, fingerprint


def _authz_stat_prefix(action: str) -> str:
    return f"lockgate_authz_{action.lower()}"


_NEUTRAL_INBOUND: list[dict[str, Any]] = [
    *({"name": name, "typed_config": {"@type": _RBAC, "rules_stat_prefix": _authz_stat_prefix(action)}}
      for action, name in AUTHZ_FILTERS.items()),
    {"name": LOCAL_RL_FILTER, "typed_config": {"@type": _LOCAL_RL, "stat_prefix": "lockgate_inbound"}},
]
"""The inbound listener's lockgate filters: RBAC without rules allows, a bucket-less local rate limit limits
nothing; counters keep their names (`rbac.lockgate_authz_deny.denied`: Envoy counts a per-route decision on
the filter that made it)."""


def _with_route_filters(config: dict[str, Any], per_filter: dict[str, Any]) -> dict[str, Any]:
    """The route configuration with `per_filter` added to every route entry (a route's own entries kept)."""
    return {**config, "virtual_hosts": [
        {**vh, "routes": [{**r, "typed_per_filter_config": {**r.get("typed_per_filter_config", {}), **per_filter}}
                          for r in vh["routes"]]}
        for vh in config["virtual_hosts"]]}


def _speaks_http2(cluster: dict[str, Any]) -> bool:
    options = cluster.get("typed_extension_protocol_options", {}).get(_HTTP_OPTIONS, {})
    return "http2_protocol_options" in options.get("explicit_http_config", {})


def _uri(**matcher: str) -> dict[str, Any]:
    return {"san_type": "URI", "matcher": matcher}


def _with_http_filters(listener: dict[str, Any], filters: list[dict[str, Any]], *,
                       first: bool = False) -> dict[str, Any]:
    """The listener with `filters` placed first (authorization before anything else runs) or just before
    the router of every HTTP connection manager."""
    if not filters:
        return listener
    chains = []
    for chain in listener["filter_chains"]:
        new = []
        for flt in chain["filters"]:
            cfg = flt.get("typed_config", {})
            if "http_filters" in cfg:
                hf = list(cfg["http_filters"])
                at = 0 if first else next((i for i, f in enumerate(hf) if f["name"] == _ROUTER), len(hf))
                flt = {**flt, "typed_config": {**cfg, "http_filters": [*hf[:at], *filters, *hf[at:]]}}
            new.append(flt)
        chains.append({**chain, "filters": new})
    return {**listener, "filter_chains": chains}


def _token_bucket(limit: RateLimit) -> dict[str, Any]:
    """`burst` tokens refilled at requestsPerUnit, in the smallest exact steps Envoy takes (requests over
    HTTP, connections at L4)."""
    rate, unit_ms = limit.spec.requests_per_unit, _UNIT_MS[limit.spec.unit]
    d = math.gcd(unit_ms, rate)  # steps of k*rate/d tokens every k*unit_ms/d ms are exact
    k = -(-_MIN_FILL_MS * d // unit_ms)
    tokens, interval = k * rate // d, k * unit_ms // d
    return {"max_tokens": limit.spec.burst or rate, "tokens_per_fill": tokens,
            "fill_interval": f"{interval // 1000}.{interval % 1000:03d}s"}


def _bucket(limit: RateLimit, *, stat_prefix: str) -> dict[str, Any]:
    """The HTTP local rate limit's per-route config: a token bucket of requests."""
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "lockgate.ratelimit"}
    return {
        "@type": _LOCAL_RL,
        "stat_prefix": stat_prefix,
        "token_bucket": _token_bucket(limit),
        "filter_enabled": always,
        "filter_enforced": always,
        "response_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                     "header": {"key": RATELIMITED_HEADER, "value": "true"}}],
    }


def _one_of(items: list[dict[str, Any]], key: str, field: str) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {key: {field: items}}


def principal_matcher(principal: str) -> dict[str, str]:
    """Istio's principal syntax (`td/ns/x/sa/y`, `*` prefix or suffix wildcard) -> a URI SAN matcher."""
    if principal == "*":
        return {"prefix": "spiffe://"}
    if principal.startswith("*"):
        return {"suffix": principal[1:]}
    if principal.endswith("*"):
        return {"prefix": "spiffe://" + principal[:-1]}
    return {"exact": "spiffe://" + principal}


def _namespace_regex(ns: str) -> str:
    part = "[^/]*".join(re.escape(p) for p in ns.split("*"))
    return f"spiffe://[^/]+/ns/{part}/sa/[^/]+"


def _source(src: Source) -> dict[str, Any]:
    parts = []
    if src.principals:
        parts.append(_one_of([{"authenticated": {"principal_name": principal_matcher(p)}} for p in src.principals],
                             "or_ids", "ids"))
    if src.namespaces:
        parts.append(_one_of([{"authenticated": {"principal_name": {"safe_regex": {"regex": _namespace_regex(n)}}}}
                              for n in src.namespaces], "or_ids", "ids"))
    return _one_of(parts, "and_ids", "ids") if parts else {"any": True}


def _path(path: str) -> dict[str, Any]:
    if path == "*":
        return {"any": True}
    if path.startswith("*"):
        return {"url_path": {"path": {"suffix": path[1:]}}}
    if path.endswith("*"):
        return {"url_path": {"path": {"prefix": path[:-1]}}}
    return {"url_path": {"path": {"exact": path}}}


def _operation(op: Operation, sc: Sidecar) -> dict[str, Any]:
    parts = []
    if op.methods:
        parts.append(_one_of([{"header": {"name": ":method", "string_match": {"exact": m}}} for m in op.methods],
                             "or_rules", "rules"))
    if op.paths:
        parts.append(_one_of([_path(p) for p in op.paths], "or_rules", "rules"))
    if op.ports:
        # Every port of a service arrives at the sidecar's one inbound listener (validation checked the
        # ports are the service's), so a port condition holds for requests at that listener.
        parts.append({"destination_port": sc.inbound_port})
    return _one_of(parts, "and_rules", "rules") if parts else {"any": True}
