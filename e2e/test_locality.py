"""Locality load balancing on real Envoys, three clusters in three regions.

Outlier detection ejecting a cluster's own failing instance moves its callers to the next locality, and
the `failover` rule decides which one that is (Envoy's priorities do the moving; lockgate only orders
them). Then `distribute` shares the load by weights between the two other clusters and none at home.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from e2e.harness import Client, commit_file, envoy_stats, git, lockgate, proxy_admin, running

pytestmark = pytest.mark.e2e

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  trustDomain: example.org
  clusters:
    - {name: east, locality: us/us-east-1}
    - {name: west, locality: eu/eu-west-1}
    - {name: central, locality: ap/ap-south-1}
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
spec:
  service: reviews
  version: v1
  clusters: [east]
  command: [lockgate, demo-app, --fail-rate, "1"]
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: reviews-v1-elsewhere, namespace: shop}
spec: {service: reviews, version: v1, clusters: [west, central], command: [lockgate, demo-app]}
"""

FAILOVER = """\
apiVersion: lockgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
  loadBalancer:
    localityLbSetting:
      failover: [{from: us, to: central}]
"""

DISTRIBUTE = """\
apiVersion: lockgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  loadBalancer:
    localityLbSetting:
      distribute: [{from: us/*, to: {west: 50, central: 50}}]
"""


def answers(client: Client, n: int) -> list[str]:
    """Who answered each of frontend's calls to reviews: `200 v1@west`, `500 v1@east` (a failing reviews
    instance, as frontend saw it), or the edge's status when there is no upstream answer."""
    out = []
    for _ in range(n):
        status, body = client.get("shop.example.com")
        try:
            up = body["upstreams"][0]
            out.append(f"{up['status']} {up['body']['version']}@{up['body']['cluster']}")
        except (KeyError, IndexError, TypeError):
            out.append(f"HTTP {status}")
    return out


def test_ejected_local_instances_fail_over_by_rule_then_distribute_by_weight(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    lockgate("init", str(repo))
    (repo / "mesh.yaml").write_text(MESH)
    (repo / "workloads.yaml").write_text(WORKLOADS)
    (repo / "policy.yaml").write_text(FAILOVER)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "three regions; reviews fails in east")
    assert lockgate("validate", str(repo), "--no-envoy").returncode == 0

    # No rollout here: an unreachable --prometheus-url spares three Prometheus processes.
    with running(repo=repo, state_dir=tmp_path / "state", extra=("--prometheus-url", "http://127.0.0.1:9")) as up:
        st = up.wait_converged(git(repo, "rev-parse", "HEAD"), timeout=90)
        east_reviews = next(w for w in st["workloads"] if w["id"] == "east/shop/reviews-v1-east-0")
        assert east_reviews["ready"]  # in the endpoints: only outlier detection can take it out
        client = Client(up.ingress(0))  # east's ingress; frontend runs in east only

        # Local first: east's own instance takes the first calls and fails them; two in a row eject it, and
        # Envoy applies that health change within its update merge window (1s): until then east still answers.
        failed: list[str] = []
        deadline = time.monotonic() + 10
        while (a := answers(client, 1)[0]).startswith("500 ") and time.monotonic() < deadline:
            failed.append(a)
            time.sleep(0.05)
        assert len(failed) >= 2 and set(failed) == {"500 v1@east"}, failed
        # Then every call goes to the region the rule names, never to the other one (without the rule west
        # and central would share the load: both are another region).
        seen = Counter([a, *answers(client, 40)])
        assert seen == {"200 v1@central": 41}, (failed, seen)
        frontend = proxy_admin(up.status(), service="frontend")
        ejected = envoy_stats(frontend, "cluster.outbound|reviews.shop|v1.outlier_detection.ejections_enforced_total")
        assert sum(ejected.values()) >= 1, ejected

        # distribute: half each to west and central, nothing to east's own (failing) instance.
        up.wait_converged(commit_file(repo, "policy.yaml", DISTRIBUTE, "reviews: distribute"), timeout=30)
        shares = Counter(answers(client, 80))
        assert set(shares) == {"200 v1@west", "200 v1@central"}, shares
        assert min(shares.values()) >= 20, shares  # 50/50 by weight: far from one-sided
        client.close()
