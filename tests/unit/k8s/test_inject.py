"""Sidecar injection: golden manifests (in.yaml -> out.yaml, `LOCKGATE_UPDATE_GOLDEN=1` rewrites them), every
injected workload valid for the newest Kubernetes that kubernetes-validate knows, and the webhook's JSON
Patch giving exactly what injection gives."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from reconciler.k8s import inject
from reconciler.k8s.inject import InjectConfig, inject_documents, inject_pod_spec, pod_patch

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "in.yaml").exists())
CONFIG = InjectConfig(cluster="east", image="ghcr.io/lockgate/lockgate:test")
UPDATE = os.environ.get("LOCKGATE_UPDATE_GOLDEN") == "1"
WORKLOADS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job",
             "CronJob"}
IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")
"""What the API server accepts as a container port name (kubernetes-validate does not check the length)."""


class _Dumper(yaml.SafeDumper):
    """Golden files as a person would write them: multi-line strings (the iptables script) as blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def newest_kubernetes() -> str:
    return max(kubernetes_validate.utils.all_versions(), key=lambda v: tuple(int(x) for x in v.split(".")))


def load(case: str, name: str = "in.yaml") -> list[Any]:
    return [d for d in yaml.safe_load_all((GOLDEN / case / name).read_text()) if d is not None]


def items(docs: list[Any]) -> list[dict[str, Any]]:
    """Documents with Lists flattened."""
    out: list[dict[str, Any]] = []
    for d in docs:
        out += items(d["items"]) if d.get("kind") == "List" else [d]
    return out


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]  # type: ignore[no-any-return]


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def simple_pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "reviews"}},
            "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}], **spec}}


def injected_pod(pod: dict[str, Any], config: InjectConfig = CONFIG) -> dict[str, Any]:
    result = inject_pod_spec(pod["metadata"], pod["spec"], config)
    assert result is not None
    return {**pod, "metadata": result[0], "spec": result[1]}


# --- golden ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    got = inject_documents(load(case), CONFIG)
    path = GOLDEN / case / "out.yaml"
    if UPDATE:
        path.write_text(yaml.dump_all(got, Dumper=_Dumper, sort_keys=False, width=110))
    assert got == load(case, "out.yaml"), f"{case}: run with LOCKGATE_UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_is_injecting_once_and_inputs_are_left_alone(case: str) -> None:
    docs = load(case)
    before = copy.deepcopy(docs)
    once = inject_documents(docs, CONFIG)
    assert docs == before
    assert inject_documents(once, CONFIG) == once


@pytest.mark.parametrize("case", CASES)
def test_injected_workloads_are_valid_kubernetes(case: str) -> None:
    version = newest_kubernetes()
    workloads = [d for d in items(inject_documents(load(case), CONFIG)) if d["kind"] in WORKLOADS]
    assert workloads
    for doc in workloads:
        kubernetes_validate.validate(doc, version, strict=True)
        for container in containers(pod_of(doc)).values():
            for port in container.get("ports", []):
                assert "name" not in port or IANA_SVC_NAME.match(port["name"]), port


@pytest.mark.parametrize("case", ["opted-out", "already-injected"])
def test_opted_out_and_already_injected_are_unchanged(case: str) -> None:
    docs = load(case)
    assert inject_documents(docs, CONFIG) == docs
    pod = pod_of(docs[0])
    assert inject_pod_spec(pod["metadata"], pod["spec"], CONFIG) is None


def test_list_changes_only_its_workloads_and_keeps_order() -> None:
    (before,) = load("list")
    (after,) = inject_documents([before], CONFIG)
    assert [(d["kind"], d["metadata"]["name"]) for d in after["items"]] == [
        (d["kind"], d["metadata"]["name"]) for d in before["items"]]
    changed = [a["kind"] for b, a in zip(before["items"], after["items"], strict=True) if a != b]
    assert changed == ["StatefulSet"]  # the Service and ConfigMap as they were; the DaemonSet opted out


