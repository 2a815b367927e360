"""The Kubernetes path, as real as it can be on a machine with no API server.

`lockgate operator` runs as its own process against kmock (an emulated Kubernetes API, in this test's
event loop). Each pod is sent through the operator's injection webhook (a real AdmissionReview over HTTPS,
TLS from the cluster's CA), the JSON patch it answers is applied and the patched pod passes
kubernetes-validate; then the test plays kubelet: it starts the app and the injected `lockgate-proxy`
container (`lockgate sidecar`, with the container's own environment) as processes on the pod's address,
and publishes the pod in an EndpointSlice. Requests go through the frontend pod's sidecar (its
HTTP_PROXY) to reviews over mTLS, and the test counts who answered.

What differs from a cluster: every "pod" shares this host's network namespace, each on its own loopback
address (127.0.K.x), so the outbound listener binds the pod's address instead of the pod's own loopback
(`LOCKGATE_OUTBOUND_ADDRESS`, the one environment value the test changes), and each sidecar's admin
socket and token file live in the test's directory instead of the pod's volumes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import json
import os
import random
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import pytest_asyncio

from e2e.harness import Client, commit_file
from multicluster import ca as ca_mod
from tests.fixtures import waiting
from tests.fixtures.git import new_repo
from tests.fixtures.kube import Kube, kube, slice_body
from tests.fixtures.processes import reap

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]
NS = "lockgate-system"
SVC_DNS = "lockgate-operator.lockgate-system.svc"
LOCKGATE = str(Path(sys.executable).parent / "lockgate")

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  trustDomain: example.org
  clusters: [{name: east}]
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  versions: [v1]
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 9080, protocol: HTTP}]
  versions: [v1, v2]
"""


