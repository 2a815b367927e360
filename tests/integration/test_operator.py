"""The operator in-process against kmock (an emulated Kubernetes API): GitSource -> Ready with the applied
revision; a broken commit -> Stalled with `path:line`, nothing served changes; an EndpointSlice change
reaches the snapshots of the proxies that call that service only; a deleted pod leaves the endpoints."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mesh.xds.snapshot import ENDPOINT
from reconciler.cli.operator import Operator, OperatorConfig
from reconciler.runtime.base import Bind
from tests.fixtures import waiting
from tests.fixtures.git import commit_all, new_repo, write
from tests.fixtures.kube import Kube, OperatorThread, kube, slice_body

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
NS = "lockgate-system"
GITSOURCES = f"/apis/lockgate.io/v1alpha1/namespaces/{NS}/gitsources"

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  trustDomain: example.org
  clusters: [{name: east}]
"""
SERVICES = "\n---\n".join(f"""\
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  ports: [{{name: http, port: {port}, protocol: HTTP}}]
  versions: [v1, v2]
""" for name, port in (("frontend", 8080), ("reviews", 9080), ("ratings", 9081)))
# reviews and ratings call nothing: an endpoint change of reviews is frontend's business only.
WORKLOADS = "\n---\n".join(f"""\
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: {svc}-v1, namespace: shop}}
spec:
  service: {svc}
  version: v1
  clusters: [east]
  command: [on-kubernetes-a-deployment-runs-this]
  egress: []
""" for svc in ("reviews", "ratings"))


def routes(v1: int) -> str:
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


def repo(tmp_path: Path) -> Path:
    return new_repo(tmp_path / "mesh", {"mesh.yaml": MESH, "services.yaml": SERVICES, "workloads.yaml": WORKLOADS,
                                        "routes.yaml": routes(100)})


def pod(name: str, service: str, version: str, ip: str, *, sa: str | None = None) -> dict[str, Any]:
    """A pod as the API server stores it after the injector ran (the injector's own function)."""
    from reconciler.k8s.inject import InjectConfig, inject_pod_spec

    meta = {"name": name, "namespace": "shop", "labels": {"app": service, "version": version}}
    spec = {"serviceAccountName": sa or service,
            "containers": [{"name": "app", "image": "demo", "ports": [{"containerPort": 9080}]}]}
    injected = inject_pod_spec(meta, spec, InjectConfig(cluster="east"))
    assert injected is not None
    return {"apiVersion": "v1", "kind": "Pod", "metadata": injected[0], "spec": injected[1],
            "status": {"podIP": ip, "phase": "Running"}}


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Kube, Operator]]:
    async with kube() as k:
        op = Operator(config=OperatorConfig(cluster="east", state_dir=tmp_path / "state",
                                            xds=Bind("127.0.0.1", 0), webhook=None, metrics=None,
                                            standalone=True), api=k.api())
        thread = OperatorThread(op)
        await asyncio.to_thread(thread.start)
        await k.watched("pods", "endpointslices", "gitsources", "routes")
        try:
            yield k, op
        finally:
            await asyncio.to_thread(thread.stop)


until = functools.partial(waiting.until, timeout=20.0, interval=0.05)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


async def gitsource(k: Kube, url: Path) -> None:
    await k.create(GITSOURCES, {"apiVersion": "lockgate.io/v1alpha1", "kind": "GitSource",
                                "metadata": {"name": "mesh", "namespace": NS},
                                "spec": {"url": f"file://{url}", "interval": "1s"}})


