"""Several clusters as one mesh: east-west gateways, other clusters' instances as failover, by locality.

Each cluster has an east-west gateway that passes mTLS connections from other clusters through to its own
sidecars, chosen by SNI (the TLS stays end to end; the gateway holds no keys). `EastWestExtension` is a
`mesh.render.Extension`: it renders that gateway and adds the other clusters' gateways to every service's
endpoints, at a lower priority than this cluster's own instances, so Envoy sends traffic elsewhere only
while no local instance is healthy. With `Mesh.spec.clusters[].locality` set (region/zone/subzone), nearer
clusters come before farther ones (same zone, then same region, then anywhere), as Istio's locality failover;
a TrafficPolicy's `loadBalancer.localityLbSetting` changes that order (`failover`, `failoverPriority`), shares
the load by weights per locality (`distribute`) or turns locality off (`enabled: false`): see
`multicluster.locality`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.intent import Intent, LocalityLbSetting
from mesh.names import NodeId, ProxyKind, cluster_name, sni
from mesh.render import ADS, Extension, GatewayResources, Proxy
from mesh.topology import ClusterTopology, Gateway
from multicluster.locality import Group, Place, arrange, distribute_rule

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
    return Place(cluster=cluster, locality=text).envoy_locality()


LocalityPolicies = tuple[tuple[tuple[str, str, str | None], LocalityLbSetting], ...]
"""((namespace, service, version or None for every version), its localityLbSetting), sorted."""


def locality_policies(intent: Intent) -> LocalityPolicies:
    """Every localityLbSetting of the intent's TrafficPolicies, per service and per version (a version's
    loadBalancer replaces the service's whole, as every TrafficPolicy field does)."""
    out = []
    for (ns, svc), tp in sorted(intent.traffic_policies.items()):
        service = intent.services.get((ns, svc))
        for version in [None, *(service.spec.versions if service else [])]:
            lb = tp.spec.settings(version).load_balancer
            if lb is not None and lb.locality_lb_setting is not None:
                out.append(((ns, svc, version), lb.locality_lb_setting))
    return tuple(out)


@dataclass(frozen=True)
class EastWestExtension(Extension):
    """One cluster's view of the others; pure: its inputs are plain values the pipeline computed."""

    local: str
    """The cluster being rendered."""
    remotes: tuple[RemoteCluster, ...]
    locality: str | None = None
    """The local cluster's `region/zone/subzone`."""
    policies: LocalityPolicies = ()
    """The TrafficPolicies' localityLbSettings (`locality_policies`)."""

    def fingerprint(self) -> object:
        return (self.local, self.locality, self.remotes, self.policies)

    @property
    def here(self) -> Place:
        return Place(cluster=self.local, locality=self.locality)

    @functools.cached_property
    def _settings(self) -> Mapping[tuple[str, str, str | None], LocalityLbSetting]:
        return dict(self.policies)

    @functools.cached_property
    def _weighted(self) -> frozenset[str]:
        """Names of the Envoy clusters whose endpoints carry weights per locality here (`distribute`)."""
        return frozenset(cluster_name(ns, svc, version) for (ns, svc, version), setting in self.policies
                         if distribute_rule(setting, self.here) is not None)

    def cluster(self, proxy: Proxy, cluster: dict[str, Any]) -> dict[str, Any]:
        """Weights per locality count only where the cluster says so (Envoy ignores them otherwise)."""
        if cluster.get("name") not in self._weighted:
            return cluster
        common = {**cluster.get("common_lb_config", {}), "locality_weighted_lb_config": {}}
        return {**cluster, "common_lb_config": common}

    def endpoints(self, cla: dict[str, Any], *, namespace: str, service: str, version: str | None
                  ) -> dict[str, Any]:
        setting = self._settings.get((namespace, service, version))
        remote = [(r, n) for r in self.remotes if (n := r.count(namespace, service, version)) > 0]
        here = self.here
        if not remote and distribute_rule(setting, here) is None:
            return cla  # only this cluster's instances, and nothing weighs them: as render made them
        local = tuple(lb for group in cla.get("endpoints", []) for lb in group.get("lb_endpoints", []))
        groups = [Group(place=here, endpoints=local, local=True)] if local else []
        groups += [Group(place=Place(cluster=r.cluster, locality=r.locality), endpoints=({
            "endpoint": {"address": {"socket_address": {"address": r.address, "port_value": r.port}}},
            "load_balancing_weight": n},)) for r, n in remote]
        return {**cla, "endpoints": arrange(groups, here=here, setting=setting)}

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
