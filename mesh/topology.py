"""Where proxies and workloads are: the runtime's half of render's input.

The intent says what should exist; the topology says where each instance actually listens and which
instances are ready to take traffic. Local runtime and Kubernetes runtime both produce this value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.names import ProxyKind


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
    service_account: str | None = None
    """The identity the runtime knows this instance runs as (a pod's service account); None: the intent
    decides (the Workload's serviceAccount, else the service name)."""
    outbound_address: str | None = None
    """Where the outbound listener binds, if not `address`: a pod's loopback, so no other pod can send
    requests through this instance's sidecar with this instance's identity."""
    tcp_outbound: tuple[tuple[str, str, int, int], ...] = ()
    """(namespace, service, service port, local port): one TCP listener of this sidecar per TCP service port
    the workload may call, at `outbound_address or address`:local port (no iptables: the app is told where)."""


@dataclass(frozen=True)
class Gateway:
    """A proxy that is not beside a workload: the ingress gateway, or one of a kind an extension renders."""

    node_id: str
    address: str
    port: int
    kind: ProxyKind = "ingress"


@dataclass(frozen=True)
class ClusterTopology:
    cluster: str
    ingress: Gateway | None = None
    sidecars: tuple[Sidecar, ...] = ()
    ready: frozenset[str] = field(default_factory=frozenset)
    """Node ids of sidecars whose instance may receive traffic (app up, sidecar configured)."""
    gateways: tuple[Gateway, ...] = ()
    """Gateways other than the ingress (an east-west gateway, say), each rendered by the extension that
    knows its kind."""