def test_other_kinds_and_same_named_kinds_of_other_groups_are_unchanged() -> None:
    pod_like = {"spec": {"template": simple_pod()}}
    docs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {}},
            {"apiVersion": "example.com/v1", "kind": "Deployment", **pod_like}, "not a mapping", None]
    assert inject_documents(docs, CONFIG) == docs


# --- what the pod gets ---------------------------------------------------------------------------------


def test_the_proxy_container() -> None:
    pod = injected_pod(simple_pod(serviceAccountName="reviews"))
    proxy = containers(pod)[inject.PROXY_CONTAINER]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "lockgate-proxy"]
    assert proxy["command"] == ["lockgate", "sidecar"] and proxy["image"] == CONFIG.image
    env = env_of(proxy)
    assert {k: v["fieldRef"]["fieldPath"] for k, v in env.items() if isinstance(v, dict)} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName"}
    assert {k: v for k, v in env.items() if isinstance(v, str)} == {
        "LOCKGATE_CLUSTER": "east", "LOCKGATE_XDS": "lockgate-operator.lockgate-system.svc:15010",
        "LOCKGATE_TOKEN_FILE": "/var/run/secrets/lockgate/token", "LOCKGATE_INBOUND_PORT": "15006",
        "LOCKGATE_OUTBOUND_PORT": "15001", "LOCKGATE_OUTBOUND_ADDRESS": "127.0.0.1", "LOCKGATE_STATS_PORT": "15090",
        "LOCKGATE_ADMIN_SOCKET": "/var/run/lockgate/admin.sock", "LOCKGATE_LOG_LEVEL": "warning"}
    assert {p["containerPort"]: p["name"] for p in proxy["ports"]} == {15006: "lockgate-in", 15090: "http-envoy-prom"}
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"],
            sc["capabilities"]) == (1337, True, True, False, {"drop": ["ALL"]})
    assert proxy["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert proxy["readinessProbe"]["tcpSocket"] == {"port": 15006}  # not the stats port: it says nothing of config
    assert "startupProbe" not in proxy and "livenessProbe" not in proxy
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["lockgate-token"]["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "lockgate", "expirationSeconds": 3600, "path": "token"}}]
    assert volumes["lockgate-run"] == {"name": "lockgate-run", "emptyDir": {"medium": "Memory"}}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["lockgate-token"] == {"name": "lockgate-token", "mountPath": "/var/run/secrets/lockgate",
                                        "readOnly": True}
    assert mounts["lockgate-run"]["mountPath"] == "/var/run/lockgate"
    assert "volumeMounts" not in containers(pod)["app"]  # the app never sees the token or the admin socket


def test_metadata_marks_the_pod() -> None:
    pod = injected_pod(simple_pod())
    meta = pod["metadata"]
    assert meta["labels"] == {"app": "reviews", "lockgate.io/injected": "true"}
    status = json.loads(meta["annotations"]["lockgate.io/status"])
    assert status == {"containers": ["lockgate-proxy"], "initContainers": [],
                      "volumes": ["lockgate-token", "lockgate-run"], "fingerprint": CONFIG.fingerprint}
    assert {k: v for k, v in meta["annotations"].items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "15090", "prometheus.io/path": "/stats/prometheus"}


def test_app_containers_get_the_outbound_listener_as_their_proxy() -> None:
    config = InjectConfig(cluster="east", outbound_address="127.0.0.9", outbound_port=16001)
    pod = injected_pod(simple_pod(initContainers=[{"name": "setup", "image": "x"}]), config)
    assert env_of(containers(pod)["app"]) == {"HTTP_PROXY": "http://127.0.0.9:16001", "NO_PROXY": "127.0.0.1,localhost"}
    assert "env" not in containers(pod)["setup"]  # it runs before an ordinary sidecar exists
    assert env_of(containers(pod)["lockgate-proxy"])["LOCKGATE_OUTBOUND_ADDRESS"] == "127.0.0.9"


def test_a_container_keeps_its_own_proxy_settings() -> None:
    (doc,) = inject_documents(load("own-http-proxy"), CONFIG)
    found = containers(doc)
    assert env_of(found["app"]) == {"HTTP_PROXY": "http://corporate-proxy:3128", "NO_PROXY": "127.0.0.1,localhost"}
    assert env_of(found["sidecar-of-theirs"]) == {"no_proxy": "*.internal", "HTTP_PROXY": "http://127.0.0.1:15001"}


@pytest.mark.parametrize(("policy", "native"), [(None, False), ("Always", False), ("OnFailure", True),
                                                ("Never", True)])
def test_pods_that_run_to_completion_get_a_native_sidecar(policy: str | None, native: bool) -> None:
    spec = {"restartPolicy": policy} if policy else {}
    pod = injected_pod(simple_pod(initContainers=[{"name": "setup", "image": "x"}], **spec))
    inits = [c["name"] for c in pod["spec"].get("initContainers", [])]
    names = [c["name"] for c in pod["spec"]["containers"]]
    status = json.loads(pod["metadata"]["annotations"]["lockgate.io/status"])
    if native:
        assert (inits, names) == (["lockgate-proxy", "setup"], ["app"])
        proxy = pod["spec"]["initContainers"][0]
        assert proxy["restartPolicy"] == "Always" and proxy["startupProbe"]["tcpSocket"] == {"port": 15006}
        assert "HTTP_PROXY" in env_of(containers(pod)["setup"])  # it starts after the proxy is ready
        assert (status["containers"], status["initContainers"]) == ([], ["lockgate-proxy"])
    else:
        assert (inits, names) == (["setup"], ["app", "lockgate-proxy"])
    kubernetes_validate.validate(pod, newest_kubernetes(), strict=True)


@pytest.mark.parametrize("how", ["annotation", "config"])
def test_iptables_capture(how: str) -> None:
    pod = simple_pod()
    config = CONFIG
    if how == "annotation":
        pod["metadata"]["annotations"] = {"lockgate.io/capture": "iptables"}
    else:
        config = InjectConfig(cluster="east", image=CONFIG.image, capture="iptables")
    out = injected_pod(pod, config)
    init = out["spec"]["initContainers"][0]
    assert init["name"] == "lockgate-init"
    assert init["securityContext"]["runAsUser"] == 0
    assert set(init["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    script = init["command"][-1]
    assert "--uid-owner 1337 -j RETURN" in script
    assert "REDIRECT --to-ports 15001" in script and "REDIRECT --to-ports 15006" in script
    assert json.loads(out["metadata"]["annotations"]["lockgate.io/status"])["initContainers"] == ["lockgate-init"]


def test_no_capture_means_nothing_privileged() -> None:
    pod = injected_pod(simple_pod())
    assert "initContainers" not in pod["spec"]
    assert all("add" not in (c.get("securityContext", {}).get("capabilities") or {})
               for c in containers(pod).values())


def test_capture_annotation_none_overrides_config_and_a_bad_one_is_refused() -> None:
    pod = simple_pod()
    pod["metadata"]["annotations"] = {"lockgate.io/capture": "none"}
    out = injected_pod(pod, InjectConfig(cluster="east", capture="iptables"))
    assert "initContainers" not in out["spec"]
    pod["metadata"]["annotations"] = {"lockgate.io/capture": "ebpf"}
    with pytest.raises(ValueError, match=r"lockgate\.io/capture"):
        inject_pod_spec(pod["metadata"], pod["spec"], CONFIG)


@pytest.mark.parametrize("spec", [{"volumes": [{"name": "lockgate-run", "emptyDir": {}}]},
                                  {"initContainers": [{"name": "lockgate-init", "image": "x"}]}])
def test_names_of_ours_already_taken_are_refused(spec: dict[str, Any]) -> None:
    pod = simple_pod(**spec)
    with pytest.raises(ValueError, match="lockgate-"):
        inject_pod_spec(pod["metadata"], pod["spec"], CONFIG)


def test_fingerprint_follows_the_config() -> None:
    prints = {InjectConfig(cluster="east").fingerprint, InjectConfig(cluster="west").fingerprint,
              InjectConfig(cluster="east", log_level="debug").fingerprint}
    assert len(prints) == 3
    assert InjectConfig(cluster="east").fingerprint == InjectConfig(cluster="east").fingerprint


def test_default_image_is_this_version() -> None:
    assert InjectConfig(cluster="east").image == f"ghcr.io/lockgate/lockgate:{importlib.metadata.version('lockgate')}"


@pytest.mark.parametrize(("field", "value"), [
    ("cluster", ""), ("cluster", "a/b"), ("xds", "no-port"), ("inbound_port", 0), ("stats_port", 15001),
    ("outbound_address", "localhost"), ("capture", "tproxy"), ("log_level", "loud"), ("token_expiration", 300),
    ("token_audience", ""), ("image", ""),
])  # fmt: skip
def test_config_refuses_bad_values(field: str, value: Any) -> None:
    args: dict[str, Any] = {"cluster": "east", field: value}
    with pytest.raises(ValueError, match=field.split("_")[0]):
        InjectConfig(**args)


# --- the webhook's JSON Patch ------------------------------------------------------------------------------


def golden_pods() -> list[dict[str, Any]]:
    """Every pod (or pod template, as a Pod) of the golden inputs."""
    out = []
    for case in CASES:
        for doc in items(load(case)):
            if doc["kind"] in WORKLOADS:
                pod = pod_of(doc)
                meta = {"name": "p", "namespace": "shop", **pod.get("metadata", {})}
                out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod["spec"]})
    return out


@pytest.mark.parametrize("pod", golden_pods(), ids=lambda p: str(p["spec"]["containers"][0]["name"]))
def test_patch_gives_exactly_the_injected_pod(pod: dict[str, Any]) -> None:
    before = copy.deepcopy(pod)
    ops = pod_patch(pod, CONFIG)
    assert pod == before
    result = inject_pod_spec(pod["metadata"], pod["spec"], CONFIG)
    if result is None:
        assert ops == []
        return
    patched = jsonpatch.apply_patch(pod, json.loads(json.dumps(ops)))  # as it travels: JSON
    assert patched == {**pod, "metadata": result[0], "spec": result[1]}
    assert pod_patch(patched, CONFIG) == []


def test_patch_escapes_keys_with_a_slash() -> None:
    pod = simple_pod()
    pod["metadata"]["annotations"] = {"example.com/owner": "team-a"}
    ops = pod_patch(pod, CONFIG)
    paths = [op["path"] for op in ops]
    assert "/metadata/labels/lockgate.io~1injected" in paths
    assert "/metadata/annotations/lockgate.io~1status" in paths
    assert not [p for p in paths if "lockgate.io/" in p]
    patched = jsonpatch.apply_patch(pod, ops)
    assert patched["metadata"]["labels"]["lockgate.io/injected"] == "true"
    assert patched["metadata"]["annotations"]["example.com/owner"] == "team-a"


def test_patch_of_a_pod_without_labels_or_annotations_adds_them_whole() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "app", "image": "x"}]}}
    ops = {op["path"]: op for op in pod_patch(pod, CONFIG)}
    assert ops["/metadata/labels"] == {"op": "add", "path": "/metadata/labels",
                                       "value": {"lockgate.io/injected": "true"}}
    assert ops["/spec/containers/0/env"]["value"][0] == {"name": "HTTP_PROXY", "value": "http://127.0.0.1:15001"}
    assert ops["/spec/containers/-"]["value"]["name"] == "lockgate-proxy"
    assert [v["name"] for v in ops["/spec/volumes"]["value"]] == ["lockgate-token", "lockgate-run"]