def route(v1: int) -> str:
    return f"""\
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {{name: reviews, namespace: shop}}
spec:
  service: reviews
  http:
    - name: default
      route:
        - {{version: v1, weight: {v1}}}
        - {{version: v2, weight: {100 - v1}}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


until = functools.partial(waiting.until, timeout=60.0, interval=0.1)


class Pods:
    """The kubelet's part: processes per pod, stopped by PID at the end."""

    def __init__(self, k: Kube, tmp: Path, subnet: int, webhook: int, root_pem: bytes) -> None:
        self.k, self.tmp, self.subnet, self.webhook = k, tmp, subnet, webhook
        self.tls = ssl.create_default_context(cadata=root_pem.decode())
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.ips: dict[str, str] = {}

    async def admit(self, pod: dict[str, Any]) -> dict[str, Any]:
        """What the API server does on CREATE in a namespace labelled for injection: ask the webhook."""
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": secrets.token_hex(8), "operation": "CREATE", "namespace": pod["metadata"]["namespace"],
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "dryRun": False}}
        async with aiohttp.ClientSession() as s, s.post(
                f"https://127.0.0.1:{self.webhook}/inject", json=review, ssl=self.tls,
                server_hostname=SVC_DNS) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        response = answer["response"]
        assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        patched: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
        return patched

    async def start(self, name: str, service: str, version: str) -> dict[str, Any]:
        ip = f"127.0.{self.subnet}.{len(self.ips) + 2}"
        self.ips[name] = ip
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "labels": {"app": service, "version": version}},
               "spec": {"serviceAccountName": service, "containers": [{
                   "name": "app", "image": "demo", "ports": [{"containerPort": 9080 if service == "reviews" else 8080}],
               }]}}
        patched = await self.admit(pod)
        import kubernetes_validate

        version_k8s = kubernetes_validate.latest_version()
        kubernetes_validate.validate(patched, version_k8s, strict=True)
        for c in patched["spec"]["containers"]:  # one host, one loopback: see the module docstring
            for e in c.get("env", []):
                if c["name"] == "lockgate-proxy" and e["name"] == "LOCKGATE_OUTBOUND_ADDRESS":
                    assert e["value"] == "127.0.0.1"  # what a real pod gets: no other pod can reach it
                    e["value"] = ip
        created = await self.k.create("/api/v1/namespaces/shop/pods", {**patched, "status": {"podIP": ip}})
        containers = {c["name"]: c for c in created["spec"]["containers"]}
        proxy = containers["lockgate-proxy"]
        app_env = {e["name"]: e["value"] for e in containers["app"].get("env", []) if "value" in e}
        assert app_env["HTTP_PROXY"] == "http://127.0.0.1:15001"  # what a real pod's app is given (the test
        # runs the app with the pod address instead, as the outbound listener binds there on this one host)
        token = secrets.token_urlsafe(24)
        self.k.tokens[token] = ("shop", service, name)
        run = self.tmp / name
        run.mkdir()
        (run / "token").write_text(token)
        os.chmod(run / "token", 0o600)
        field = {"metadata.name": name, "metadata.namespace": "shop", "status.podIP": ip,
                 "spec.serviceAccountName": service}
        env = {**{k: v for k, v in os.environ.items() if k in ("HOME", "LANG")},
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # the image's `lockgate`
        for e in proxy["env"]:
            if "value" in e:
                env[e["name"]] = str(e["value"])
            else:
                env[e["name"]] = field[e["valueFrom"]["fieldRef"]["fieldPath"]]
        env.update({"LOCKGATE_TOKEN_FILE": str(run / "token"), "LOCKGATE_RUN_DIR": str(run),
                    "LOCKGATE_ADMIN_SOCKET": str(run / "admin.sock")})  # the pod's volumes, in the test's dir
        port = 9080 if service == "reviews" else 8080
        app_argv = [LOCKGATE, "demo-app", "--service", service, "--version", version, "--namespace", "shop",
                    "--instance", name, "--host", ip, "--port", str(port)]
        if service == "frontend":
            app_argv += ["--call", "http://reviews.shop:9080/"]
        app = subprocess.Popen(app_argv, env={**env, "HTTP_PROXY": f"http://{ip}:15001"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(run / "sidecar.log", "wb") as log:  # the child keeps its own descriptor
            sidecar = subprocess.Popen(proxy["command"] + proxy.get("args", []), env=env,
                                       stdout=subprocess.DEVNULL, stderr=log)
        self.procs[name] = [sidecar, app]
        return created

    def stop(self, name: str) -> None:
        for proc in self.procs.pop(name, []):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.ips.pop(name, None)

    def close(self) -> None:
        """SIGTERM, then time to stop: `lockgate sidecar` stops its Envoy on SIGTERM, a SIGKILL would
        orphan it."""
        procs = [p for ps in self.procs.values() for p in ps]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
        with contextlib.suppress(Exception):
            reap(procs, timeout=10)


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Kube, Pods, Path]]:
    now = dt.datetime.now(dt.UTC)
    root = ca_mod.init_root(tmp_path / "ca" / "root", now=now)
    ca_mod.write_cluster(ca_mod.new_intermediate(root, cluster="east", now=now), tmp_path / "ca" / "east")
    (tmp_path / "ca" / "root" / ca_mod.ROOT_KEY).unlink()  # offline, as in a cluster: only the Secret's files
    repo = new_repo(tmp_path / "mesh", {"mesh.yaml": MESH, "routes.yaml": route(100)})
    xds, webhook, metrics = free_port(), free_port(), free_port()
    async with kube() as k:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": k.url}}],
            "users": [{"name": "operator", "user": {"token": "operator-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}]}))
        with open(tmp_path / "operator.log", "wb") as log:  # the child keeps its own descriptor
            operator = subprocess.Popen(
                [LOCKGATE, "operator", "--cluster", "east", "--kubeconfig", str(kubeconfig),
                 "--ca", str(tmp_path / "ca"), "--state-dir", str(tmp_path / "state"), "--bind", "127.0.0.1",
                 "--xds-port", str(xds), "--webhook-port", str(webhook), "--metrics-port", str(metrics),
                 "--standalone", "--xds-address", f"127.0.0.1:{xds}"], stdout=log, stderr=subprocess.STDOUT)
        pods = Pods(k, tmp_path, random.randint(100, 200), webhook, ca_mod.pem(root.cert).encode())
        try:
            async def healthy() -> bool:
                try:
                    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{metrics}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    assert operator.poll() is None, (tmp_path / "operator.log").read_text()
                    return False

            await until("the operator serves /healthz", healthy)

            async def webhook_listens() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", webhook)
                except OSError:
                    assert operator.poll() is None, (tmp_path / "operator.log").read_text()
                    return False
                writer.close()
                return True

            await until("the injection webhook listens", webhook_listens)
            await k.watched("pods", "endpointslices", "gitsources")
            await k.create(f"/apis/lockgate.io/v1alpha1/namespaces/{NS}/gitsources", {
                "apiVersion": "lockgate.io/v1alpha1", "kind": "GitSource",
                "metadata": {"name": "mesh", "namespace": NS}, "spec": {"url": f"file://{repo}", "interval": "1s"}})
            yield k, pods, repo
        finally:
            pods.close()
            if operator.poll() is None:
                operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(30)
            finally:
                reap([operator], timeout=10)


def _accepts(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s, contextlib.suppress(OSError):
        s.settimeout(1.0)
        s.connect((host, port))
        return True
    return False


def reviews_answer(body: Any) -> str | None:
    try:
        inner = body["upstreams"][0]["body"]
        return f"{inner['version']}/{inner['instance']}"
    except (KeyError, IndexError, TypeError):
        return None


async def test_operator_serves_real_envoys_weights_follow_git_and_a_deleted_pod_leaves(
        cluster: tuple[Kube, Pods, Path]) -> None:
    k, pods, repo = cluster
    for name, service, version in (("frontend-0", "frontend", "v1"), ("reviews-v1-a", "reviews", "v1"),
                                   ("reviews-v1-b", "reviews", "v1"), ("reviews-v2-a", "reviews", "v2")):
        await pods.start(name, service, version)
    # The kubelet's readiness probe (the injected one: TCP on the inbound port, which Envoy opens only once
    # the control plane sent its listeners): only ready pods are published as ready endpoints.
    for name, ip in pods.ips.items():
        await until(f"{name} ready (its sidecar listens)", lambda ip=ip: _accepts(ip, 15006), timeout=60)
    await until("frontend's outbound listener", lambda: _accepts(pods.ips["frontend-0"], 15001), timeout=60)
    slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
    await k.create(slices, slice_body(namespace="shop", name="frontend-1", service="frontend", port=8080,
                                      endpoints=[("frontend-0", pods.ips["frontend-0"], True)]))
    reviews = [(n, pods.ips[n], True) for n in ("reviews-v1-a", "reviews-v1-b", "reviews-v2-a")]
    await k.create(slices, slice_body(namespace="shop", name="reviews-1", service="reviews", port=9080,
                                      endpoints=reviews))
    client = Client((pods.ips["frontend-0"], 8080))  # the frontend app calls reviews through its sidecar
    try:
        await _scenario(k, pods, repo, client)
    finally:
        client.close()


async def _scenario(k: Kube, pods: Pods, repo: Path, client: Client) -> None:

    def answers(n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(n):
            try:
                status, body = client.get("frontend.shop")
            except OSError as exc:
                seen[type(exc).__name__] += 1
                continue
            seen[reviews_answer(body) if status == 200 and reviews_answer(body) else f"HTTP {status}"] += 1
            if status != 200 and os.environ.get("LOCKGATE_E2E_DEBUG"):
                print("ANSWER", status, str(body)[:600])
        return seen

    both = {"v1/reviews-v1-a", "v1/reviews-v1-b"}
    await until("frontend reaches both reviews v1 pods through the sidecars",
                lambda: (c := answers(40)) and set(c) == both and c)
    steady = answers(200)
    assert set(steady) == both, steady  # every request answered; weight 0: v2 gets nothing

    # The pod is deleted in the API: it stops receiving traffic (its process still runs: the endpoint goes).
    await k.delete("/api/v1/namespaces/shop/pods/reviews-v1-b")
    await until("reviews-v1-b out of the rotation",
                lambda: (c := answers(40)) and set(c) == {"v1/reviews-v1-a"} and c)
    after = answers(100)
    assert after == Counter({"v1/reviews-v1-a": 100}), after

    # A commit moves the weights: the Envoys serve it.
    commit_file(repo, "routes.yaml", route(0), "reviews: all to v2")
    await until("v2 takes the traffic", lambda: (c := answers(40)) and set(c) == {"v2/reviews-v2-a"} and c)
    gs = await k.get(f"/apis/lockgate.io/v1alpha1/namespaces/{NS}/gitsources/mesh")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    deadline = time.monotonic() + 20
    while (gs.get("status") or {}).get("appliedRevision") != head:
        assert time.monotonic() < deadline, gs.get("status")
        await asyncio.sleep(0.2)
        gs = await k.get(f"/apis/lockgate.io/v1alpha1/namespaces/{NS}/gitsources/mesh")
    ready = next(c for c in gs["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert k.reviews >= 4  # every sidecar proved who it is with its token (TokenReview)