async def test_gitsource_ready_then_a_broken_commit_stalls_and_changes_nothing(cluster: tuple[Kube, Operator],
                                                                             tmp_path: Path) -> None:
    k, op = cluster
    root = repo(tmp_path)
    await gitsource(k, root)
    await until("first revision applied", lambda: op.session and op.session.reconciler.applied)
    first = op.session.reconciler.applied if op.session else None
    assert first is not None

    async def status() -> dict[str, Any]:
        return await k.get(f"{GITSOURCES}/mesh")

    deadline = time.monotonic() + 20
    while (c := condition(await status(), "Ready")) is None or c["status"] != "True":
        assert time.monotonic() < deadline, await status()
        await asyncio.sleep(0.1)
    st = (await status())["status"]
    assert st["appliedRevision"] == first and condition(await status(), "Stalled")["status"] == "False"  # type: ignore[index]

    plane = op.session.reconciler.planes["east"]  # type: ignore[union-attr]
    served = {n: plane.cache.get(n) for n in plane.cache.nodes()}
    write(root, "routes.yaml", routes(100).replace("weight: 0", "weight: 30"))  # 100 + 30: invalid
    bad = commit_all(root, "reviews: 100/30 (a typo)")
    deadline = time.monotonic() + 20
    while (c := condition(await status(), "Stalled")) is None or c["status"] != "True":
        assert time.monotonic() < deadline, await status()
        await asyncio.sleep(0.1)
    st = (await status())["status"]
    stalled = condition(await status(), "Stalled")
    assert stalled is not None and stalled["reason"] == "InvalidRevision"
    assert "routes.yaml:" in stalled["message"] and "weights must sum to 100" in stalled["message"]
    assert st["failedRevision"] == bad and st["appliedRevision"] == first
    assert condition(await status(), "Ready")["status"] == "False"  # type: ignore[index]
    assert {n: plane.cache.get(n) for n in plane.cache.nodes()} == served  # nothing that serves changed


async def test_endpoint_churn_reaches_only_the_callers_and_a_deleted_pod_leaves(cluster: tuple[Kube, Operator],
                                                                               tmp_path: Path) -> None:
    k, op = cluster
    await gitsource(k, repo(tmp_path))
    await until("first revision applied", lambda: op.session and op.session.reconciler.applied)
    pods = "/api/v1/namespaces/shop/pods"
    for body in (pod("frontend-a", "frontend", "v1", "10.0.0.1"), pod("reviews-v1-a", "reviews", "v1", "10.0.0.2"),
                 pod("reviews-v1-b", "reviews", "v1", "10.0.0.3"), pod("ratings-v1-a", "ratings", "v1", "10.0.0.4")):
        await k.create(pods, body)
    slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
    await k.create(slices, slice_body(namespace="shop", name="frontend-1", service="frontend", port=8080,
                                      endpoints=[("frontend-a", "10.0.0.1", True)]))
    await k.create(slices, slice_body(namespace="shop", name="ratings-1", service="ratings", port=9081,
                                      endpoints=[("ratings-v1-a", "10.0.0.4", True)]))
    await k.create(slices, slice_body(namespace="shop", name="reviews-1", service="reviews", port=9080,
                                      endpoints=[("reviews-v1-a", "10.0.0.2", True)]))
    plane = op.session.reconciler.planes["east"]  # type: ignore[union-attr]
    frontend, reviews, ratings = "east/shop/frontend-a", "east/shop/reviews-v1-a", "east/shop/ratings-v1-a"

    def reviews_endpoints() -> set[str]:
        snap = plane.cache.get(frontend)
        if snap is None:
            return set()
        text = str([r for name, r in snap.items(ENDPOINT).items() if "reviews" in name])
        return {ip for ip in ("10.0.0.2", "10.0.0.3") if ip in text}

    await until("frontend sees reviews-v1-a", lambda: reviews_endpoints() == {"10.0.0.2"})
    before = {n: plane.cache.get(n).version(ENDPOINT) for n in (frontend, reviews, ratings)}  # type: ignore[union-attr]

    # The kubelet reports reviews-v1-b ready: one slice update.
    await k.patch(f"{slices}/reviews-1", {"endpoints": slice_body(
        namespace="shop", name="reviews-1", service="reviews", port=9080,
        endpoints=[("reviews-v1-a", "10.0.0.2", True), ("reviews-v1-b", "10.0.0.3", True)])["endpoints"]})
    await until("frontend sees reviews-v1-b", lambda: reviews_endpoints() == {"10.0.0.2", "10.0.0.3"})
    after = {n: plane.cache.get(n).version(ENDPOINT) for n in (frontend, reviews, ratings)}  # type: ignore[union-attr]
    assert after[frontend] != before[frontend]
    assert after[reviews] == before[reviews] and after[ratings] == before[ratings]  # they do not call reviews

    # The pod is deleted (its slice entry lingers until the endpoints controller runs: the pod decides).
    await k.delete(f"{pods}/reviews-v1-b")
    await until("reviews-v1-b gone from frontend's endpoints", lambda: reviews_endpoints() == {"10.0.0.2"})
    assert "east/shop/reviews-v1-b" not in set(plane.cache.nodes())


