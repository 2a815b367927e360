"""The other clusters of the Mesh, as this cluster's operator sees them (Istio's remote secrets).

A Secret in the operator's namespace labelled `lockgate.io/remote-cluster: "true"` holds one kubeconfig per
data key, the key being the remote cluster's name in the Mesh. The operator reads each remote API (list,
never write) for what render needs of it: its ready instances per service and version, and the address of
its east-west gateway. Mesh traffic to a remote instance goes through that gateway, mTLS end to end.

A kubeconfig is code the Secret's writer gets to run unless it is sanitised: exec plugins and
auth-providers run programs, file paths read this pod's files (a service-account token, a key). Only
inline credentials are accepted: `server` (https), `certificate-authority-data`, `token`,
`client-certificate-data` + `client-key-data`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mesh.names import NodeId
from mesh.topology import ClusterTopology, Gateway
from multicluster.eastwest import EASTWEST
from reconciler.runtime.kubernetes.objects import pod_entry, slice_entries, topology

REMOTE_LABEL = "lockgate.io/remote-cluster"
EASTWEST_PORT = 15443
_CLUSTER_KEYS = {"server", "certificate-authority-data", "tls-server-name"}
_USER_KEYS = {"token", "client-certificate-data", "client-key-data"}


class RemoteConfigError(ValueError):
    """A kubeconfig lockgate refuses to use, with why."""


@dataclass(frozen=True)
class RemoteAccess:
    """Everything needed to read one remote API, inline (nothing read from this pod's files)."""

    cluster: str
    server: str
    ca_data: str | None = None
    token: str | None = None
    client_cert_data: str | None = None
    client_key_data: str | None = None
    tls_server_name: str | None = None


def sanitise(cluster: str, text: str, *, allow_http: bool = False) -> RemoteAccess:
    """The kubeconfig's current context as inline credentials; RemoteConfigError for anything else.
    `allow_http`: a plain-text API (an emulator in tests); never for a real cluster, its token would travel
    in clear."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RemoteConfigError(f"remote cluster {cluster}: not a kubeconfig: {exc}") from None
    if not isinstance(config, Mapping):
        raise RemoteConfigError(f"remote cluster {cluster}: not a kubeconfig")
    contexts = {c.get("name"): c.get("context") or {} for c in config.get("contexts") or [] if isinstance(c, Mapping)}
    current = config.get("current-context") or (next(iter(contexts)) if len(contexts) == 1 else None)
    context = contexts.get(current)
    if not isinstance(context, Mapping):
        raise RemoteConfigError(f"remote cluster {cluster}: no current context")
    clusters = {c.get("name"): c.get("cluster") or {} for c in config.get("clusters") or [] if isinstance(c, Mapping)}
    users = {u.get("name"): u.get("user") or {} for u in config.get("users") or [] if isinstance(u, Mapping)}
    api = clusters.get(context.get("cluster"))
    user = users.get(context.get("user"), {}) if context.get("user") else {}
    if not isinstance(api, Mapping) or not isinstance(user, Mapping):
        raise RemoteConfigError(f"remote cluster {cluster}: the context names no cluster")
    for where, section, allowed in (("cluster", api, _CLUSTER_KEYS), ("user", user, _USER_KEYS)):
        refused = sorted(set(section) - allowed)
        if refused:
            raise RemoteConfigError(
                f"remote cluster {cluster}: {where} field(s) {', '.join(refused)} refused: only inline "
                "credentials are accepted (no exec plugins, auth providers or file paths)")
    server = str(api.get("server") or "")
    if not server.startswith("https://") and not (allow_http and server.startswith("http://")):
        raise RemoteConfigError(f"remote cluster {cluster}: server must be an https:// URL, got {server!r}")
    return RemoteAccess(cluster=cluster, server=server, ca_data=api.get("certificate-authority-data"),
                        token=user.get("token"), client_cert_data=user.get("client-certificate-data"),
                        client_key_data=user.get("client-key-data"), tls_server_name=api.get("tls-server-name"))


def from_secret(body: Mapping[str, Any], *, allow_http: bool = False
                ) -> tuple[dict[str, RemoteAccess], dict[str, str]]:
    """Every remote cluster a labelled Secret names, and (by cluster) why those it cannot use are refused."""
    out: dict[str, RemoteAccess] = {}
    problems: dict[str, str] = {}
    for cluster, encoded in sorted((body.get("data") or {}).items()):
        try:
            text = base64.b64decode(str(encoded), validate=True).decode()
            out[str(cluster)] = sanitise(str(cluster), text, allow_http=allow_http)
        except (ValueError, UnicodeDecodeError) as exc:
            problems[str(cluster)] = (str(exc) if isinstance(exc, RemoteConfigError) else
                                      f"remote cluster {cluster}: not base64 kubeconfig text")
    return out, problems


def eastwest_address(services: list[Mapping[str, Any]]) -> tuple[str, int] | None:
    """Where other clusters reach this one's east-west gateway: the load-balancer address of the Service
    labelled `lockgate.io/gateway: eastwest` (its `tls` port, else its first)."""
    for svc in services:
        labels = (svc.get("metadata") or {}).get("labels") or {}
        if labels.get("lockgate.io/gateway") != EASTWEST:
            continue
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        ports = (svc.get("spec") or {}).get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == "tls"), ports[0].get("port") if ports else None)
        host = next((i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname")), None)
        if host and port:
            return str(host), int(port)
    return None


def remote_topology(cluster: str, *, pods: list[Mapping[str, Any]], slices: list[Mapping[str, Any]],
                    services: list[Mapping[str, Any]]) -> ClusterTopology:
    """A remote cluster as render needs it: its ready instances and its east-west gateway (none: the
    cluster is not reachable from here, and contributes no endpoints)."""
    entries = [e for e in (pod_entry(p) for p in pods) if e is not None and e.gateway is None]
    endpoints = [e for s in slices for e in slice_entries(s)]
    topo = topology(cluster, entries, endpoints)
    where = eastwest_address(services)
    if where is None:
        return ClusterTopology(cluster=cluster, sidecars=topo.sidecars, ready=topo.ready)
    gw = Gateway(node_id=str(NodeId.gateway(cluster=cluster, kind=EASTWEST)), address=where[0], port=where[1],
                 kind=EASTWEST)
    return ClusterTopology(cluster=cluster, sidecars=topo.sidecars, ready=topo.ready, gateways=(gw,))


def api_client(access: RemoteAccess) -> Any:
    """A kubernetes client for one remote API, from inline credentials only (files in a private temp dir,
    as the client library wants paths)."""
    import tempfile

    from kubernetes import client

    c = client.Configuration()
    c.host = access.server
    folder = tempfile.mkdtemp(prefix=f"lockgate-remote-{access.cluster}-")

    def put(name: str, data: str | None) -> str | None:
        if data is None:
            return None
        path = f"{folder}/{name}"
        with open(path, "wb", opener=lambda p, f: __import__("os").open(p, f, 0o600)) as out:
            out.write(base64.b64decode(data))
        return path

    c.ssl_ca_cert = put("ca.crt", access.ca_data)
    c.cert_file = put("tls.crt", access.client_cert_data)
    c.key_file = put("tls.key", access.client_key_data)
    if access.tls_server_name:
        c.tls_server_name = access.tls_server_name
    if access.token:
        c.api_key = {"authorization": f"Bearer {access.token}"}
    return client.ApiClient(c)


def read_remote(api: Any, cluster: str, *, namespace: str, timeout: float = 10.0) -> ClusterTopology:
    """List (never watch, never write) what render needs of a remote cluster. Blocking: run it on a thread.
    The label selectors are also applied here: an API that ignored them must not change the answer."""
    from kubernetes import client

    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    pods = core.list_pod_for_all_namespaces(label_selector="lockgate.io/injected=true", _request_timeout=timeout)
    slices = discovery.list_endpoint_slice_for_all_namespaces(_request_timeout=timeout)
    services = core.list_namespaced_service(namespace, label_selector=f"lockgate.io/gateway={EASTWEST}",
                                            _request_timeout=timeout)

    def plain(items: Any) -> list[Mapping[str, Any]]:
        return [api.sanitize_for_serialization(i) for i in items.items]

    return remote_topology(cluster, pods=plain(pods), slices=plain(slices), services=plain(services))
