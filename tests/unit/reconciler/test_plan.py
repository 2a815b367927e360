"""plan: readable per-cluster changes between two revisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mesh.intent import Intent
from reconciler.load import load, read_worktree
from reconciler.plan import plan, render_text, to_json

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"


def intent(**replace: tuple[str, str]) -> Intent:
    files = read_worktree(TEMPLATE)
    for name, (old, new) in replace.items():
        text = files[f"{name}.yaml"].decode()
        assert old in text
        files[f"{name}.yaml"] = text.replace(old, new).encode()
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems
    return loaded.intent


SPLIT = ("weight: 100\n        - version: v2\n          weight: 0",
         "weight: 50\n        - version: v2\n          weight: 50")


def test_same_revision_plans_nothing() -> None:
    assert [p.changes for p in plan(old=intent(), new=intent())] == [()]


def test_weight_change_is_one_line_per_route_config() -> None:
    [east] = plan(old=intent(), new=intent(routes=SPLIT))
    assert [(c.op, c.kind, c.name, c.detail) for c in east.changes] == [
        ("change", "route", "ingress > reviews.shop > default", "v1 100%  ->  v1 50%, v2 50%"),
        ("change", "route", "outbound > reviews.shop > default", "v1 100%  ->  v1 50%, v2 50%"),
    ]
    assert east.changes[0].proxies == ("east/ingress",)
    assert len(east.changes[1].proxies) == 4  # every sidecar routes to reviews


def test_new_replica_adds_a_proxy_and_endpoints_without_renumbering_others() -> None:
    [east] = plan(old=intent(), new=intent(workloads=("replicas: 2", "replicas: 3")))
    lines = {(c.op, c.kind, c.name, c.detail) for c in east.changes}
    assert lines == {
        ("add", "proxy", "east/shop/reviews-v1-2", "new proxy"),
        ("change", "endpoints", "outbound|reviews.shop|v1", "2 -> 3 instance(s)"),
        # what the other clusters reach through this cluster's east-west gateway
        ("change", "endpoints", "eastwest|reviews.shop|any", "3 -> 4 instance(s)"),
        ("change", "endpoints", "eastwest|reviews.shop|v1", "2 -> 3 instance(s)"),
    }


def test_first_apply_adds_everything_and_json_is_the_contract() -> None:
    plans = plan(old=None, new=intent())
    assert {c.name for c in plans[0].changes} == {
        "east/ingress", "east/eastwest", "east/shop/frontend-v1-0", "east/shop/reviews-v1-0", "east/shop/reviews-v1-1",
        "east/shop/reviews-v2-0"}
    doc = to_json(plans, old=None, new="abc")
    assert doc["from"] is None and doc["to"] == "abc"
    assert set(doc["clusters"][0]["changes"][0]) == {"op", "kind", "name", "detail", "proxies"}
    assert "cluster east: 6 change(s)" in render_text(plans, old=None, new="abc")


def test_new_service_route_and_cluster(tmp_path: Path) -> None:
    extra = """
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: ratings, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
  versions: [v1]
"""
    new = intent(services=("versions: [v1, v2]\n", "versions: [v1, v2]\n" + extra))
    [east] = plan(old=intent(), new=new)
    kinds = {(c.op, c.kind, c.name) for c in east.changes}
    assert ("add", "cluster", "outbound|ratings.shop|v1") in kinds
    assert ("add", "endpoints", "outbound|ratings.shop") in kinds
    assert ("add", "route", "outbound > ratings.shop") in kinds
    # The ingress exposes no host for ratings: its route config is unchanged.
    assert not any(c.kind == "route" and c.name.startswith("ingress") for c in east.changes)


def test_cli_plan_between_commits(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], capture_output=True, text=True,
                              timeout=60)

    repo = tmp_path / "repo"
    assert run("init", str(repo)).returncode == 0
    routes = repo / "routes.yaml"
    routes.write_text(routes.read_text().replace(*SPLIT))
    out = run("plan", "--repo", str(repo), "--worktree", "--from", "HEAD", "--json")
    assert out.returncode == 0, out.stderr
    changes = json.loads(out.stdout)["clusters"][0]["changes"]
    assert {c["detail"] for c in changes} == {"v1 100%  ->  v1 50%, v2 50%"}
    routes.write_text(routes.read_text().replace("weight: 50\n", "weight: 60\n", 1))
    out = run("plan", "--repo", str(repo), "--worktree", "--from", "HEAD")
    assert out.returncode == 1
    assert "routes.yaml:25: spec.http[0].route: weights must sum to 100, got 60 + 50 = 110" in out.stderr
