"""`lockgate k8s install`: the manifests that run lockgate in one cluster, as plain dicts.

One cluster gets the operator (reconcile loop, xDS control plane, sidecar-injection webhook) in the namespace
`lockgate-system`, with least-privilege RBAC, its intermediate CA in the Secret `lockgate-ca` (never the root
key), the MutatingWebhookConfiguration that trusts the mesh root, and kopf's peering resource so a second
replica stands by instead of acting twice. lockgate's own CRDs are not here: they are `lockgate k8s crds`,
applied (and Established) first, as Flux and Istio split them.

The only I/O is reading the cluster's CA directory in `install_documents`; `render_install` is pure: the same
CA and arguments give the same documents, with no timestamps and nothing random.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from mesh.intent import DNS_LABEL
from multicluster.ca import CA, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, CAError, load_cluster, pem
from reconciler.k8s.crds import crd_documents

Doc = dict[str, Any]

NAMESPACE = "lockgate-system"
SERVICE_ACCOUNT = DEPLOYMENT = SERVICE = "lockgate-operator"
CONTAINER = "operator"
CA_SECRET = "lockgate-ca"
WEBHOOK_CONFIGURATION = "lockgate-sidecar-injector"
WEBHOOK = "inject.lockgate.io"
WEBHOOK_PATH = "/inject"
GROUP = "lockgate.io"
CLUSTER_LABEL = "lockgate.io/cluster"
INJECT_LABEL = "lockgate.io/inject"
INJECTED_LABEL = "lockgate.io/injected"
XDS_PORT, WEBHOOK_PORT, METRICS_PORT = 15010, 9443, 9090
SIDECAR_METRICS_PORT, SIDECAR_METRICS_PATH = 15090, "/stats/prometheus"
CA_MOUNT, STATE_MOUNT = "/etc/lockgate/ca", "/var/lib/lockgate"
USER_ID = 10001
KOPF_GROUP = "kopf.dev"

_LABELS = {"app.kubernetes.io/name": "lockgate", "app.kubernetes.io/component": "operator"}
_CA_FILES = (ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN)


class InstallError(Exception):
    """The install cannot be rendered (no intermediate for the cluster, a bad argument); the message says how
    to fix it."""


def install_documents(*, cluster: str, ca_dir: Path, image: str, prometheus: str | None, replicas: int = 1,
                      now: dt.datetime, pod_monitor: bool = False) -> list[Doc]:
    """The manifests of one cluster, from `ca_dir/<cluster>` (made by `lockgate ca cluster`); raises
    InstallError when that intermediate is missing, broken, or not valid at `now`."""
    _check_name(cluster)
    directory = ca_dir / cluster
    if not (directory / CA_KEY).exists():
        raise InstallError(f"{directory}: no intermediate CA for cluster {cluster!r}. Where the root key is, run "
                           f"`lockgate ca cluster {cluster} --root ROOTDIR --out {directory}` (or give --ca: the "
                           "directory holding NAME/)")
    try:
        authority = load_cluster(directory)
    except CAError as exc:
        raise InstallError(str(exc)) from None
    if not authority.cert.not_valid_before_utc <= now < authority.cert.not_valid_after_utc:
        raise InstallError(f"{directory / CA_CERT}: the intermediate of cluster {cluster!r} is not valid now (valid "
                           f"{authority.cert.not_valid_before_utc:%Y-%m-%d} to "
                           f"{authority.cert.not_valid_after_utc:%Y-%m-%d}); make a new one with "
                           f"`lockgate ca rotate-cluster {cluster} --root ROOTDIR --ca-dir {ca_dir}`")
    return render_install(cluster=cluster, authority=authority, image=image, prometheus=prometheus,
                          replicas=replicas, pod_monitor=pod_monitor)


def render_install(*, cluster: str, authority: CA, image: str, prometheus: str | None, replicas: int = 1,
                   pod_monitor: bool = False) -> list[Doc]:
    """The documents in apply order: what a later one refers to comes first."""
    _check_name(cluster)
    if replicas < 1:
        raise InstallError(f"--replicas {replicas}: at least 1 (a second replica stands by, through kopf peering)")
    if not image.strip() or any(c.isspace() for c in image):
        raise InstallError(f"--image {image!r}: give an image reference such as ghcr.io/lockgate/lockgate:0.1.0")
    if prometheus is not None and not re.match(r"^https?://[^\s/]+", prometheus):
        raise InstallError(f"--prometheus {prometheus!r}: give the URL of the cluster's Prometheus (http:// or "
                           "https://)")
    labels = {**_LABELS, CLUSTER_LABEL: cluster}
    docs = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NAMESPACE, "labels": {**labels,
                                                    # The operator's pod meets the restricted profile.
                                                    "pod-security.kubernetes.io/enforce": "restricted"}}},
        kopf_peering_crd(),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(SERVICE_ACCOUNT, labels),
         "automountServiceAccountToken": True},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta(SERVICE_ACCOUNT, labels, namespaced=False), "rules": cluster_rules()},
        _binding("ClusterRoleBinding", "ClusterRole", labels),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(SERVICE_ACCOUNT, labels),
         "rules": namespace_rules()},
        _binding("RoleBinding", "Role", labels),
        ca_secret(authority, cluster=cluster, labels=labels),
        _service(labels),
        _deployment(cluster=cluster, image=image, prometheus=prometheus, replicas=replicas, labels=labels),
        {"apiVersion": f"{KOPF_GROUP}/v1", "kind": "ClusterKopfPeering",
         "metadata": {"name": peering_name(cluster), "labels": dict(labels)}},
        _webhook_configuration(authority, labels),
    ]
    if pod_monitor:
        docs.append(_pod_monitor(labels))
    return docs


def peering_name(cluster: str) -> str:
    """The ClusterKopfPeering the operator of `cluster` joins (`kopf run --peering NAME`)."""
    return f"lockgate-{cluster}"


def scrape_hint() -> str:
    """What to tell a user who gave no Prometheus: how the injected sidecars are found."""
    return (f"no --prometheus given, so the operator has no Prometheus for rollout analysis. The injected pods carry "
            f'prometheus.io/scrape: "true", prometheus.io/port: "{SIDECAR_METRICS_PORT}", prometheus.io/path: '
            f"{SIDECAR_METRICS_PATH} for annotation-based scraping, or add --pod-monitor for a PodMonitor "
            f'(Prometheus Operator) selecting {INJECTED_LABEL}: "true"; then re-run with --prometheus URL')


# --- RBAC -----------------------------------------------------------------------------------------------


def lockgate_plurals() -> list[str]:
    """The plural of every lockgate.io resource the operator watches (GitSource included), from the CRDs."""
    return sorted({d["spec"]["names"]["plural"] for d in crd_documents() if d["spec"]["group"] == GROUP}
                  | {"gitsources"})


def _rule(group: str, resources: list[str], verbs: list[str]) -> Doc:
    return {"apiGroups": [group], "resources": resources, "verbs": verbs}


def cluster_rules() -> list[Doc]:
    """Exactly what the operator does cluster-wide; no wildcard anywhere."""
    plurals = lockgate_plurals()
    return [
        _rule(GROUP, plurals, ["get", "list", "watch", "patch"]),
        _rule(GROUP, [f"{p}/status" for p in plurals], ["get", "patch", "update"]),  # kopf patches status
        _rule("", ["pods"], ["get", "list", "watch"]),
        _rule("discovery.k8s.io", ["endpointslices"], ["get", "list", "watch"]),
        _rule("", ["events"], ["create", "patch"]),  # kopf posts events on the objects it handles
        # Proxies prove who they are with projected service-account tokens; the control plane asks the API.
        _rule("authentication.k8s.io", ["tokenreviews"], ["create"]),
        # Cluster-wide peering (the operator watches pods in every namespace): a second replica stands by.
        _rule(KOPF_GROUP, ["clusterkopfpeerings"], ["get", "list", "watch", "patch"]),
        # kopf's resource observer notices CRDs and namespaces coming and going.
        _rule("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"]),
        _rule("", ["namespaces"], ["list", "watch"]),
    ]


def namespace_rules() -> list[Doc]:
    """Secrets only in lockgate-system: GitSource credentials and remote-cluster kubeconfigs (labelled
    lockgate.io/remote-cluster)."""
    return [_rule("", ["secrets"], ["get", "list", "watch"])]


def _binding(kind: str, role_kind: str, labels: dict[str, str]) -> Doc:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
            "metadata": _meta(SERVICE_ACCOUNT, labels, namespaced=kind == "RoleBinding"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]}


# --- the CA, the workload, the webhook -------------------------------------------------------------------


def ca_secret(authority: CA, *, cluster: str, labels: dict[str, str]) -> Doc:
    """The cluster's Istio plug-in CA files as `multicluster.ca.write_cluster` writes them (the intermediate's
    certificate, key and chain, and the root certificates): never the root key."""
    key = authority.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
    files = {CA_CERT: pem(authority.cert), CA_KEY: key,
             CERT_CHAIN: "".join(pem(c) for c in [authority.cert, *authority.chain]),
             ROOT_CERT: "".join(pem(c) for c in authority.roots)}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(CA_SECRET, labels),
            "data": {name: _b64(files[name]) for name in _CA_FILES}}


def _service(labels: dict[str, str]) -> Doc:
    # Readiness is true only on the active replica (kopf peering), so a standby gets no xDS or webhook traffic.
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(SERVICE, labels),
            "spec": {"selector": dict(_LABELS), "ports": [
                {"name": "grpc-xds", "port": XDS_PORT, "targetPort": XDS_PORT, "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "https-webhook", "port": 443, "targetPort": WEBHOOK_PORT, "protocol": "TCP"},
                {"name": "http-metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"}]}}


def operator_args(*, cluster: str, prometheus: str | None) -> list[str]:
    """`lockgate operator ...` as the Deployment runs it (after the `lockgate` command)."""
    args = ["operator", "--cluster", cluster, "--namespace", NAMESPACE, "--ca", CA_MOUNT,
            "--xds-port", str(XDS_PORT), "--webhook-port", str(WEBHOOK_PORT), "--metrics-port", str(METRICS_PORT),
            "--state-dir", STATE_MOUNT]
    return [*args, "--prometheus", prometheus] if prometheus is not None else args


def _deployment(*, cluster: str, image: str, prometheus: str | None, replicas: int, labels: dict[str, str]) -> Doc:
    locked_down = {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                   "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                   "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    container = {
        "name": CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["lockgate"], "args": operator_args(cluster=cluster, prometheus=prometheus),
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "ports": [{"name": "grpc-xds", "containerPort": XDS_PORT, "protocol": "TCP"},
                  {"name": "https-webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP"},
                  {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": METRICS_PORT}, "periodSeconds": 2,
                           "failureThreshold": 1},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "securityContext": locked_down,
        "volumeMounts": [{"name": "ca", "mountPath": CA_MOUNT, "readOnly": True},
                         {"name": "state", "mountPath": STATE_MOUNT},
                         {"name": "tmp", "mountPath": "/tmp"}],  # the root filesystem is read-only
    }
    pod = {
        "serviceAccountName": SERVICE_ACCOUNT, "automountServiceAccountToken": True,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            # /etc/lockgate/ca/<cluster>/<file>: a CA directory `multicluster.ca.load_cluster` reads. Group-readable
            # (fsGroup) because Secret files are owned by root and the operator is not.
            {"name": "ca", "secret": {"secretName": CA_SECRET, "defaultMode": 0o440,
                                      "items": [{"key": f, "path": f"{cluster}/{f}"} for f in _CA_FILES]}},
            {"name": "state", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(DEPLOYMENT, labels),
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(_LABELS)},
                     "template": {"metadata": {"labels": dict(labels), "annotations": {
                         INJECT_LABEL: "false",  # the control plane never gets a sidecar of its own
                         "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                         "prometheus.io/path": "/metrics"}},
                         "spec": pod}}}


def _webhook_configuration(authority: CA, labels: dict[str, str]) -> Doc:
    roots = "".join(pem(c) for c in authority.roots)  # the serving chain ends at the intermediate, below these
    webhook = {
        "name": WEBHOOK,
        "clientConfig": {"service": {"name": SERVICE, "namespace": NAMESPACE, "port": 443, "path": WEBHOOK_PATH},
                         "caBundle": _b64(roots)},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                   "scope": "Namespaced"}],
        # Opting a namespace in is a label; opting one pod out is the annotation lockgate.io/inject: "false".
        "namespaceSelector": {"matchLabels": {INJECT_LABEL: "enabled"}},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        # Fail closed, as Istio does: a pod admitted without its sidecar would run outside the mesh, with no
        # workload identity and outside every authorization policy. Only opted-in namespaces are affected, so
        # lockgate-system and kube-system always start, and the operator can come back.
        "failurePolicy": "Fail",
        "timeoutSeconds": 10,
        "reinvocationPolicy": "Never",
    }
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": _meta(WEBHOOK_CONFIGURATION, labels, namespaced=False), "webhooks": [webhook]}


def kopf_peering_crd() -> Doc:
    """kopf's own cluster-scoped peering resource (kopf.dev/v1 ClusterKopfPeering), as kopf publishes it."""
    schema = {"type": "object",
              "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"clusterkopfpeerings.{KOPF_GROUP}"},
            "spec": {"scope": "Cluster", "group": KOPF_GROUP,
                     "names": {"kind": "ClusterKopfPeering", "plural": "clusterkopfpeerings",
                               "singular": "clusterkopfpeering"},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": schema}}]}}


def _pod_monitor(labels: dict[str, str]) -> Doc:
    # PodMonitor endpoints name a port, or (v1) give `portNumber`; the sidecar must declare 15090 as a containerPort.
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": _meta("lockgate-sidecars",
                                                                                              labels),
            "spec": {"selector": {"matchLabels": {INJECTED_LABEL: "true"}}, "namespaceSelector": {"any": True},
                     "podMetricsEndpoints": [{"portNumber": SIDECAR_METRICS_PORT, "path": SIDECAR_METRICS_PATH}]}}


def _meta(name: str, labels: dict[str, str], *, namespaced: bool = True) -> Doc:
    meta: Doc = {"name": name}
    if namespaced:
        meta["namespace"] = NAMESPACE
    meta["labels"] = dict(labels)
    return meta


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _check_name(cluster: str) -> None:
    if not re.match(DNS_LABEL, cluster) or len(cluster) > 63:
        raise InstallError(f"--cluster {cluster!r}: a cluster name is a DNS label (lower-case letters, digits, '-', "
                           "at most 63)")
