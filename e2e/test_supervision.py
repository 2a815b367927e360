"""Supervision: crashed workloads and Envoys come back, and nothing outlives lockgate, even SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from e2e.harness import Client, Up, alive, commit_file, git, lockgate, running, split, wait_for

pytestmark = pytest.mark.e2e


def test_crashed_workload_and_sidecar_are_restarted_and_reported(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    lockgate("init", str(repo))
    with running(repo=repo, state_dir=tmp_path / "state") as up:
        st = up.wait_converged(git(repo, "rev-parse", "HEAD"))
        client = Client(up.ingress())
        assert split(client, "shop.example.com", 20) == {"v1": 20}

        # Kill the only reviews-v2 workload: it is restarted, and its endpoint comes back.
        v2 = next(w for w in st["workloads"] if w["version"] == "v2")
        os.kill(v2["pid"], signal.SIGKILL)

        def restarted() -> dict[str, object] | None:
            s = up.status()
            w = next(w for w in s["workloads"] if w["id"] == v2["id"])
            return w if w["restarts"] >= 1 and w["ready"] and w["pid"] != v2["pid"] else None

        wait_for("the workload to be restarted", restarted, timeout=20)

        # Kill a sidecar Envoy: status reports it, and it is restarted and re-ACKs the applied revision.
        proxies = up.status()["clusters"][0]["proxies"]
        side = next(p for p in proxies if p["id"] == v2["id"])
        os.kill(side["pid"], signal.SIGKILL)

        def envoy_back() -> dict[str, object] | None:
            s = up.status()
            p = next(p for p in s["clusters"][0]["proxies"] if p["id"] == v2["id"])
            ok = p["restarts"] >= 1 and p["state"] == "running" and p["ackedRevision"] == s["revision"]["applied"]
            return p if ok and p["connected"] else None

        wait_for("the sidecar to be restarted and re-configured", envoy_back, timeout=20)
        up.wait_converged(up.status()["revision"]["applied"], timeout=20)

        # Traffic to v2 works again end to end (commit routes everything to v2 via the reviews host).
        routes = (repo / "routes.yaml").read_text()
        routes = routes.replace("weight: 100\n        - version: v2\n          weight: 0",
                                "weight: 0\n        - version: v2\n          weight: 100")
        up.wait_converged(commit_file(repo, "routes.yaml", routes, "all to v2"), timeout=10)
        seen = split(client, "shop.example.com", 40)
        assert seen == {"v2": 40}, seen
        client.close()


def test_sigkill_of_lockgate_leaves_traffic_flowing_and_a_restart_adopts_it(tmp_path: Path) -> None:
    """What serves traffic outlives a crash of lockgate; the next `lockgate up` takes the very same
    processes over (no restart, no dropped request), and a graceful stop then ends them all."""
    repo = tmp_path / "repo"
    lockgate("init", str(repo))
    head = git(repo, "rev-parse", "HEAD")
    first = Up(repo=repo, state_dir=tmp_path / "state")
    second: Up | None = None
    try:
        st = first.wait_converged(head)
        children = set(first.child_pids)
        assert len(children) == 10  # 6 Envoys + 4 workloads
        client = Client(first.ingress())
        assert split(client, "shop.example.com", 20) == {"v1": 20}

        first.proc.kill()  # SIGKILL: no chance to clean up
        first.proc.wait()
        assert alive(children) == children  # nothing that serves traffic went with it...
        assert split(client, "shop.example.com", 50) == {"v1": 50}  # ...and it still serves

        second = Up(repo=repo, state_dir=tmp_path / "state")
        st2 = second.wait_converged(head)
        assert set(second.child_pids) == children  # adopted, not restarted
        assert all(p["restarts"] == 0 for c in st2["clusters"] for p in c["proxies"])
        assert st2["clusters"][0]["controlPlane"] == st["clusters"][0]["controlPlane"]
        assert split(client, "shop.example.com", 50) == {"v1": 50}
        # The adopted mesh follows new commits like any other.
        routes = (repo / "routes.yaml").read_text().replace(
            "weight: 100\n        - version: v2\n          weight: 0",
            "weight: 0\n        - version: v2\n          weight: 100")
        second.wait_converged(commit_file(repo, "routes.yaml", routes, "all to v2"), timeout=15)
        assert split(client, "shop.example.com", 30) == {"v2": 30}
        client.close()
        second.stop()
        assert second.proc.returncode == 0
        assert alive(children) == set()  # the graceful stop ended the adopted processes too
    finally:
        if second is not None:
            second.stop()
        first.stop()
