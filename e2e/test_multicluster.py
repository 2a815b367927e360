"""Two clusters sharing one root CA: a service version that runs only in the other cluster is reached
through that cluster's east-west gateway (TLS passed through by SNI, mTLS end to end), a version whose
local instances go away fails over to the other cluster, and a cluster dropped from the Mesh takes its
gateways and its Prometheus with it while the other serves on."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from e2e.harness import Client, alive, commit_file, envoy_stats, git, lockgate, running

pytestmark = pytest.mark.e2e

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  trustDomain: example.org
  clusters: [{name: east}, {name: west}]
"""

WORKLOADS = """\
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: frontend-v1, namespace: shop}
spec:
  service: frontend
  version: v1
  clusters: [east]
  command: [lockgate, demo-app, --call, "http://reviews.shop:9080/reviews"]
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: reviews-v1-east, namespace: shop}
spec: {service: reviews, version: v1, replicas: 1, clusters: [east], command: [lockgate, demo-app]}
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: reviews-v1-west, namespace: shop}
spec: {service: reviews, version: v1, replicas: 1, clusters: [west], command: [lockgate, demo-app]}
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: reviews-v2-west, namespace: shop}
spec: {service: reviews, version: v2, replicas: 1, clusters: [west], command: [lockgate, demo-app]}
"""

V1 = "- version: v1\n          weight: 100\n        - version: v2\n          weight: 0"
V2 = "- version: v1\n          weight: 0\n        - version: v2\n          weight: 100"


def answered_by(client: Client, n: int) -> Counter[str]:
    """Which (version, cluster) of reviews answered frontend's calls."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = client.get("shop.example.com")
        if status != 200:
            seen[f"HTTP {status}"] += 1
            continue
        up = body["upstreams"][0]["body"]
        seen[f"{up['version']}@{up['cluster']}"] += 1
    return seen


def test_cross_cluster_calls_and_failover(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    lockgate("init", str(repo))
    (repo / "mesh.yaml").write_text(MESH)
    (repo / "workloads.yaml").write_text(WORKLOADS)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "two clusters")
    routes = (repo / "routes.yaml").read_text()
    assert V1 in routes
    assert lockgate("validate", str(repo), "--no-envoy").returncode == 0

    with running(repo=repo, state_dir=tmp_path / "state") as up:
        st = up.wait_converged(git(repo, "rev-parse", "HEAD"))
        assert [c["name"] for c in st["clusters"]] == ["east", "west"]
        assert all(c["eastwest"] for c in st["clusters"])
        client = Client(up.ingress(0))  # east's ingress; frontend runs in east only

        # v1 runs in both clusters: east's own instance answers (local first).
        assert answered_by(client, 30) == {"v1@east": 30}

        # v2 runs only in west: east's sidecars reach it through west's east-west gateway.
        up.wait_converged(commit_file(repo, "routes.yaml", routes.replace(V1, V2), "reviews: all to v2"), timeout=20)
        assert answered_by(client, 30) == {"v2@west": 30}
        west = next(c for c in up.status()["clusters"] if c["name"] == "west")
        ew_admin = next(p["admin"] for p in west["proxies"] if p["kind"] == "eastwest")
        passed = envoy_stats(ew_admin, "eastwest_reviews.shop_v2.downstream_cx_total")
        assert sum(passed.values()) >= 1, passed  # the connection went through the gateway...
        v2 = next(w for w in up.status()["workloads"] if w["id"] == "west/shop/reviews-v2-west-0")
        v2_admin = next(p["admin"] for p in west["proxies"] if p["id"] == v2["id"])
        handshakes = envoy_stats(v2_admin, "ssl.handshake")
        assert sum(handshakes.values()) >= 1, handshakes  # ...and TLS ended at the sidecar: mTLS end to end

        # Failover: east's v1 instance goes away, so v1 traffic moves to west's.
        up.wait_converged(commit_file(repo, "routes.yaml", routes, "reviews: back to v1"), timeout=20)
        assert answered_by(client, 20) == {"v1@east": 20}
        gone = WORKLOADS.replace("spec: {service: reviews, version: v1, replicas: 1, clusters: [east]",
                                 "spec: {service: reviews, version: v1, replicas: 0, clusters: [east]")
        assert gone != WORKLOADS
        up.wait_converged(commit_file(repo, "workloads.yaml", gone, "reviews-v1 leaves east"), timeout=20)
        assert answered_by(client, 30) == {"v1@west": 30}

        # West leaves the Mesh, its workloads with it (one commit): its gateways and Prometheus stop once
        # east's proxies route around it, and east's own v1 answers throughout.
        up.wait_converged(commit_file(repo, "workloads.yaml", WORKLOADS, "reviews-v1 back in east"), timeout=20)
        assert answered_by(client, 20) == {"v1@east": 20}
        west = next(c for c in up.status()["clusters"] if c["name"] == "west")
        west_pids = {p["pid"] for p in west["proxies"] if p["kind"] in ("ingress", "eastwest")}
        west_pids.add(west["prometheus"]["pid"])
        assert None not in west_pids and len(west_pids) == 3 and alive(west_pids) == west_pids, west
        (repo / "mesh.yaml").write_text(MESH.replace("[{name: east}, {name: west}]", "[{name: east}]"))
        (repo / "workloads.yaml").write_text("---\n".join(
            doc for doc in WORKLOADS.split("---\n") if "clusters: [west]" not in doc))
        git(repo, "commit", "-qam", "west leaves the mesh")
        dropped = git(repo, "rev-parse", "HEAD")
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + 30
        while alive(west_pids) and time.monotonic() < deadline:
            seen += answered_by(client, 5)
        assert not alive(west_pids), f"still running: {alive(west_pids)}"
        st = up.wait_converged(dropped, timeout=20)
        assert [c["name"] for c in st["clusters"]] == ["east"]
        assert not any(w["cluster"] == "west" for w in st["workloads"]), st["workloads"]
        seen += answered_by(client, 20)
        assert set(seen) == {"v1@east"} and seen.total() >= 20, seen
        client.close()
