"""Authorization and rate limits of a TCP service, at L4: network filters in its sidecar's inbound listener.

An HTTP service's rules travel in its inbound route configuration, so a change reaches the next request
on open connections. A TCP service has no routes: its rules are network filters of the listener, in
front of `tcp_proxy`, and a change reaches new connections only (connections already open keep the
filter chain they were accepted on until they close or drain).

- AuthorizationPolicy: network RBAC, DENY before ALLOW, on the peer's mTLS identity (principals,
  namespaces) and ports; HTTP-only fields (paths, methods) are refused by validation for TCP services.
  Envoy decides on the connection's first byte from the client: a server that speaks first (a database
  greeting) has its first bytes reach a denied client before the connection is closed.
- RateLimit: a token bucket of *connections* (Envoy's network local rate limit): `requestsPerUnit` new
  connections per unit, `burst` at once; a connection over the limit is closed at once. Every sidecar
  of the service has its own bucket, as for HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Registers the network rate limit's message for packing (mesh.xds.wire imports the other filters').
from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401

RBAC_FILTER = "envoy.filters.network.rbac"
LOCAL_RL_FILTER = "envoy.filters.network.local_ratelimit"
_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
_LOCAL_RL = "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"
_TCP_PROXY = "envoy.filters.network.tcp_proxy"
STAT_PREFIXES = {"DENY": "lockgate_authz_deny", "ALLOW": "lockgate_authz_allow"}
"""Network RBAC counts at `<prefix>.rbac.allowed|denied`, e.g. `lockgate_authz_deny.rbac.denied`."""
RATELIMIT_STAT_PREFIX = "lockgate_connections"
"""`local_rate_limit.lockgate_connections.rate_limited`: connections closed by the bucket."""


def network_filters(rules: Mapping[str, dict[str, Any]], bucket: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The filters to run before `tcp_proxy`: one RBAC filter per action that has policies (`rules`:
    action -> RBAC policies by name, DENY first, as the HTTP side computes them), then the connection
    bucket (`bucket`: an Envoy TokenBucket), if any."""
    out = [{"name": f"{RBAC_FILTER}.{action.lower()}", "typed_config": {
        "@type": _RBAC, "stat_prefix": STAT_PREFIXES[action] + ".",
        "rules": {"action": action, "policies": policies}}}
        for action, policies in rules.items()]
    if bucket is not None:
        out.append({"name": LOCAL_RL_FILTER, "typed_config": {
            "@type": _LOCAL_RL, "stat_prefix": RATELIMIT_STAT_PREFIX, "token_bucket": bucket}})
    return out


def with_network_filters(listener: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    """The listener with `filters` just before `tcp_proxy` in every filter chain."""
    if not filters:
        return listener
    chains = []
    for chain in listener["filter_chains"]:
        current = list(chain["filters"])
        at = next((i for i, f in enumerate(current) if f["name"] == _TCP_PROXY), len(current))
        chains.append({**chain, "filters": [*current[:at], *filters, *current[at:]]})
    return {**listener, "filter_chains": chains}
