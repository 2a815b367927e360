"""KubernetesRuntime: the Runtime protocol over what the operator watches in one cluster.

Workloads are the user's (Deployments play the part of `Workload` resources); lockgate starts nothing.
The topology is the injected pods and the EndpointSlices that list them, fed by the operator's kopf
indexes (`sync`); a change that alters it tells the loop, which re-renders: an endpoint's churn changes
the EDS of the proxies that call that service and nothing else (the snapshot cache compares per type).

Zero trust on Kubernetes: a proxy presents its projected service-account token (audience `lockgate`);
the control plane asks the API server's TokenReview who it is. A bound token names its pod, so the
stream is bound to that pod's node id and receives certificates for that pod's service account only.
An explicit stop of the operator tears nothing down: the pods are the user's and keep their last config.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mesh.intent import Intent
from mesh.names import NodeId
from mesh.topology import ClusterTopology
from mesh.xds.server import Authenticator
from reconciler.runtime.base import Bind, Metrics, ProxyProcess, RuntimeStatus, WorkloadInstance
from reconciler.runtime.kubernetes.objects import EndpointEntry, PodEntry, node_id, topology

log = logging.getLogger("lockgate.kubernetes")

AUDIENCE = "lockgate"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
REVIEW_CACHE_S = 30.0
"""Seconds a token's positive review is reused: a proxy that reconnects in a burst costs one TokenReview.
Only positive answers are kept, and a pod that is gone from the index is refused whatever the cache says."""


@dataclass(frozen=True)
class ReviewedToken:
    """What TokenReview says of a token: its service account and, for a bound token, its pod."""

    namespace: str
    service_account: str
    pod: str | None


TokenReviewer = Callable[[str], Awaitable[ReviewedToken | None]]
"""Asks the API server about a token (audience `lockgate`); None: not authenticated."""


def parse_review(status: Mapping[str, object]) -> ReviewedToken | None:
    """A TokenReview's `status` -> who, or None unless it is an authenticated service account of ours."""
    if status.get("authenticated") is not True:
        return None
    audiences = status.get("audiences")
    if isinstance(audiences, list) and audiences and AUDIENCE not in audiences:
        return None
    user = status.get("user")
    if not isinstance(user, Mapping):
        return None
    parts = str(user.get("username") or "").split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not parts[2] or not parts[3]:
        return None
    extra = user.get("extra")
    pods = extra.get(POD_NAME_EXTRA) if isinstance(extra, Mapping) else None
    pod = str(pods[0]) if isinstance(pods, list) and pods else None
    return ReviewedToken(namespace=parts[2], service_account=parts[3], pod=pod)


@dataclass
class ServiceAccountAuthenticator:
    """The cluster's control plane's view of a stream's credential: a bound service-account token whose
    pod is one of this cluster's proxies, running as the service account the token names."""

    cluster: str
    review: TokenReviewer
    pods: Callable[[], Mapping[tuple[str, str], PodEntry]]
    clock: Callable[[], float] = time.monotonic
    _cache: dict[bytes, tuple[float, ReviewedToken]] = field(default_factory=dict)

    async def node_for(self, token: str) -> str | None:
        key = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(key)
        who = hit[1] if hit is not None and now - hit[0] < REVIEW_CACHE_S else None
        if who is None:
            try:
                who = await self.review(token)
            except Exception as exc:  # the API server is down or slow: refuse now, the proxy retries
                log.warning("cluster %s: TokenReview failed, refusing the stream: %r", self.cluster, exc)
                return None
            if who is None:
                return None
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now, who)
        if who.pod is None:  # a legacy, unbound token names no pod: it cannot say which proxy it is
            return None
        pod = self.pods().get((who.namespace, who.pod))
        if pod is None or pod.service_account != who.service_account:
            return None
        return node_id(self.cluster, pod)


