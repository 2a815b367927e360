"""Listeners: the sidecar's inbound and outbound HTTP listeners and the ingress gateway's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Registers the gRPC statistics filter's message for packing: mesh.xds.wire imports the others' modules.
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2  # noqa: F401

from mesh.intent import Intent
from mesh.render.context import ADS, FAULT, FAULT_FILTER, ROUTER, Shared
from mesh.render.tcp import inbound_listener as tcp_inbound
from mesh.topology import Sidecar
from mesh.xds.snapshot import HCM

GRPC_STATS_FILTER = "envoy.filters.http.grpc_stats"
GRPC_STATS = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
HEADER_MUTATION = ("type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
                   "HeaderMutation")


def any_fault(shared: Shared, services: Sequence[tuple[str, str]]) -> bool:
    """Does any rule of these services inject faults (memoised per service for the render)?"""
    def has(key: tuple[str, str]) -> bool:
        found = shared.faults.get(key)
        if found is None:
            r = shared.intent.routes.get(key)
            found = shared.faults[key] = r is not None and any(rule.fault is not None for rule in r.spec.http)
        return found

    return any(has(key) for key in services)


def listener_config(name: str, address: str, port: int, *, ingress: bool, proxy: bool = False, fault: bool = False
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
    if protocol == "TCP":
        return tcp_inbound(listener)
    if protocol == "GRPC":
        (chain,) = listener["filter_chains"]
        (hcm,) = chain["filters"]
        stats = {"name": GRPC_STATS_FILTER, "typed_config": {"@type": GRPC_STATS, "stats_for_all_methods": False}}
        config = {**hcm["typed_config"], "http_filters": [stats, *hcm["typed_config"]["http_filters"]]}
        return {**listener, "filter_chains": [{**chain, "filters": [{**hcm, "typed_config": config}]}]}
    return listener
