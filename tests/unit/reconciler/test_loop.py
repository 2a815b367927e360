"""The reconcile loop on a FakeRuntime: no processes, a real Git repository, real control-plane caches.

What the loop owns is tested here without Envoys: a valid revision is applied everywhere, an invalid one
changes nothing, a rollout tick moves the served weights, a restart resumes on the same control-plane
port with the rollout where it was, and planning a revision renders exactly what `up` pushes for it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.xds.snapshot import SECRET, Snapshot
from reconciler.loop import Reconciler, UpConfig
from reconciler.pipeline import render_planned
from reconciler.plan import plan
from reconciler.source.git import Pygit2Source, init_repo
from reconciler.state import STATUS_FILE, read_json
from rollouts.provider import Samples
from tests.fixtures.intents import TEMPLATE, peer_authentication_yaml, rollout_yaml
from tests.fixtures.routes import outbound_vhost
from tests.fixtures.runtime import FakeRuntime

USER = ("dev", "dev@example.org")
FRONTEND = "east/shop/frontend-v1-0"


class FakeProvider:
    """A Prometheus that always answers `value`, scraped every second since long ago (and is online)."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.queries: list[str] = []

    def query(self, promql: str) -> float:
        self.queries.append(promql)
        return self.value

    def samples(self, selector: str, *, seconds: float) -> Samples:
        now = time.time()
        times = tuple(float(t) for t in range(int(now - seconds - 30), int(now) + 1))
        return Samples(at=now, seconds=seconds, series={"{}": times})

    def query_range(self, promql: str, *, start: float, end: float, step: float) -> list[float]:
        self.queries.append(promql)
        return [self.value] * max(1, int((end - start) / step) + 1)

    def is_online(self) -> bool:
        return True


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    init_repo(path, template=TEMPLATE)
    return path


def commit(repo: Path, files: dict[str, str], message: str = "change") -> str:
    source = Pygit2Source.open(str(repo))
    return source.commit(files={k: v.encode() for k, v in files.items()}, message=message,
                         parent=source.head() or "", author=USER)


def reconciler(repo: Path, state: Path, runtime: FakeRuntime) -> Reconciler:
    return Reconciler(config=UpConfig(repo=str(repo), state_dir=state), source=Pygit2Source.open(str(repo)),
                      runtime=runtime, announced=True)