@dataclass
class KubernetesRuntime:
    """One cluster's proxies as the API reports them. Other clusters of the Mesh run their own operator."""

    cluster: str
    xds: Bind
    review: TokenReviewer
    prometheus_url: str | None = None
    ingress_port: int = 8080
    _pods: dict[tuple[str, str], PodEntry] = field(default_factory=dict)
    _endpoints: tuple[EndpointEntry, ...] = ()
    _topology: ClusterTopology | None = None
    _intent: Intent | None = None
    _callback: Callable[[], None] = lambda: None
    _added: bool = False
    _remote: dict[str, ClusterTopology] = field(default_factory=dict)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def authenticator(self, cluster: str) -> Authenticator:
        return ServiceAccountAuthenticator(cluster=cluster, review=self.review, pods=lambda: self._pods)

    def serves(self, cluster: str) -> bool:
        return cluster == self.cluster

    def control_plane(self, cluster: str, *, index: int) -> Bind:
        return self.xds

    async def add_cluster(self, *, name: str, xds: Bind) -> None:
        """Nothing to start: gateways are pods too (labelled `lockgate.io/gateway: ingress`)."""
        self.xds = xds
        self._added = True

    async def remove_cluster(self, name: str) -> None:
        """Nothing to stop: the gateways are pods, whose Deployments are the cluster's owner's. The loop
        stops this operator's control plane after it: the cluster's proxies keep their last configuration
        (Envoy's own behaviour without a control plane), and pods started later get none."""
        if name == self.cluster:
            self._added = False
            log.warning("cluster %s left the Mesh: this operator stops serving its proxies; they keep their last "
                        "configuration", name)

    async def apply(self, intent: Intent) -> None:
        self._intent = intent
        self._refresh()

    def sync(self, pods: Iterable[PodEntry], endpoints: Iterable[EndpointEntry]) -> None:
        """The operator's indexes changed: rebuild the topology from them (memory only) and tell the loop
        if render's input changed."""
        self._pods = {(p.namespace, p.name): p for p in pods}
        self._endpoints = tuple(endpoints)
        self._refresh()

    def _refresh(self) -> None:
        ports: dict[tuple[str, str], int] = {}
        if self._intent is not None:
            for (ns, name), svc in self._intent.services.items():
                if svc.spec.ports:
                    ports[(ns, name)] = svc.spec.ports[0].port
        topo = topology(self.cluster, self._pods.values(), self._endpoints, service_ports=ports,
                        ingress_port=self.ingress_port)
        if topo != self._topology:
            self._topology = topo
            self._callback()

    def set_remote(self, cluster: str, topo: ClusterTopology | None) -> None:
        """What this cluster's operator last read of another cluster's API (None: forget it)."""
        before = self._remote.get(cluster)
        if topo is None:
            self._remote.pop(cluster, None)
        else:
            self._remote[cluster] = topo
        if before != topo:
            self._callback()

    def topology(self, cluster: str) -> ClusterTopology:
        if cluster != self.cluster:
            return self._remote.get(cluster) or ClusterTopology(cluster=cluster)
        return self._topology or ClusterTopology(cluster=cluster)

    def metrics(self, cluster: str) -> Metrics | None:
        if cluster != self.cluster or self.prometheus_url is None:
            return None
        return Metrics(url=self.prometheus_url, local=False)

    def status(self) -> RuntimeStatus:
        topo = self.topology(self.cluster)
        proxies: dict[str, ProxyProcess] = {}
        workloads: list[WorkloadInstance] = []
        by_node = {node_id(self.cluster, p): p for p in self._pods.values()}
        for nid, pod in sorted(by_node.items()):
            state = "stopping" if pod.deleting else "running" if pod.ip else "starting"
            proxies[nid] = ProxyProcess(state=state, stats=f"{pod.ip}:{pod.stats_port}" if pod.ip else None)
        for sc in topo.sidecars:
            workloads.append(WorkloadInstance(
                id=NodeId.parse(sc.node_id).instance or sc.node_id, cluster=self.cluster, namespace=sc.namespace,
                service=sc.service, version=sc.version, workload=sc.workload, ready=sc.node_id in topo.ready,
                address=f"{sc.address}:{sc.app_port}", endpoint=f"{sc.address}:{sc.inbound_port}",
                http_proxy=f"http://{sc.outbound_address or sc.address}:{sc.outbound_port}",
                state=proxies[sc.node_id].state if sc.node_id in proxies else "unknown"))
        return RuntimeStatus(proxies=proxies, workloads=workloads)

    async def close(self) -> None:
        """Nothing to stop: the pods are the user's, and keep serving with their last configuration."""

