"""The Runtime protocol: what the reconcile loop needs from wherever proxies and workloads live.

`LocalRuntime` (processes on this machine) implements it; a Kubernetes runtime implements the same
protocol. The loop never learns which: it asks where each cluster's control plane should listen, brings
clusters up, hands over each valid revision's workloads, and reads back the topology render needs, the
metrics endpoint rollouts are judged from, and a typed status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh.intent import Intent
from mesh.topology import ClusterTopology
from mesh.xds.server import Authenticator


@dataclass(frozen=True)
class Bind:
    """Where a cluster's control plane listens (port 0: any free port)."""

    address: str
    port: int = 0


@dataclass(frozen=True)
class ProxyProcess:
    """Where one proxy runs, as status shows it. Every field is always present in the JSON contract."""

    pid: int | None = None
    state: str = "unknown"
    """starting | running | crashed | stopped | unknown"""
    restarts: int = 0
    admin: str | None = None
    """Where the proxy's admin is: `unix:/path` for a Unix socket (the local runtime: no TCP admin at all),
    or `host:port`. For status and tools; never reachable for workloads."""
    admin_socket: str | None = None
    """The admin Unix socket's path, if admin listens on one (`adminSocket`)."""
    stats: str | None = None
    """`host:port` of the read-only stats listener: `GET /stats/prometheus` only (what Prometheus scrapes)."""

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": self.state, "restarts": self.restarts, "admin": self.admin,
                "adminSocket": self.admin_socket, "stats": self.stats}


@dataclass(frozen=True)
class WorkloadInstance:
    """One instance of a workload, as status shows it (`workloads[]` in `status --json`)."""

    id: str
    cluster: str
    namespace: str
    service: str
    version: str
    workload: str
    ready: bool
    address: str
    """Where the app itself listens."""
    endpoint: str
    """Where callers reach it in the mesh (its sidecar's inbound listener)."""
    http_proxy: str
    """What the app uses as HTTP_PROXY (its sidecar's outbound listener)."""
    pid: int | None = None
    state: str = "unknown"
    restarts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "cluster": self.cluster, "namespace": self.namespace, "service": self.service,
                "version": self.version, "workload": self.workload, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, "ready": self.ready, "address": self.address,
                "endpoint": self.endpoint, "httpProxy": self.http_proxy}


@dataclass(frozen=True)
class Metrics:
    """Where a cluster's proxy metrics can be queried (a Prometheus) and how it finds the proxies."""

    url: str
    """Prometheus base URL for PromQL queries."""
    discovery: str | None = None
    """The HTTP service-discovery URL that lists every proxy's metrics endpoint, if this runtime serves one."""
    local: bool = False
    """True when the runtime runs this Prometheus itself."""
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "local": self.local, "discovery": self.discovery, "pid": self.pid}


@dataclass(frozen=True)
class RuntimeStatus:
    proxies: Mapping[str, ProxyProcess] = field(default_factory=dict)
    """node id -> where that proxy runs."""
    workloads: Sequence[WorkloadInstance] = ()


class Runtime(Protocol):
    """Where proxies and workloads live. Implementations own everything local to them (ports, processes,
    Prometheus or the user's Prometheus URL, scrape discovery); the loop owns intent, render and Git."""

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever the topology changes (an instance became ready or stopped being ready)."""

    def authenticator(self, cluster: str) -> Authenticator:
        """How the cluster's control plane tells which proxy a stream is: every proxy of this runtime
        carries a credential naming it (a per-proxy token locally, a service-account token on Kubernetes)."""

    def serves(self, cluster: str) -> bool:
        """Whether this runtime's proxies of `cluster` are served from here. Locally every cluster is; on
        Kubernetes each cluster runs its own operator and serves only its own proxies."""

    def control_plane(self, cluster: str, *, index: int) -> Bind:
        """Where the control plane of the index-th cluster of the Mesh should listen; the same place as
        before a restart where that lets running proxies reconnect."""

    async def add_cluster(self, *, name: str, xds: Bind) -> None:
        """Bring up a cluster's gateways (and what else the runtime runs per cluster), pointed at its
        control plane at `xds`. Idempotent."""

    async def remove_cluster(self, name: str) -> None:
        """Take down what `add_cluster` brought up for a cluster the Mesh no longer has (its workloads went
        with the revision that dropped it, through `apply`). Idempotent."""

    async def apply(self, intent: Intent) -> None:
        """Make the running workloads match a valid revision's intent."""

    def topology(self, cluster: str) -> ClusterTopology:
        """Every proxy of the cluster and which instances are ready: render's half of the input."""

    def metrics(self, cluster: str) -> Metrics | None:
        """Where the cluster's metrics are queried; None before the cluster is added."""

    def status(self) -> RuntimeStatus: ...

    async def close(self) -> None:
        """An explicit stop: tear down what this runtime started (the only way the data plane goes down)."""
