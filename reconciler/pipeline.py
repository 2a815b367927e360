"""One path from intent to snapshots: what `up` serves is what `plan` shows and `validate` asks Envoy about.

rollout overlay (weights and canary rules written into a copy of the Routes) -> each cluster's view of
the others (east-west gateways, failover by locality) -> certificates (issued at the edge, handed in as
values) -> security (mTLS, authorization, rate limits) -> render -> `consistent()`.

Everything here is pure but for the certificate authority it is handed, which reads the clock it is given
and makes keys; plan and validate hand it an in-memory authority, `up` the cluster intermediates.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mesh.intent import Intent
from mesh.names import NodeId
from mesh.render import Extension, RenderCache, render
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import InconsistentSnapshot, Snapshot
from multicluster.ca import new_intermediate, new_root
from multicluster.eastwest import EastWestExtension, locality_policies, planned_gateway, remote_view
from multicluster.issuer import WorkloadIssuer
from policies import IssuedCert, SecurityExtension
from rollouts.advance import RolloutState
from rollouts.routing import overlay

RolloutStates = Mapping[tuple[str, str], RolloutState]


class Certificates(Protocol):
    """Who signs each proxy's workload certificate (`multicluster.issuer.WorkloadIssuer`)."""

    def certs_for(self, intent: Intent, topology: ClusterTopology, *, now: float) -> dict[str, IssuedCert]: ...

    @property
    def trust_bundle(self) -> list[str]: ...


@dataclass(frozen=True)
class ClusterRender:
    """One cluster's snapshots, or why there are none (a render bug: the cluster keeps what it has)."""

    cluster: str
    snapshots: Mapping[str, Snapshot] = field(default_factory=dict)
    error: str | None = None


def render_mesh(
    *,
    intent: Intent,
    states: RolloutStates,
    topologies: Mapping[str, ClusterTopology],
    certs: Certificates,
    now: float,
    revision: str,
    caches: Mapping[str, RenderCache] | None = None,
    extra: Sequence[Extension] = (),
    remote: Mapping[str, ClusterTopology] | None = None,
) -> dict[str, ClusterRender]:
    """Every cluster's snapshots for one revision and rollout state. `extra`: further render extensions
    after the mesh's own (what a plugin would add; tests use it to stand for a render Envoy refuses).
    `remote`: clusters served by another control plane (on Kubernetes, every other cluster's operator):
    seen through their east-west gateways, never rendered here."""
    localities = {c.name: c.locality for c in intent.mesh.spec.clusters}
    policies = locality_policies(intent)  # TrafficPolicies: the rollout overlay leaves them as they are
    views = {name: remote_view(topo, locality=localities.get(name))
             for name, topo in {**(remote or {}), **topologies}.items()}
    out: dict[str, ClusterRender] = {}
    for name, topo in sorted(topologies.items()):
        remotes = tuple(v for other, v in sorted(views.items()) if other != name and v is not None)
        shaped = overlay(intent, states, cluster=name)  # per cluster: a rollout's waves weigh clusters apart
        issued = certs.certs_for(shaped, topo, now=now)
        extensions = [
            EastWestExtension(local=name, remotes=remotes, locality=localities.get(name), policies=policies),
            SecurityExtension(intent=shaped, certs=issued, trust_bundle=certs.trust_bundle),
            *extra,
        ]
        snapshots = render(intent=shaped, topology=topo, revision=revision, extensions=extensions,
                           cache=caches.get(name) if caches is not None else None)
        try:
            for snap in snapshots.values():
                snap.consistent()  # RDS/EDS/SDS names all present: Envoy would otherwise wait on them silently
        except InconsistentSnapshot as exc:
            out[name] = ClusterRender(cluster=name, error=str(exc))
            continue
        out[name] = ClusterRender(cluster=name, snapshots=snapshots)
    return out


# --- what plan and validate render against -------------------------------------------------------------


def planned_topology(intent: Intent, cluster: str, *, address: str = "127.0.0.1", base_port: int = 20000
                     ) -> ClusterTopology:
    """The topology the intent asks for, every instance ready, with made-up ports.

    Deterministic, so two revisions differ only where their intent does."""
    sidecars = []
    for (ns, name), w in sorted(intent.workloads.items()):
        if cluster not in w.spec.clusters:
            continue
        for i in range(w.spec.replicas):
            node_id = str(NodeId.sidecar(cluster=cluster, namespace=ns, workload=name, index=i))
            # Ports from the node id, so adding one instance does not renumber the others.
            port = base_port + (zlib.crc32(node_id.encode()) % 10_000) * 3
            sidecars.append(Sidecar(
                node_id=node_id, namespace=ns, service=w.spec.service, version=w.spec.version,
                workload=name, address=address, inbound_port=port, outbound_port=port + 1, app_port=port + 2))
    ingress = Gateway(node_id=str(NodeId.gateway(cluster=cluster, kind="ingress")), address=address,
                      port=base_port - 1)
    return ClusterTopology(
        cluster=cluster, ingress=ingress, sidecars=tuple(sidecars), ready=frozenset(s.node_id for s in sidecars),
        gateways=(planned_gateway(cluster=cluster, address=address, port=base_port - 2),))


def planned_topologies(intent: Intent) -> dict[str, ClusterTopology]:
    return {c.name: planned_topology(intent, c.name) for c in intent.mesh.spec.clusters}


PLANNED_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
"""The clock plan and validate give their in-memory authority: their output must not depend on when they run."""


def ephemeral_certificates(clusters: Sequence[str], *, ttl: float = 3600.0) -> WorkloadIssuer:
    """An in-memory root and per-cluster intermediates, for rendering what is planned or checked.

    Real keys and certificates (Envoy parses them when it validates), never written anywhere. Render two
    revisions with the same authority and a proxy whose identity did not change keeps its certificate, so
    a plan shows a certificate change exactly where an identity changes."""
    issuer = WorkloadIssuer(ttl=ttl)
    root = new_root(now=PLANNED_NOW)
    for name in clusters:
        issuer.add_authority(name, new_intermediate(root, cluster=name, now=PLANNED_NOW))
    return issuer


def render_planned(intent: Intent, *, states: RolloutStates, certs: Certificates, revision: str = "",
                   extra: Sequence[Extension] = ()) -> dict[str, ClusterRender]:
    """`render_mesh` on the planned topology of every cluster of the intent."""
    return render_mesh(intent=intent, states=states, topologies=planned_topologies(intent), certs=certs,
                       now=PLANNED_NOW.timestamp(), revision=revision, extra=extra)
