"""Listeners: the sidecar's inbound and outbound HTTP listeners and the ingress gateway's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Registers the gRPC statistics and Lua filters' messages for packing: mesh.xds.wire imports the others' modules.
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401

from mesh.intent import L4_PROTOCOLS, Intent, Route
from mesh.render.context import ADS, FAULT, FAULT_FILTER, ROUTER, Shared
from mesh.render.tcp import inbound_listener as tcp_inbound
from mesh.topology import Sidecar
from mesh.xds.snapshot import HCM

GRPC_STATS_FILTER = "envoy.filters.http.grpc_stats"
GRPC_STATS = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
HEADER_MUTATION = ("type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
                   "HeaderMutation")


LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
LOWERCASE_HOST_LUA = """\
function envoy_on_request(handle)
  local headers = handle:headers()
  local host = headers:get(":authority")
  if host ~= nil then
    local lower = string.lower(host)
    if lower ~= host then
      headers:replace(":authority", lower)
    end
  end
end
"""
LOWERCASE_HOST = {"name": "lockgate.lowercase_host", "typed_config": {
    "@type": LUA, "default_source_code": {"inline_string": LOWERCASE_HOST_LUA}, "clear_route_cache": True}}
"""First in the scoped ingress's chain: host names are case-insensitive and a scope key is not, so a request
for `Shop.Example.COM` is looked up as `shop.example.com` (the route cache cleared, so the scope is chosen
again from the lowercased header). Only a host that is not lowercase already is rewritten, so the app sees
what the client sent otherwise; filters after this one (rate limits, faults) see the final route."""


def any_fault(shared: Shared, services: Sequence[tuple[str, str]]) -> bool:
    """Does any rule of these services inject faults?"""
    found = faulty(shared)
    return bool(found) and any(key in found for key in services)


def faulty(shared: Shared) -> frozenset[tuple[str, str]]:
    """The services with a rule that injects faults: once per render, from the last render's answer and
    the changed services (`Shared.dirty`) when there is one."""
    found = shared.faulty
    if found is None:
        routes = shared.intent.routes
        if shared.dirty is not None:
            keep = {k for k in shared.cache.faulty if k not in shared.dirty}
            keep.update(k for k in shared.dirty if _injects(routes.get(k)))
        else:
            keep = {k for k, r in routes.items() if _injects(r)}
        found = shared.faulty = frozenset(keep)
    return found


def _injects(route: Route | None) -> bool:
    return route is not None and any(rule.fault is not None for rule in route.spec.http)


def listener_config(name: str, address: str, port: int, *, ingress: bool, proxy: bool = False, fault: bool = False,
                    lowercase_host: bool = False) -> dict[str, Any]:
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "rds": {"route_config_name": name, "config_source": ADS},
        # The fault filter only where a route this listener serves injects faults: a filter in the
        # chain costs every request, faults or not.
        "http_filters": [*([LOWERCASE_HOST] if lowercase_host else []),
                         *([{"name": FAULT_FILTER, "typed_config": {"@type": FAULT}}] if fault else []), router],
    }
    if ingress:
        # The caller's address for the apps behind: the ingress is where a request enters the mesh. Envoy
        # would append its own host address instead of a loopback peer's (Envoy's XFF rule for 127.0.0.1),
        # so the append is ours: the downstream address, whatever it is (as Istio's gateways give apps).
        hcm["use_remote_address"] = True
        hcm["skip_xff_append"] = True
        hcm["early_header_mutation_extensions"] = [{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {"@type": HEADER_MUTATION, "mutations": [{"append": {
                "header": {"key": "x-forwarded-for", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
                "append_action": "APPEND_IF_EXISTS_OR_ADD"}}]}}]
    if proxy:
        # The workload uses this listener as HTTP_PROXY: requests arrive in absolute form.
        hcm["http_protocol_options"] = {"allow_absolute_url": True}
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def for_protocol(intent: Intent, sc: Sidecar, listener: dict[str, Any]) -> dict[str, Any]:
    """A sidecar's inbound listener in its app's protocol; HTTP apps get `listener` itself back, TCP
    apps one that forwards connections (render/tcp).

    gRPC: Envoy's gRPC statistics filter counts every call whose grpc-status is not 0 as a failure
    (`cluster.inbound|app.grpc.failure`), which the built-in success rate reads: a failed call is an HTTP
    200."""
    service = intent.services.get((sc.namespace, sc.service))
    if service is None or listener.get("name") != "inbound":
        return listener
    protocol = service.spec.protocol
    if protocol in L4_PROTOCOLS:  # TLS: the app's own TLS, carried as bytes inside the mesh's mTLS
        return tcp_inbound(listener)
    if protocol == "GRPC":
        (chain,) = listener["filter_chains"]
        (hcm,) = chain["filters"]
        stats = {"name": GRPC_STATS_FILTER, "typed_config": {"@type": GRPC_STATS, "stats_for_all_methods": False}}
        config = {**hcm["typed_config"], "http_filters": [stats, *hcm["typed_config"]["http_filters"]]}
        return {**listener, "filter_chains": [{**chain, "filters": [{**hcm, "typed_config": config}]}]}
    return listener


SCOPE_KEY_BUILDER = {"fragments": [{"header_value_extractor": {"name": ":authority", "element_separator": ":",
                                                               "index": 0}}]}
"""The host a request is for, without its port: `reviews.shop:9080` and `reviews.shop` -> `reviews.shop`."""


def scoped(listener: dict[str, Any], refusal: dict[str, Any]) -> dict[str, Any]:
    """The outbound listener reading its routes by scope (SRDS, keyed on the host) instead of one route
    configuration: `mesh.render.routes.outbound_scoped` says why.

    A host no scope names gets Envoy's "no route" (NR), answered as `refusal` (the outbound traffic
    policy's catch-all virtual host: its status, body and headers), so an undeclared destination reads as
    before the cut."""
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    config = {k: v for k, v in hcm["typed_config"].items() if k != "rds"}
    config["scoped_routes"] = {"name": listener["name"], "scope_key_builder": SCOPE_KEY_BUILDER,
                               "rds_config_source": ADS, "scoped_rds": {"scoped_rds_config_source": ADS}}
    answer = next(r["direct_response"] for r in refusal["routes"] if r.get("match") == {"prefix": "/"})
    mapper: dict[str, Any] = {"filter": {"response_flag_filter": {"flags": ["NR"]}},
                              "status_code": answer["status"]}
    if "body" in answer:
        mapper["body"] = answer["body"]
    if refusal.get("response_headers_to_add"):
        mapper["headers_to_add"] = refusal["response_headers_to_add"]
    config["local_reply_config"] = {"mappers": [mapper]}
    return {**listener, "filter_chains": [{**chain, "filters": [{**hcm, "typed_config": config}]}]}
