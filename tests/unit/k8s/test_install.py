"""`lockgate k8s install`: real Kubernetes schemas, least-privilege RBAC, a CA Secret without the root key,
the webhook's trust and serving certificate (a real TLS handshake), and the image that runs it all."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from packaging.version import Version

from multicluster import ca
from reconciler.k8s import install
from reconciler.k8s.crds import crd_documents
from reconciler.k8s.install import InstallError, install_documents
from reconciler.k8s.tls import serving_certificate
from reconciler.kinds import KINDS

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
IMAGE = "ghcr.io/lockgate/lockgate:0.1.0"
REPO = Path(__file__).resolve().parents[3]
K8S_VERSION = max(kubernetes_validate.utils.all_versions(), key=Version)
"""The newest Kubernetes the installed kubernetes-validate ships schemas for."""
NO_BUNDLED_SCHEMA = {"monitoring.coreos.com/v1": "PodMonitor", "kopf.dev/v1": "ClusterKopfPeering"}


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ca")
    ca.init_root(out / "root", now=NOW)
    ca.init_cluster(out / "root", "east", out / "east", now=NOW)
    return out


@pytest.fixture(scope="module")
def docs(ca_dir: Path) -> list[dict[str, Any]]:
    return install_documents(cluster="east", ca_dir=ca_dir, image=IMAGE, prometheus=None, now=NOW, pod_monitor=True)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


def test_the_newest_kubernetes_version_is_found_not_assumed() -> None:
    versions = kubernetes_validate.utils.all_versions()
    assert all(Version(K8S_VERSION) >= Version(v) for v in versions)
    assert Version(K8S_VERSION) >= Version("1.37")  # what kubernetes-validate==1.37.0 ships


def test_every_builtin_document_passes_the_strict_kubernetes_schema(docs: list[dict[str, Any]]) -> None:
    builtin = [d for d in docs if NO_BUNDLED_SCHEMA.get(d["apiVersion"]) != d["kind"]]
    assert {d["kind"] for d in builtin} == {
        "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
        "RoleBinding", "Secret", "Service", "Deployment", "MutatingWebhookConfiguration"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any problem


def test_strict_validation_does_catch_a_mistake(docs: list[dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(one(docs, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_kopf_peering_object_matches_the_crd_shipped_with_it(docs: list[dict[str, Any]]) -> None:
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "clusterkopfpeerings.kopf.dev" and crd["spec"]["scope"] == "Cluster"
    peering = one(docs, "ClusterKopfPeering")
    group, version = peering["apiVersion"].split("/")
    assert (group, crd["spec"]["names"]["kind"]) == (crd["spec"]["group"], peering["kind"])
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    jsonschema.validate(peering, served["schema"]["openAPIV3Schema"])
    assert peering["metadata"] == {"name": "lockgate-east", "labels": peering["metadata"]["labels"]}
    assert "namespace" not in peering["metadata"]
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # hence the CRD schema above
        kubernetes_validate.validate(peering, K8S_VERSION, strict=True)


def test_pod_monitor_fields_checked_by_hand_as_no_schema_of_its_crd_is_installed(
        docs: list[dict[str, Any]], ca_dir: Path) -> None:
    monitor = one(docs, "PodMonitor")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, K8S_VERSION, strict=True)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] == {"matchLabels": {"lockgate.io/injected": "true"}}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}  # sidecars live in every namespace
    assert monitor["spec"]["podMetricsEndpoints"] == [{"portNumber": 15090, "path": "/stats/prometheus"}]
    without = install_documents(cluster="east", ca_dir=ca_dir, image=IMAGE, prometheus=None, now=NOW)
    assert "PodMonitor" not in {d["kind"] for d in without}


# --- RBAC ---------------------------------------------------------------------------------------------

CLUSTER_VERBS = {
    ("", "pods"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
LOCKGATE_VERBS, STATUS_VERBS = {"get", "list", "watch", "patch"}, {"get", "patch", "update"}
NAMESPACE_VERBS = {("", "secrets"): {"get", "list", "watch"}}


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}  # no resourceNames, no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def expected_plurals() -> set[str]:
    return {d["spec"]["names"]["plural"] for d in crd_documents() if d["spec"]["group"] == "lockgate.io"}


def test_no_wildcard_in_any_rule(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        for rule in doc.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert all("*" not in item for item in rule[field]), (doc["kind"], rule)


def test_cluster_role_grants_exactly_the_table(docs: list[dict[str, Any]]) -> None:
    plurals = expected_plurals() | {"gitsources"}
    expected = dict(CLUSTER_VERBS)
    expected.update({("lockgate.io", p): LOCKGATE_VERBS for p in plurals})
    expected.update({("lockgate.io", f"{p}/status"): STATUS_VERBS for p in plurals})
    assert grants(one(docs, "ClusterRole")["rules"]) == expected


def test_secrets_only_in_lockgate_system(docs: list[dict[str, Any]]) -> None:
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == "lockgate-system"
    assert grants(role["rules"]) == NAMESPACE_VERBS
    assert all(r != "secrets" for (_, r) in grants(one(docs, "ClusterRole")["rules"]))
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(docs, kind)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": "lockgate-operator"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lockgate-operator",
                                        "namespace": "lockgate-system"}]


def test_every_kind_is_watchable(docs: list[dict[str, Any]]) -> None:
    granted = {r for (g, r) in grants(one(docs, "ClusterRole")["rules"]) if g == "lockgate.io" and "/" not in r}
    assert expected_plurals() | {"gitsources"} == granted
    assert {d["spec"]["names"]["kind"] for d in crd_documents()} >= set(KINDS)  # every intent kind has a CRD


# --- the CA Secret ------------------------------------------------------------------------------------


def secret_files(docs: list[dict[str, Any]]) -> dict[str, bytes]:
    secret = one(docs, "Secret")
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"], secret["type"]) == (
        "lockgate-ca", "lockgate-system", "Opaque")
    return {name: base64.b64decode(value, validate=True) for name, value in secret["data"].items()}


def private_keys(blob: bytes) -> list[Any]:
    """Every PEM private key in `blob`, loaded (a block that does not load fails the test)."""
    found = [m.group(0) for m in re.finditer(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----",
                                              blob, re.S)]
    assert len(found) == blob.count(b"PRIVATE KEY-----") // 2
    return [serialization.load_pem_private_key(b, password=None) for b in found]


def test_the_secret_holds_the_intermediate_and_the_root_certificate_but_never_the_root_key(
        docs: list[dict[str, Any]], ca_dir: Path) -> None:
    files = secret_files(docs)
    assert set(files) == {"root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem"}
    root = ca.load_root(ca_dir / "root")
    east = ca.load_cluster(ca_dir / "east")
    assert x509.load_pem_x509_certificates(files["root-cert.pem"]) == [root.cert]
    assert x509.load_pem_x509_certificates(files["ca-cert.pem"]) == [east.cert]
    assert x509.load_pem_x509_certificates(files["cert-chain.pem"]) == [east.cert, root.cert]
    [key] = private_keys(files["ca-key.pem"])
    assert key.public_key() == east.cert.public_key()
    every_key = [k for blob in files.values() for k in private_keys(blob)]
    assert every_key and all(k.public_key() != root.cert.public_key() for k in every_key)
    east.cert.verify_directly_issued_by(root.cert)  # raises unless the root signed it
    # Byte for byte what `lockgate ca cluster` wrote, so it is the same CA directory.
    for name, content in files.items():
        assert content == (ca_dir / "east" / name).read_bytes(), name


def test_the_mounted_secret_is_a_ca_directory_that_loads(docs: list[dict[str, Any]], ca_dir: Path,
                                                         tmp_path: Path) -> None:
    files = secret_files(docs)
    deployment = one(docs, "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in deployment["volumes"] if "secret" in v]
    [mount] = [m for m in deployment["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": "/etc/lockgate/ca", "readOnly": True}
    assert volume["secret"]["secretName"] == "lockgate-ca"
    for item in volume["secret"]["items"]:  # what the kubelet does with `items`
        path = tmp_path / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[item["key"]])
        path.chmod(0o600)
    assert {i["path"] for i in volume["secret"]["items"]} == {f"east/{f}" for f in files}
    loaded = ca.load_cluster(tmp_path / "east")
    assert loaded.cert == ca.load_cluster(ca_dir / "east").cert
    assert ca.ensure_hierarchy(tmp_path, ["east"], now=NOW, create_root=False)["east"].cert == loaded.cert


def test_the_webhook_trusts_the_root(docs: list[dict[str, Any]], ca_dir: Path) -> None:
    [hook] = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    bundle = x509.load_pem_x509_certificates(base64.b64decode(hook["clientConfig"]["caBundle"]))
    assert bundle == [ca.load_root(ca_dir / "root").cert]
    assert hook["clientConfig"]["service"] == {"name": "lockgate-operator", "namespace": "lockgate-system",
                                               "port": 443, "path": "/inject"}
    assert hook["name"] == "inject.lockgate.io"
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["namespaceSelector"] == {"matchLabels": {"lockgate.io/inject": "enabled"}}
    assert "objectSelector" not in hook  # opting a pod out is an annotation the handler reads
    assert (hook["sideEffects"], hook["admissionReviewVersions"], hook["failurePolicy"], hook["timeoutSeconds"],
            hook["reinvocationPolicy"]) == ("None", ["v1"], "Fail", 10, "Never")


def test_a_missing_intermediate_names_the_command_that_makes_it(ca_dir: Path) -> None:
    with pytest.raises(InstallError, match=r"lockgate ca cluster west --root ROOTDIR --out .*/west"):
        install_documents(cluster="west", ca_dir=ca_dir, image=IMAGE, prometheus=None, now=NOW)


def test_a_broken_or_expired_intermediate_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InstallError, match=r"not valid now.*lockgate ca rotate-cluster east"):
        install_documents(cluster="east", ca_dir=ca_dir, image=IMAGE, prometheus=None,
                          now=NOW + dt.timedelta(days=400))
    (tmp_path / "east").mkdir()
    for name in ("ca-key.pem", "ca-cert.pem", "cert-chain.pem"):
        (tmp_path / "east" / name).write_bytes((ca_dir / "east" / name).read_bytes())
    with pytest.raises(InstallError, match=r"root-cert\.pem: missing"):
        install_documents(cluster="east", ca_dir=tmp_path, image=IMAGE, prometheus=None, now=NOW)


@pytest.mark.parametrize("name", ["../east", "East", "a" * 64, "", "east/x"])
def test_a_cluster_name_must_be_a_dns_label(ca_dir: Path, name: str) -> None:
    with pytest.raises(InstallError, match="DNS label"):
        install_documents(cluster=name, ca_dir=ca_dir, image=IMAGE, prometheus=None, now=NOW)


def test_output_depends_on_nothing_but_the_arguments_and_the_ca_directory(ca_dir: Path) -> None:
    """No timestamp and nothing random: another clock, another call, the same bytes."""
    runs = [install_documents(cluster="east", ca_dir=ca_dir, image=IMAGE, prometheus=None, now=at, pod_monitor=True)
            for at in (NOW, NOW + dt.timedelta(days=30), NOW)]
    dumped = [yaml.safe_dump_all(r, sort_keys=False) for r in runs]
    assert dumped[0] == dumped[1] == dumped[2]
    assert "2030" not in dumped[0] and "Timestamp" not in dumped[0]


# --- the operator's Deployment and Service ------------------------------------------------------------


def test_the_deployment_runs_the_operator_locked_down(docs: list[dict[str, Any]]) -> None:
    deployment = one(docs, "Deployment")
    assert (deployment["metadata"]["name"], deployment["metadata"]["namespace"]) == ("lockgate-operator",
                                                                                      "lockgate-system")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "operator" and container["image"] == IMAGE
    assert [*container["command"], *container["args"]] == [
        "lockgate", "operator", "--cluster", "east", "--namespace", "lockgate-system", "--ca", "/etc/lockgate/ca",
        "--xds-port", "15010", "--webhook-port", "9443", "--metrics-port", "9090", "--state-dir", "/var/lib/lockgate"]
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9090}
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/lib/lockgate"]["name"]]["emptyDir"] == {}
    assert pod["serviceAccountName"] == "lockgate-operator" and pod["automountServiceAccountToken"] is True
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app.kubernetes.io/name": "lockgate", "app.kubernetes.io/component": "operator",
                      "lockgate.io/cluster": "east"}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["template"]["metadata"]["annotations"]["lockgate.io/inject"] == "false"


def test_prometheus_and_replicas_reach_the_operator(ca_dir: Path) -> None:
    docs = install_documents(cluster="east", ca_dir=ca_dir, image=IMAGE, prometheus="http://prom.monitoring:9090",
                             replicas=2, now=NOW)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == [
        "--prometheus", "http://prom.monitoring:9090"]
    for bad in ({"replicas": 0}, {"prometheus": "prom:9090"}, {"image": ""}):
        args: dict[str, Any] = {"prometheus": None, "replicas": 1, "image": IMAGE, **bad}
        with pytest.raises(InstallError):
            install_documents(cluster="east", ca_dir=ca_dir, now=NOW, **args)


def test_the_service_selects_the_operator_on_the_three_ports(docs: list[dict[str, Any]]) -> None:
    service = one(docs, "Service")
    assert service["metadata"]["name"] == "lockgate-operator"
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("grpc-xds", 15010, 15010), ("https-webhook", 443, 9443), ("http-metrics", 9090, 9090)}
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["containerPort"] for p in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


# --- the webhook's serving certificate: a real TLS handshake ------------------------------------------------


def handshake(tmp_path: Path, chain: str, key: str, root: x509.Certificate, server_hostname: str) -> bytes:
    """Serve one TLS connection on 127.0.0.1 with chain+key; connect trusting only `root`."""
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"admitted")
        except (OSError, ssl.SSLError):
            pass  # the client refused us: what the second case expects

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca.pem(root))
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(64)
    finally:
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def live_hierarchy() -> tuple[ca.CA, ca.CA]:
    """A hierarchy valid on the real clock (`ssl` checks dates against it)."""
    now = dt.datetime.now(dt.UTC)
    root = ca.new_root(now=now)
    return root, ca.new_intermediate(root, cluster="east", now=now)


def test_the_serving_certificate_passes_a_tls_handshake_as_the_service(
        tmp_path: Path, live_hierarchy: tuple[ca.CA, ca.CA]) -> None:
    root, east = live_hierarchy
    chain, key = serving_certificate(east, dns_names=["webhook.example"], now=dt.datetime.now(dt.UTC),
                                     ttl=dt.timedelta(hours=1))
    assert handshake(tmp_path, chain, key, root.cert, "lockgate-operator.lockgate-system.svc") == b"admitted"
    assert handshake(tmp_path, chain, key, root.cert, "webhook.example") == b"admitted"


def test_a_client_expecting_another_name_refuses_it(tmp_path: Path, live_hierarchy: tuple[ca.CA, ca.CA]) -> None:
    root, east = live_hierarchy
    chain, key = serving_certificate(east, dns_names=[], now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tmp_path, chain, key, root.cert, "lockgate-operator.other.svc")


def test_a_client_trusting_another_root_refuses_it(tmp_path: Path, live_hierarchy: tuple[ca.CA, ca.CA]) -> None:
    _, east = live_hierarchy
    chain, key = serving_certificate(east, dns_names=[], now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1))
    stranger = ca.new_root(now=dt.datetime.now(dt.UTC))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tmp_path, chain, key, stranger.cert, "lockgate-operator.lockgate-system.svc")


def test_the_serving_certificate_is_a_server_leaf_below_the_intermediate(live_hierarchy: tuple[ca.CA, ca.CA]) -> None:
    root, east = live_hierarchy
    now = dt.datetime.now(dt.UTC)
    chain, key = serving_certificate(east, dns_names=["lockgate-operator", "extra.example"], now=now,
                                     ttl=dt.timedelta(days=3650))
    leaf, *rest = x509.load_pem_x509_certificates(chain.encode())
    assert rest == [east.cert]  # the root stays out: the API server has it in caBundle
    verifier = (verification.PolicyBuilder().store(verification.Store([root.cert])).time(now)
                .build_server_verifier(x509.DNSName("lockgate-operator.lockgate-system.svc")))
    assert verifier.verify(leaf, rest)[-1] == root.cert  # RFC 5280 path building, as a TLS client does
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lockgate-operator", "lockgate-operator.lockgate-system",
                                                     "lockgate-operator.lockgate-system.svc", "extra.example"]
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_after_utc == east.cert.not_valid_after_utc  # never outlives its issuer
    assert serialization.load_pem_private_key(key.encode(), None).public_key() == leaf.public_key()


# --- the image ----------------------------------------------------------------------------------------

KNOWN_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                      "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, "a continuation line runs off the end"
    return out


def test_the_dockerfile_parses_and_runs_the_operator_as_the_manifests_user() -> None:
    steps = dockerfile_instructions((REPO / "Dockerfile").read_text())
    assert {word for word, _ in steps} <= KNOWN_INSTRUCTIONS
    assert all(word.isupper() for word, _ in steps)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms == ["python:3.11-slim-bookworm"]
    assert all(":" in image and not image.endswith(":latest") for image in froms)
    assert "latest" not in (REPO / "Dockerfile").read_text()
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] == str(install.USER_ID)
    assert steps[-2:] == [("ENTRYPOINT", '["lockgate"]'), ("CMD", '["operator"]')]
    assert json.loads(steps[-2][1]) == ["lockgate"]
    [expose] = [rest for word, rest in steps if word == "EXPOSE"]
    assert set(expose.split()) == {str(install.XDS_PORT), str(install.WEBHOOK_PORT), str(install.METRICS_PORT)}
    installs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "git" in installs.split() and "openssh-client" in installs.split() and "pip install /src" in installs


def test_the_build_context_lets_in_only_the_packages() -> None:
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"  # an allow-list: keys, state and .venv stay out of the build
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "mesh", "policies", "multicluster", "rollouts", "reconciler"}
    assert "**/*.pem" in lines
