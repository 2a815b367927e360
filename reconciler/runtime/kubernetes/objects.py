"""What the operator keeps of each pod and EndpointSlice it watches, and the topology built from them.

Pure: kopf's indexes call `pod_entry` / `slice_entries` per watch event and keep the results; `topology`
turns the two indexes into render's input. Nothing here lists the API: an event costs one entry, and the
topology is rebuilt from memory (O(pods), no request).

Which pods are proxies: those the injector marked (`lockgate.io/injected: "true"`) that name a service
(`lockgate.io/service`, or `app` as Istio users have it) and a version (`lockgate.io/version`, or
`version`). Where each one is reached: the EndpointSlice entry whose targetRef is the pod (its address
and readiness, as the kubelet reports them); a pod no slice lists yet gets its configuration but no
traffic. The sidecar's ports come from the sidecar container's environment, as the injector wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.names import NodeId
from mesh.topology import ClusterTopology, Gateway, Sidecar
from multicluster.eastwest import EASTWEST

SIDECAR_CONTAINER = "lockgate-proxy"
INJECTED_LABEL = "lockgate.io/injected"
GATEWAY_LABEL = "lockgate.io/gateway"
SERVICE_LABELS = ("lockgate.io/service", "app")
VERSION_LABELS = ("lockgate.io/version", "version")
DEFAULT_PORTS = {"LOCKGATE_INBOUND_PORT": 15006, "LOCKGATE_OUTBOUND_PORT": 15001, "LOCKGATE_STATS_PORT": 15090}
DEFAULT_OUTBOUND_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class PodEntry:
    namespace: str
    name: str
    service: str | None
    version: str | None
    gateway: str | None
    """`ingress` for an ingress gateway pod (label `lockgate.io/gateway`)."""
    service_account: str
    ip: str | None
    inbound_port: int
    outbound_port: int
    outbound_address: str
    stats_port: int
    app_port: int | None
    deleting: bool
    workload: str


@dataclass(frozen=True)
class EndpointEntry:
    namespace: str
    pod: str
    address: str
    ready: bool
    port: int | None


def _first(labels: Mapping[str, str], keys: Iterable[str]) -> str | None:
    return next((labels[k] for k in keys if labels.get(k)), None)


def _int(value: object, default: int) -> int:
    try:
        port = int(str(value))
    except ValueError:
        return default
    return port if 0 < port < 65536 else default


def pod_entry(body: Mapping[str, Any]) -> PodEntry | None:
    """The pod as a proxy of the mesh, or None if it is not one (not injected, or no service named)."""
    meta = body.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    spec = body.get("spec") or {}
    containers = [c for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    sidecar = next((c for c in containers if c.get("name") == SIDECAR_CONTAINER), None)
    if labels.get(INJECTED_LABEL) != "true" or sidecar is None:
        return None
    gateway = labels.get(GATEWAY_LABEL) or None
    service, version = _first(labels, SERVICE_LABELS), _first(labels, VERSION_LABELS)
    if gateway is None and (service is None or version is None):
        return None
    env = {str(e.get("name")): e.get("value") for e in sidecar.get("env") or [] if isinstance(e, Mapping)}
    app_port = next((_int(p.get("containerPort"), 0) for c in containers if c is not sidecar
                     for p in c.get("ports") or [] if isinstance(p, Mapping)), None)
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "default")
    return PodEntry(
        namespace=namespace, name=name, service=service, version=version, gateway=gateway,
        service_account=str(spec.get("serviceAccountName") or "default"),
        ip=str((body.get("status") or {}).get("podIP") or "") or None,
        inbound_port=_int(env.get("LOCKGATE_INBOUND_PORT"), DEFAULT_PORTS["LOCKGATE_INBOUND_PORT"]),
        outbound_port=_int(env.get("LOCKGATE_OUTBOUND_PORT"), DEFAULT_PORTS["LOCKGATE_OUTBOUND_PORT"]),
        outbound_address=str(env.get("LOCKGATE_OUTBOUND_ADDRESS") or DEFAULT_OUTBOUND_ADDRESS),
        stats_port=_int(env.get("LOCKGATE_STATS_PORT"), DEFAULT_PORTS["LOCKGATE_STATS_PORT"]),
        app_port=app_port or None,
        deleting=bool(meta.get("deletionTimestamp")),
        workload=labels.get("lockgate.io/workload") or (f"{service}-{version}" if service else name),
    )


def slice_entries(body: Mapping[str, Any]) -> list[EndpointEntry]:
    """Every pod endpoint of an EndpointSlice: address, readiness (absent counts as ready, as the API
    says), and the slice's first port (the Service's target port: where the app listens)."""
    meta = body.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    ports = [p for p in body.get("ports") or [] if isinstance(p, Mapping)]
    port = _int(ports[0].get("port"), 0) or None if ports else None
    out: list[EndpointEntry] = []
    for ep in body.get("endpoints") or []:
        if not isinstance(ep, Mapping):
            continue
        ref = ep.get("targetRef") or {}
        addresses = [str(a) for a in ep.get("addresses") or []]
        if ref.get("kind") != "Pod" or not ref.get("name") or not addresses:
            continue
        conditions = ep.get("conditions") or {}
        ready = conditions.get("ready") is not False and conditions.get("terminating") is not True
        out.append(EndpointEntry(namespace=str(ref.get("namespace") or namespace), pod=str(ref["name"]),
                                 address=addresses[0], ready=ready, port=port))
    return out


def node_id(cluster: str, pod: PodEntry) -> str:
    if pod.gateway == "ingress":
        return str(NodeId.gateway(cluster=cluster, kind="ingress"))
    if pod.gateway == EASTWEST:
        return str(NodeId.gateway(cluster=cluster, kind=EASTWEST))
    return str(NodeId(cluster=cluster, kind="sidecar", namespace=pod.namespace, instance=pod.name))


def topology(cluster: str, pods: Iterable[PodEntry], endpoints: Iterable[EndpointEntry],
             *, service_ports: Mapping[tuple[str, str], int] | None = None,
             ingress_port: int = 8080, eastwest_port: int = 15443) -> ClusterTopology:
    """Render's input for one cluster. `service_ports` (namespace, service) -> port is the intent's: the
    app port of a pod that declares none. Sorted, so the same pods give the same value."""
    where = {(e.namespace, e.pod): e for e in endpoints}
    sidecars: list[Sidecar] = []
    ready: set[str] = set()
    ingress: Gateway | None = None
    gateways: list[Gateway] = []
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        ep = where.get((pod.namespace, pod.name))
        address = ep.address if ep is not None else pod.ip
        if address is None:
            continue  # not scheduled yet: nowhere to send its configuration's listeners
        nid = node_id(cluster, pod)
        if pod.gateway == "ingress":
            if ingress is None:
                ingress = Gateway(node_id=nid, address=address, port=ingress_port)
            continue
        if pod.gateway == EASTWEST:
            if not any(g.kind == EASTWEST for g in gateways):
                gateways.append(Gateway(node_id=nid, address=address, port=eastwest_port, kind=EASTWEST))
            continue
        assert pod.service is not None and pod.version is not None
        app_port = pod.app_port or (ep.port if ep is not None else None) \
            or (service_ports or {}).get((pod.namespace, pod.service)) or 8080
        sidecars.append(Sidecar(
            node_id=nid, namespace=pod.namespace, service=pod.service, version=pod.version,
            workload=pod.workload, address=address, inbound_port=pod.inbound_port,
            outbound_port=pod.outbound_port, app_port=app_port, service_account=pod.service_account,
            outbound_address=pod.outbound_address))
        if ep is not None and ep.ready and not pod.deleting:
            ready.add(nid)
    return ClusterTopology(cluster=cluster, ingress=ingress, sidecars=tuple(sidecars), ready=frozenset(ready),
                           gateways=tuple(gateways))