def frontend_route(v1: int, v2: int) -> dict[str, Any]:
    return {"apiVersion": "lockgate.io/v1alpha1", "kind": "Route",
            "metadata": {"name": "frontend", "namespace": "shop"},
            "spec": {"service": "frontend", "http": [{"name": "default", "route": [
                {"version": "v1", "weight": v1}, {"version": "v2", "weight": v2}]}]}}


async def test_resources_applied_with_kubectl_join_the_intent_and_a_bad_one_changes_nothing(
        cluster: tuple[Kube, Operator], tmp_path: Path) -> None:
    k, op = cluster
    await gitsource(k, repo(tmp_path))
    await until("first revision applied", lambda: op.session and op.session.reconciler.applied)
    rec = op.session.reconciler  # type: ignore[union-attr]
    routes_api = "/apis/lockgate.io/v1alpha1/namespaces/shop/routes"
    await k.create(routes_api, frontend_route(50, 50))
    await until("the kubectl Route in the applied intent",
                lambda: rec.intent is not None and ("shop", "frontend") in rec.intent.routes)
    plane = rec.planes["east"]
    served = {n: plane.cache.get(n) for n in plane.cache.nodes()}
    await k.patch(f"{routes_api}/frontend", {"spec": frontend_route(70, 50)["spec"]})  # 120: invalid
    await until("the bad resource refused", lambda: rec.failed is not None)
    assert any(e.startswith("@cluster/Route/shop/frontend.yaml:") and "weights must sum to 100" in e
               for e in rec.last_error), rec.last_error
    assert {n: plane.cache.get(n) for n in plane.cache.nodes()} == served  # nothing served changed
    await k.delete(f"{routes_api}/frontend")
    await until("the deleted Route gone from the intent", lambda: rec.failed is None and rec.intent is not None
                and ("shop", "frontend") not in rec.intent.routes)


def kubeconfig(server: str, **user: str) -> str:
    import json as _json

    return _json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "west",
                        "clusters": [{"name": "west", "cluster": {"server": server}}],
                        "users": [{"name": "reader", "user": user or {"token": "west-reader"}}],
                        "contexts": [{"name": "west", "context": {"cluster": "west", "user": "reader"}}]})


