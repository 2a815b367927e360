"""The spine, through the CLI: init -> up -> commit a split -> commit a broken file -> commit a fix.

Real processes throughout: lockgate's control plane, an Envoy per gateway and sidecar, the demo
workloads, and a Git repository changed with the git command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2e.harness import Client, alive, commit_file, git, lockgate, running, split, wait_for

pytestmark = pytest.mark.e2e

SPLIT_50_50 = "- version: v1\n          weight: 50\n        - version: v2\n          weight: 50"
SPLIT_100_0 = "- version: v1\n          weight: 100\n        - version: v2\n          weight: 0"


def test_commit_changes_what_envoy_serves(tmp_path: Path) -> None:
    repo = tmp_path / "mesh-repo"
    out = lockgate("init", str(repo))
    assert "initialised" in out.stdout
    assert lockgate("validate", str(repo)).returncode == 0
    first = git(repo, "rev-parse", "HEAD")

    with running(repo=repo, state_dir=tmp_path / "state") as up:
        st = up.wait_converged(first)
        kinds = sorted(p["kind"] for p in st["clusters"][0]["proxies"])
        assert kinds == ["eastwest", "ingress"] + ["sidecar"] * 4  # frontend x1, reviews-v1 x2, reviews-v2 x1
        assert all(p["nack"] is None and p["ackedVersion"] for p in st["clusters"][0]["proxies"])
        # Every Envoy lockgate started speaks delta xDS and defers its clusters' traffic stats (its bootstrap).
        bootstraps = [json.loads(f.read_text()) for f in (tmp_path / "state" / "envoy").glob("*.json")]
        assert len(bootstraps) == len(kinds)
        assert {b["dynamic_resources"]["ads_config"]["api_type"] for b in bootstraps} == {"DELTA_GRPC"}
        assert all(b["deferred_stat_options"]["enable_deferred_creation_stats"] for b in bootstraps)
        client = Client(up.ingress())

        # 100% v1, end to end: ingress -> frontend sidecar -> frontend -> its sidecar -> reviews sidecar.
        assert split(client, "shop.example.com", 50) == {"v1": 50}
        status, body = client.get("reviews.example.com")
        assert status == 200 and body["service"] == "reviews" and body["version"] == "v1"
        assert body["cluster"] == "east" and body["namespace"] == "shop"

        # Commit 50/50: the split follows.
        routes = (repo / "routes.yaml").read_text()
        assert SPLIT_100_0 in routes
        second = commit_file(repo, "routes.yaml", routes.replace(SPLIT_100_0, SPLIT_50_50), "reviews 50/50")
        up.wait_converged(second, timeout=10)
        seen = split(client, "shop.example.com", 400)
        assert set(seen) == {"v1", "v2"}, seen
        assert 160 <= seen["v2"] <= 240, seen  # 40-60%

        # A broken commit: validate names the file and line; status shows it; traffic is unchanged.
        bad = routes.replace(SPLIT_100_0, SPLIT_50_50.replace("weight: 50\n", "weight: 70\n", 1))
        bad = bad.replace("hosts: [reviews.example.com]", "hosts: [reviews.example.com]\n  retries: 3")
        third = commit_file(repo, "routes.yaml", bad, "oops")
        result = lockgate("validate", str(repo), check=False)
        assert result.returncode == 1
        errs = [line for line in result.stderr.splitlines() if line.startswith("routes.yaml:")]
        # Both errors at once: the schema error no longer hides the weights error of the same Route.
        assert errs == ["routes.yaml:23: spec.retries: unknown field 'retries'; allowed here: service, hosts, http",
                        "routes.yaml:26: spec.http[0].route: weights must sum to 100, got 70 + 50 = 120"], \
            result.stderr
        assert lockgate("validate", str(repo), "--rev", "HEAD~1").returncode == 0

        def failed() -> dict[str, object] | None:
            s = up.status()
            return s if s["revision"]["failed"] == third else None

        st = wait_for("the broken revision to be reported", failed, timeout=10)
        assert st["revision"]["head"] == third
        assert st["revision"]["applied"] == second
        assert any(e.startswith("routes.yaml:23:") for e in st["revision"]["lastError"])
        assert st["clusters"][0]["convergedRevision"] == second
        seen = split(client, "shop.example.com", 200)
        assert set(seen) == {"v1", "v2"} and 60 <= seen["v2"] <= 140, seen

        # A fix: back to 100% v2 this time, and it is applied.
        fourth = commit_file(repo, "routes.yaml", routes.replace(
            SPLIT_100_0, SPLIT_100_0.replace("100", "x").replace("weight: 0", "weight: 100").replace("x", "0")),
            "all to v2")
        st = up.wait_converged(fourth, timeout=10)
        assert st["revision"]["lastError"] == [] and st["revision"]["failed"] is None
        assert split(client, "shop.example.com", 50) == {"v2": 50}
        client.close()
        children = set(up.child_pids)
        assert len(children) >= 10  # 6 Envoys (2 gateways, 4 sidecars) + 4 workloads

    assert up.proc.returncode == 0
    assert alive(children) == set(), "lockgate up left processes behind"