def reviews_weights(snap: Snapshot) -> list[tuple[str, int]]:
    vhost = outbound_vhost(snap, "reviews.shop")
    action: dict[str, Any] = next(r for r in vhost["routes"] if r["name"] == "default")["route"]
    if "weighted_clusters" in action:
        return [(c["name"].rsplit("|", 1)[1], c["weight"]) for c in action["weighted_clusters"]["clusters"]]
    return [(action["cluster"].rsplit("|", 1)[1], 100)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_valid_revision_reaches_every_proxy_and_an_invalid_one_changes_nothing(repo: Path, tmp_path: Path) -> None:
    runtime = FakeRuntime()

    async def scenario() -> None:
        rec = reconciler(repo, tmp_path / "state", runtime)
        try:
            good = rec.source.head()
            assert good is not None
            await rec.apply_revision(good)
            assert rec.applied == good and rec.failed is None
            assert len(runtime.applied) == 1 and list(runtime.clusters) == ["east"]
            plane = rec.planes["east"]
            nodes = set(plane.cache.nodes())
            assert FRONTEND in nodes and "east/ingress" in nodes and "east/eastwest" in nodes
            before = {n: dict(plane.cache.get(n).versions) for n in nodes}  # type: ignore[union-attr]
            assert reviews_weights(plane.cache.get(FRONTEND)) == [("v1", 100)]  # type: ignore[arg-type]

            bad = commit(repo, {"routes.yaml": "kind: Route\nspec: {http: [{route: [{version: v1, weight: 70}]}]}\n"})
            await rec.apply_revision(bad)
            assert rec.failed == bad and rec.applied == good
            assert rec.last_error and all(":" in e for e in rec.last_error)
            assert len(runtime.applied) == 1  # the runtime never saw the invalid revision
            assert {n: dict(plane.cache.get(n).versions) for n in nodes} == before  # type: ignore[union-attr]
            rec._write_status_now()
            st = read_json(tmp_path / "state" / STATUS_FILE)
            assert st["revision"]["failed"] == bad and st["revision"]["applied"] == good
            assert {p["kind"] for p in st["clusters"][0]["proxies"]} <= {"sidecar", "ingress", "eastwest"}
        finally:
            await rec.close()
        assert runtime.closed

    run(scenario())


def test_a_rollout_tick_moves_the_weights_that_are_served(repo: Path, tmp_path: Path) -> None:
    runtime = FakeRuntime()
    sha = commit(repo, {"rollout.yaml": rollout_yaml(steps=[10, 50, 100], interval="1s", metrics=[
        {"name": "ok", "builtin": "request-success-rate", "min": 99}])})

    async def scenario() -> None:
        rec = reconciler(repo, tmp_path / "state", runtime)
        try:
            await rec.apply_revision(sha)
            plane = rec.planes["east"]
            assert reviews_weights(plane.cache.get(FRONTEND)) == [("v1", 100)]  # type: ignore[arg-type]
            rec.rollouts.providers["fake://prometheus/east"] = FakeProvider(100.0)
            await rec.rollouts.tick()  # the run starts: the first step's weight
            await rec.settled()  # the push the controller scheduled (rendered off the loop)
            assert reviews_weights(plane.cache.get(FRONTEND)) == [("v1", 90), ("v2", 10)]  # type: ignore[arg-type]
            await asyncio.sleep(1.1)  # one interval: an analysis is due; the fake Prometheus says all is well
            await rec.rollouts.tick()
            await rec.settled()
            assert reviews_weights(plane.cache.get(FRONTEND)) == [("v1", 50), ("v2", 50)]  # type: ignore[arg-type]
            # A topology change re-renders with the rollout's weights still in place.
            runtime.set_ready("east/shop/reviews-v2-0", False)
            await rec.settled()
            assert reviews_weights(plane.cache.get(FRONTEND)) == [("v1", 50), ("v2", 50)]  # type: ignore[arg-type]
        finally:
            await rec.close()

    run(scenario())


def test_a_restart_takes_the_same_control_plane_port_and_resumes_the_rollout(repo: Path, tmp_path: Path) -> None:
    ports: dict[str, int] = {}
    sha = commit(repo, {"rollout.yaml": rollout_yaml(steps=[20, 100], interval="1s")})

    async def first() -> tuple[int, list[tuple[str, int]]]:
        rec = reconciler(repo, tmp_path / "state", FakeRuntime(ports=ports))
        try:
            await rec.apply_revision(sha)
            await rec.rollouts.tick()
            await rec.settled()
            return rec.planes["east"].port, reviews_weights(rec.planes["east"].cache.get(FRONTEND))  # type: ignore[arg-type]
        finally:
            await rec.close()

    async def second() -> tuple[int, list[tuple[str, int]]]:
        rec = reconciler(repo, tmp_path / "state", FakeRuntime(ports=ports))
        try:
            await rec.apply_revision(sha)  # before any tick: the persisted state is already in force
            return rec.planes["east"].port, reviews_weights(rec.planes["east"].cache.get(FRONTEND))  # type: ignore[arg-type]
        finally:
            await rec.close()

    port, weights = run(first())
    assert weights == [("v1", 80), ("v2", 20)]
    assert run(second()) == (port, weights)


def test_planning_a_revision_renders_what_up_pushes_for_it(repo: Path, tmp_path: Path) -> None:
    """Same snapshot versions, type by type, for every proxy: security, other clusters and rollout weights
    included (a second cluster, a STRICT namespace and a running canary are all in the revision)."""
    mesh = (repo / "mesh.yaml").read_text().replace("    - name: east\n", "    - name: east\n    - name: west\n")
    workloads = (repo / "workloads.yaml").read_text().replace("clusters: [east]", "clusters: [east, west]", 1)
    sha = commit(repo, {"mesh.yaml": mesh, "workloads.yaml": workloads,
                        "security.yaml": peer_authentication_yaml(mode="STRICT"),
                        "rollout.yaml": rollout_yaml(steps=[30, 100], interval="1s")})

    async def scenario() -> None:
        rec = reconciler(repo, tmp_path / "state", FakeRuntime())
        try:
            await rec.apply_revision(sha)
            await rec.rollouts.tick()
            await rec.settled()
            assert rec.intent is not None
            planned = render_planned(rec.intent, states=rec.rollouts.states, certs=rec.issuer, revision=sha)
            assert set(planned) == {"east", "west"}
            for name, result in planned.items():
                plane = rec.planes[name]
                assert result.error is None
                assert set(result.snapshots) == set(plane.cache.nodes())
                for node, snap in result.snapshots.items():
                    pushed = plane.cache.get(node)
                    assert pushed is not None and dict(snap.versions) == dict(pushed.versions), node
            east = rec.planes["east"].cache.get(FRONTEND)
            assert east is not None and reviews_weights(east) == [("v1", 70), ("v2", 30)]
            assert east.version(SECRET)  # certificates are part of what is compared
            # And the plan of that revision against itself is empty: nothing differs but the clock.
            assert all(not p.changes for p in plan(old=rec.intent, new=rec.intent, states=rec.rollouts.states))
        finally:
            await rec.close()

    run(scenario())


def _plan_worktree(repo: Path, tmp_path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "reconciler.cli", "plan", "--repo", str(repo), "--worktree",
                          "--from", "HEAD", "--state-dir", str(tmp_path / "nostate")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_plan_shows_a_change_of_mtls_mode(repo: Path, tmp_path: Path) -> None:
    """Found as a new user: switching a namespace STRICT -> PERMISSIVE printed "no changes"."""
    commit(repo, {"security.yaml": peer_authentication_yaml(mode="STRICT")})
    (repo / "security.yaml").write_text(peer_authentication_yaml(mode="PERMISSIVE"))
    out = _plan_worktree(repo, tmp_path)
    assert "no changes" not in out, out
    assert "listener inbound" in out, out


def test_plan_shows_a_changed_authorization_path(repo: Path, tmp_path: Path) -> None:
    policy = ("apiVersion: lockgate.io/v1alpha1\nkind: AuthorizationPolicy\n"
              "metadata: {name: reviews, namespace: shop}\n"
              "spec:\n  selector: {service: reviews}\n  action: ALLOW\n  rules:\n"
              "    - from: [{principals: [example.org/ns/shop/sa/frontend]}]\n      to: [{paths: [/reviews/*]}]\n")
    commit(repo, {"authz.yaml": policy})
    (repo / "authz.yaml").write_text(policy.replace("/reviews/*", "/ratings/*"))
    out = _plan_worktree(repo, tmp_path)
    assert "no changes" not in out, out
    assert "/reviews/*" in out and "/ratings/*" in out, out  # the rule, before and after, in words
