"""Several clusters as one mesh: east-west gateways, other clusters' instances as failover, by locality.

Each cluster has an east-west gateway that passes mTLS connections from other clusters through to its own
sidecars, chosen by SNI (the TLS stays end to end; the gateway holds no keys). `EastWestExtension` is a
`mesh.render.Extension`: it renders that gateway and adds the other clusters' gateways to every service's
endpoints, at a lower priority than this cluster's own instances, so Envoy sends traffic elsewhere only
while no local instance is healthy. With `Mesh.spec.clusters[].locality` set (region/zone/subzone), nearer
clusters come before farther ones (same zone, then same region, then anywhere), as Istio's locality failover.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh.intent import Intent
from mesh.names import NodeId, ProxyKind, sni
from mesh.render import ADS, Extension, GatewayResources
from mesh.topology import ClusterTopology, Gateway

EASTWEST: ProxyKind = "eastwest"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"


@dataclass(frozen=True)
class RemoteCluster:
    """Another cluster of the mesh as this one reaches it: through that cluster's east-west gateway."""

    cluster: str
    address: str
    port: int
    instances: tuple[tuple[tuple[str, str, str], int], ...] = ()
    """((namespace, service, version), ready instances there), sorted: what the gateway can reach."""
    locality: str | None = None
    """`region/zone/subzone` from the Mesh, if given."""

    def count(self, namespace: str, service: str, version: str | None) -> int:
        return sum(n for (ns, svc, ver), n in self.instances
                   if ns == namespace and svc == service and (version is None or ver == version))


def eastwest_gateway(topology: ClusterTopology) -> Gateway | None:
    return next((g for g in topology.gateways if g.kind == EASTWEST), None)


def remote_view(topology: ClusterTopology, *, locality: str | None = None) -> RemoteCluster | None:
    """How the other clusters see this one: its east-west gateway and its ready instances."""
    gw = eastwest_gateway(topology)
    if gw is None:
        return None
    counts: dict[tuple[str, str, str], int] = {}
    for sc in topology.sidecars:
        if sc.node_id in topology.ready:
            key = (sc.namespace, sc.service, sc.version)
            counts[key] = counts.get(key, 0) + 1
    return RemoteCluster(cluster=topology.cluster, address=gw.address, port=gw.port,
                         instances=tuple(sorted(counts.items())), locality=locality)


def planned_gateway(*, cluster: str, address: str, port: int) -> Gateway:
    return Gateway(node_id=str(NodeId.gateway(cluster=cluster, kind=EASTWEST)), address=address, port=port,
                   kind=EASTWEST)


def locality_of(text: str | None, *, cluster: str) -> dict[str, str]:
    """`region/zone/subzone` -> Envoy's Locality; without one, the cluster's name stands as its zone."""
    if not text:
        return {"zone": cluster}
    parts = text.split("/")
    return dict(zip(("region", "zone", "sub_zone"), parts, strict=False))


def _distance(a: dict[str, str], b: dict[str, str]) -> int:
    """0: same zone, 1: same region, 2: elsewhere (or unknown)."""
    if "region" not in a or "region" not in b or a["region"] != b["region"]:
        return 2
    return 0 if a.get("zone") is not None and a.get("zone") == b.get("zone") else 1


@dataclass(frozen=True)
class EastWestExtension(Extension):
    """One cluster's view of the others; pure: its inputs are plain values the pipeline computed."""

    local: str
    """The cluster being rendered."""
    remotes: tuple[RemoteCluster, ...]
    locality: str | None = None
    """The local cluster's `region/zone/subzone`."""

    def fingerprint(self) -> object:
        return (self.local, self.locality, self.remotes)

    def endpoints(self, cla: dict[str, Any], *, namespace: str, service: str, version: str | None
                  ) -> dict[str, Any]:
        remote = [(r, n) for r in self.remotes if (n := r.count(namespace, service, version)) > 0]
        if not remote:
            return cla
        here = locality_of(self.locality, cluster=self.local)
        local = [lb for group in cla.get("endpoints", []) for lb in group.get("lb_endpoints", [])]
        groups: list[dict[str, Any]] = [{"locality": here, "lb_endpoints": local}] if local else []
        # Priorities are dense (0, 1, 2 ...): the local instances first, then each distance class in turn.
        distances = sorted({_distance(here, locality_of(r.locality, cluster=r.cluster)) for r, _ in remote})
        first = 1 if local else 0
        by_key: dict[tuple[int, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
        for r, n in remote:
            where = locality_of(r.locality, cluster=r.cluster)
            priority = first + distances.index(_distance(here, where))
            endpoint = {"endpoint": {"address": {"socket_address": {"address": r.address, "port_value": r.port}}},
                        "load_balancing_weight": n}
            key = (priority, tuple(sorted(where.items())))
            if key in by_key:  # two clusters in one locality: one group, as Envoy wants localities unique
                by_key[key]["lb_endpoints"].append(endpoint)
            else:
                by_key[key] = {"locality": where, "priority": priority, "lb_endpoints": [endpoint]}
        groups += sorted(by_key.values(), key=lambda g: g["priority"])
        return {**cla, "endpoints": groups}

    def gateway(self, proxy: Gateway, *, intent: Intent, topology: ClusterTopology) -> GatewayResources | None:
        if proxy.kind != EASTWEST:
            return None
        listeners, clusters, endpoints = _eastwest(intent, topology, proxy)
        return GatewayResources(listeners=listeners, clusters=clusters, endpoints=endpoints)


def _eastwest(intent: Intent, topology: ClusterTopology, gw: Gateway
              ) -> tuple[Sequence[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
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
