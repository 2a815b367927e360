"""Where proxies and workloads are: the runtime's half of render's input.

The intent says what should exist; the topology says where each instance actually listens and which
instances are ready to take traffic. Local runtime and Kubernetes runtime both produce this value.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.intent import Intent


@dataclass(frozen=True)
class Sidecar:
    """One workload instance and the Envoy beside it."""

    node_id: str
    namespace: str
    service: str
    version: str
    workload: str
    address: str
    """Loopback address of the cluster this instance runs in."""
    inbound_port: int
    """Sidecar listener that callers reach (the instance's endpoint in the mesh)."""
    outbound_port: int
    """Sidecar listener the workload uses as its HTTP proxy."""
    app_port: int
    """Where the workload itself listens."""


@dataclass(frozen=True)
class Gateway:
    node_id: str
    address: str
    port: int


@dataclass(frozen=True)
class RemoteCluster:
    """Another cluster of the mesh as this one reaches it: through that cluster's east-west gateway,
    which passes mTLS through to its sidecars by SNI."""

    cluster: str
    address: str
    port: int
    instances: tuple[tuple[tuple[str, str, str], int], ...] = ()
    """((namespace, service, version), ready instances there), sorted: what the gateway can reach."""

    def count(self, namespace: str, service: str, version: str | None) -> int:
        return sum(n for (ns, svc, ver), n in self.instances
                   if ns == namespace and svc == service and (version is None or ver == version))


@dataclass(frozen=True)
class ClusterTopology:
    cluster: str
    ingress: Gateway | None = None
    sidecars: tuple[Sidecar, ...] = ()
    ready: frozenset[str] = field(default_factory=frozenset)
    """Node ids of sidecars whose instance may receive traffic (app up, sidecar configured)."""
    eastwest: Gateway | None = None
    """This cluster's east-west gateway: how the other clusters reach its sidecars."""
    remotes: tuple[RemoteCluster, ...] = ()
    """The other clusters, for endpoints this one lacks (failover: local instances first)."""


def remote_view(topology: ClusterTopology) -> RemoteCluster | None:
    """How the other clusters see this one: its east-west gateway and its ready instances."""
    if topology.eastwest is None:
        return None
    counts: dict[tuple[str, str, str], int] = {}
    for sc in topology.sidecars:
        if sc.node_id in topology.ready:
            key = (sc.namespace, sc.service, sc.version)
            counts[key] = counts.get(key, 0) + 1
    return RemoteCluster(cluster=topology.cluster, address=topology.eastwest.address, port=topology.eastwest.port,
                         instances=tuple(sorted(counts.items())))


def planned_topology(intent: Intent, cluster: str, *, address: str = "127.0.0.1", base_port: int = 20000
                     ) -> ClusterTopology:
    """The topology the intent asks for, every instance ready, with made-up ports.

    What plan and preflight checks render against: deterministic, so two revisions differ only where
    their intent does."""
    sidecars = []
    for (ns, name), w in sorted(intent.workloads.items()):
        if cluster not in w.spec.clusters:
            continue
        for i in range(w.spec.replicas):
            node_id = f"{cluster}/{ns}/{name}-{i}"
            # Ports from the node id, so adding one instance does not renumber the others.
            port = base_port + (zlib.crc32(node_id.encode()) % 10_000) * 3
            sidecars.append(Sidecar(
                node_id=node_id, namespace=ns, service=w.spec.service, version=w.spec.version,
                workload=name, address=address, inbound_port=port, outbound_port=port + 1, app_port=port + 2))
    return ClusterTopology(
        cluster=cluster, ingress=Gateway(node_id=f"{cluster}/ingress", address=address, port=base_port - 1),
        eastwest=Gateway(node_id=f"{cluster}/eastwest", address=address, port=base_port - 2),
        sidecars=tuple(sidecars), ready=frozenset(s.node_id for s in sidecars))