async def test_remote_clusters_come_from_sanitised_remote_secrets(tmp_path: Path) -> None:
    """east's operator reads west's API (a second emulator) from a remote secret: west's ready reviews-v2
    reaches east's callers as west's east-west gateway; a kubeconfig that would run code is refused."""
    import base64

    mesh = MESH.replace("clusters: [{name: east}]", "clusters: [{name: east}, {name: west}]")
    root = new_repo(tmp_path / "mesh", {"mesh.yaml": mesh, "services.yaml": SERVICES, "routes.yaml": routes(0)})
    async with kube() as east, kube() as west:
        await west.create("/api/v1/namespaces/shop/pods", pod("reviews-v2-a", "reviews", "v2", "10.1.0.5"))
        await west.create("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices", slice_body(
            namespace="shop", name="reviews-1", service="reviews", port=9080,
            endpoints=[("reviews-v2-a", "10.1.0.5", True)]))
        await west.create(f"/api/v1/namespaces/{NS}/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "lockgate-eastwest", "namespace": NS, "labels": {"lockgate.io/gateway": "eastwest"}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "tls", "port": 15443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}})
        op = Operator(config=OperatorConfig(cluster="east", state_dir=tmp_path / "state", xds=Bind("127.0.0.1", 0),
                                            webhook=None, metrics=None, standalone=True, insecure_remotes=True),
                      api=east.api())
        thread = OperatorThread(op)
        await asyncio.to_thread(thread.start)
        await east.watched("pods", "endpointslices", "gitsources", "secrets")
        try:
            await gitsource(east, root)
            await until("first revision applied", lambda: op.session and op.session.reconciler.applied)
            await east.create("/api/v1/namespaces/shop/pods", pod("frontend-a", "frontend", "v1", "10.0.0.1"))
            await east.create(f"/api/v1/namespaces/{NS}/secrets", {
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "remote-west", "namespace": NS, "labels": {"lockgate.io/remote-cluster": "true"}},
                "data": {"west": base64.b64encode(kubeconfig(west.url).encode()).decode()}})
            plane = op.session.reconciler.planes["east"]  # type: ignore[union-attr]
            assert set(op.session.reconciler.planes) == {"east"}  # type: ignore[union-attr]  # west is west's

            def west_endpoint() -> bool:
                snap = plane.cache.get("east/shop/frontend-a")
                return snap is not None and "192.0.2.10" in str(dict(snap.items(ENDPOINT)))

            await until("west's reviews-v2 through west's east-west gateway", west_endpoint)
            assert "10.1.0.5" not in str(dict(plane.cache.get("east/shop/frontend-a").items(ENDPOINT)))  # type: ignore[union-attr]

            # A kubeconfig that would run a program on the operator's pod is refused, and says why.
            evil = kubeconfig(west.url, exec="/bin/sh")  # type: ignore[arg-type]
            await east.create(f"/api/v1/namespaces/{NS}/secrets", {
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "remote-central", "namespace": NS,
                             "labels": {"lockgate.io/remote-cluster": "true"}},
                "data": {"central": base64.b64encode(evil.encode()).decode()}})
            await until("the exec kubeconfig refused", lambda: "central" in op.remote_errors)
            assert "exec" in op.remote_errors["central"] and "central" not in op.remotes
        finally:
            await asyncio.to_thread(thread.stop)


async def test_a_gitsource_with_a_secret_ref_fetches_with_its_credentials(cluster: tuple[Kube, Operator],
                                                                         tmp_path: Path) -> None:
    """secretRef: username and password (a token) for an http(s) remote; an SSH identity is refused with why."""
    import base64

    from tests.fixtures.git import bare_remote, git
    from tests.fixtures.githttp import git_http

    k, op = cluster
    work = repo(tmp_path)
    (tmp_path / "srv").mkdir()
    bare_remote(work, tmp_path / "srv" / "mesh.git")
    with git_http(tmp_path / "srv", username="lockgate", password="t0ken") as base:
        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        await k.create(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mesh-git", "namespace": NS},
            "data": {"username": b64("lockgate"), "password": b64("t0ken")}})
        await k.create(GITSOURCES, {"apiVersion": "lockgate.io/v1alpha1", "kind": "GitSource",
                                    "metadata": {"name": "mesh", "namespace": NS},
                                    "spec": {"url": f"{base}/mesh.git", "interval": "1s",
                                             "secretRef": {"name": "mesh-git"}}})
        applied = await until("fetched with the token", lambda: op.session and op.session.reconciler.applied)
        assert applied == git(work, "rev-parse", "HEAD")
