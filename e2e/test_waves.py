"""Rollout waves across three clusters on real processes: one `lockgate up` for the file (three control
planes, three Prometheus, an ingress per cluster with its own steady load), driven through the CLI.

In order: (a) a healthy canary goes wave by wave, and while the first wave runs the other clusters'
ingresses serve 100% stable; (b) a canary failing only in a wave-2 cluster rolls back every cluster,
the wave-1 cluster that already served it at 100% included, with one rollback commit (the figures for
the closing note are printed and written next to the state dir); (c) `approval: manual` holds the next
wave until `lockgate rollout approve`; (d) `lockgate up` SIGKILLed mid-wave resumes in that wave at that
step once restarted (it adopts the running Envoys).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Up, alive, commit_file, git, lockgate, wait_for

pytestmark = pytest.mark.e2e

HOST = "reviews.example.com"
INTERVAL = 2.0
CLUSTERS = ("east", "west", "central")
MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}, {name: west}, {name: central}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{name: http, port: 9080}], versions: [v1, v2, v3]}
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  hosts: [reviews.example.com]
  http:
    - name: default          # weights come from the Rollout, per cluster
"""
FAILING_IN = "west"
"""Where v3 is a bad build (a wave-2 cluster): everywhere else it is healthy."""
WORKLOADS = "".join(f"""---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: reviews-{v}-{c}, namespace: shop}}
spec: {{service: reviews, version: {v}, clusters: [{c}], command: [lockgate, demo-app], env: {{FAIL_RATE: "{f}"}}}}
""" for v in ("v1", "v2", "v3") for c in CLUSTERS for f in (0.5 if (v, c) == ("v3", FAILING_IN) else 0,))
WAVES = "  waves:\n    - clusters: [east]\n    - name: rest\n      clusters: [west, central]\n"
GATED = WAVES + "      approval: manual\n"


def rollout(*, stable: str, canary: str | None, waves: str = WAVES, steps: str = "[50, 100]") -> str:
    return f"""\
# The reviews rollout, wave by wave: east first, then west and central.
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata: {{name: reviews, namespace: shop}}
spec:
  service: reviews
  stable: {stable}
{f"  canary: {canary}" + chr(10) if canary else ""}  steps: {steps}
  interval: {INTERVAL:g}s
{waves}  analysis:
    failureThreshold: 1
    minRequests: 10
    noData: hold
    metrics:
      - {{name: success-rate, builtin: request-success-rate, min: 99}}
"""


@dataclass
class Load:
    """A steady keep-alive client at one cluster's ingress; every answer recorded (time, status, version)."""

    address: tuple[str, int]
    records: list[tuple[float, int, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"load {self.address}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=5)
        while not self.stop.is_set():
            t = time.time()
            try:
                conn.request("GET", "/", headers={"Host": HOST})
                resp = conn.getresponse()
                body = resp.read()
                self.records.append((t, resp.status, json.loads(body).get("version") if resp.status == 200 else None))
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection(*self.address, timeout=5)
                self.records.append((t, 0, None))
                time.sleep(0.05)
            time.sleep(0.008)
        conn.close()

    def between(self, t0: float, t1: float) -> list[tuple[float, int, str | None]]:
        return [r for r in list(self.records) if t0 <= r[0] <= t1]

    def versions(self, t0: float, t1: float) -> set[str | None]:
        return {v for _, _, v in self.between(t0, t1)}

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)


@dataclass
class Fleet:
    tmp: Path
    repo: Path
    state: Path
    up: Up
    loads: dict[str, Load] = field(default_factory=dict)

    def rollout(self) -> dict[str, Any]:
        out = lockgate("rollout", "status", "reviews", "--json", "--state-dir", str(self.state))
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def commit_rollout(self, text: str, message: str) -> str:
        return commit_file(self.repo, "rollout.yaml", text, message)

    def decisions(self, run: str) -> list[dict[str, Any]]:
        path = self.state / "rollouts" / "decisions.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [d for d in map(json.loads, lines) if d["canaryRevision"] == run]

    def cluster(self, name: str) -> dict[str, Any]:
        return next(c for c in self.up.status()["clusters"] if c["name"] == name)

    def ingress(self, name: str) -> tuple[str, int]:
        host, port = self.cluster(name)["ingress"].rsplit(":", 1)
        return host, int(port)

    def prometheus_pids(self) -> set[int]:
        pids = {c["prometheus"]["pid"] for c in self.up.status()["clusters"] if c["prometheus"].get("pid")}
        self.up.child_pids |= pids
        return pids

    def start_loads(self) -> None:
        for c in CLUSTERS:
            self.loads[c] = Load(self.ingress(c))
            self.loads[c].start()

    def close_loads(self) -> None:
        for load in self.loads.values():
            load.close()


def _scraping_everything(fleet: Fleet) -> bool:
    """Every cluster's Prometheus has every proxy of its cluster up (new targets take a few seconds)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for c in fleet.up.status()["clusters"]:
        with opener.open(f"{c['prometheus']['url']}/api/v1/targets", timeout=2) as resp:
            up = [t for t in json.load(resp)["data"]["activeTargets"] if t["health"] == "up"]
        if len(up) < len(c["proxies"]):
            return False
    return True


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("waves")
    repo, state = tmp / "repo", tmp / "state"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.yaml").write_text(MESH + WORKLOADS)
    (repo / "rollout.yaml").write_text(rollout(stable="v1", canary=None))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "reviews v1, v2, v3 in three clusters, with a Rollout in waves")
    f = Fleet(tmp=tmp, repo=repo, state=state, up=Up(repo=repo, state_dir=state))
    try:
        try:
            f.up.wait_converged(git(repo, "rev-parse", "HEAD"), timeout=90)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- lockgate up log ---\n{f.up.log.read_text()[-4000:]}") from None
        f.prometheus_pids()
        f.start_loads()
        wait_for("every Prometheus scraping every proxy", lambda: _scraping_everything(f), timeout=40, interval=0.5)
        yield f
    finally:
        f.close_loads()
        children = set(f.up.child_pids)
        f.up.stop()
        assert not alive(children), "processes left behind"


def _watch(fleet: Fleet, until: Callable[[dict[str, Any]], Any], timeout: float) -> list[dict[str, Any]]:
    """Poll `rollout status --json` until `until(status)`; every distinct (phase, wave, weights) seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = fleet.rollout()
        key = (s["phase"], s["wave"], json.dumps(s["weights"], sort_keys=True), s["waitingForApproval"])
        if not seen or key != (seen[-1]["phase"], seen[-1]["wave"], json.dumps(seen[-1]["weights"], sort_keys=True),
                               seen[-1]["waitingForApproval"]):
            seen.append(s)
        if until(s):
            return seen
        time.sleep(0.1)
    raise TimeoutError(f"rollout did not get there in {timeout:.0f}s; seen "
                       f"{[(s['phase'], s['wave'], s['weights']) for s in seen]}\n{fleet.up.log.read_text()[-3000:]}")


def _written_back(phase: str, before: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["phase"] == phase and s.get("writeBack") not in (None, before.get("writeBack"))


def test_a_healthy_canary_goes_wave_by_wave(fleet: Fleet) -> None:
    before = fleet.rollout()
    run = fleet.commit_rollout(rollout(stable="v1", canary="v2"), "reviews: canary v2, east first")
    _watch(fleet, _written_back("promoted", before), timeout=60)
    decisions = fleet.decisions(run)
    progress = [(d["wave"], d["weights"]) for d in decisions if d["action"] in ("start", "step", "wave")]
    assert progress == [
        (0, {"east": 50}), (0, {"east": 100}),
        (1, {"east": 100, "west": 50, "central": 50}), (1, {"east": 100, "west": 100, "central": 100}),
    ], progress
    assert [d["action"] for d in decisions if d["action"] != "hold"] == ["start", "step", "wave", "step", "promote"]
    first_wave = [d for d in decisions if d["wave"] == 0 and d["checks"]]
    assert first_wave and all({c["cluster"] for c in d["checks"]} == {"east"} for d in first_wave), first_wave
    second_wave = [d for d in decisions if d["checks"] and d["action"] in ("step", "promote") and d["wave"] == 1]
    assert second_wave and all({c["cluster"] for c in d["checks"]} == {"west", "central"} for d in second_wave)

    # While the first wave ran, the later wave's ingresses served 100% stable; east served both.
    t_start = next(d["at"] for d in decisions if d["action"] == "start")
    t_wave = next(d["at"] for d in decisions if d["action"] == "wave")
    for c in ("west", "central"):
        assert fleet.loads[c].versions(t_start, t_wave - 0.05) == {"v1"}, c
    assert fleet.loads["east"].versions(t_start + 0.3, t_wave) == {"v1", "v2"}

    log = git(fleet.repo, "log", "--format=%an|%s", f"{run}..HEAD").splitlines()
    assert log == ["lockgate|rollout shop/reviews: promote v2 (stable v1 -> v2)"], log
    t = time.time()
    wait_for("every cluster all on v2", lambda: all(
        fleet.loads[c].versions(t + 0.3, time.time()) == {"v2"} for c in CLUSTERS), timeout=10)

    history = json.loads(lockgate("history", "--json", "--state-dir", str(fleet.state)).stdout)
    actions = [e["action"] for e in history if e["type"] == "decision" and e["sha"] == run]
    assert actions == ["promote", "step", "wave", "step", "start"], actions
    wave_note = next(e for e in history if e["type"] == "decision" and e["sha"] == run and e["action"] == "wave")
    assert "waves[0] (east) passed" in " ".join(wave_note["reasons"]), wave_note


def test_a_failure_in_a_wave_two_cluster_rolls_back_every_cluster(fleet: Fleet) -> None:
    before = fleet.rollout()
    run = fleet.commit_rollout(rollout(stable="v2", canary="v3"), f"reviews: canary v3 (fails in {FAILING_IN})")
    _watch(fleet, _written_back("rolled-back", before), timeout=60)
    decisions = fleet.decisions(run)
    rollback = next(d for d in decisions if d["action"] == "rollback")
    assert [d["action"] for d in decisions if d["action"] != "hold"] == ["start", "step", "wave", "rollback"], decisions
    assert rollback["wave"] == 1 and rollback["weights"]["east"] == 100, rollback
    failed = [c for c in rollback["checks"] if c["result"] == "fail"]
    assert [c["cluster"] for c in failed] == [FAILING_IN] and failed[0]["value"] < 99, rollback["checks"]
    why = " ".join(rollback["reasons"])
    assert f"success-rate@{FAILING_IN}" in why and "fleet abort in waves[1] rest (west, central)" in why, why

    # Every cluster back on v2, east (which served v3 at 100%) included.
    wait_for("every cluster on v2 again", lambda: all(
        fleet.loads[c].versions(rollback["at"] + 0.5, time.time()) == {"v2"} for c in CLUSTERS), timeout=10)
    time.sleep(0.5)
    t_start = next(d["at"] for d in decisions if d["action"] == "start")
    # failureThreshold 1: the rollback decision is the failed analysis itself (taken as its queries return)
    figures: dict[str, Any] = {"canaryWeightInWave2": 50, "failRateIn" + FAILING_IN: 0.5}
    last_canary = {}
    for c in CLUSTERS:
        run_records = fleet.loads[c].between(t_start, time.time())
        bad = [t for t, status, v in run_records if v == "v3" or status >= 500]
        last_canary[c] = max(bad) if bad else None
        during = fleet.loads[c].between(t_start, rollback["at"])
        errors = sum(1 for _, status, _ in during if status >= 500)
        figures[c] = {"requests": len(during), "errors": errors,
                      "errorExposure": round(errors / len(during), 4) if during else None,
                      "v3Answers": sum(1 for _, _, v in during if v == "v3"),
                      "lastCanaryAnswerAfterDecision": None if last_canary[c] is None
                      else round(last_canary[c] - rollback["at"], 3)}
        assert all(status in (200, 500) for _, status, _ in run_records), (c, "requests failed for other reasons")
    stable_everywhere = max(t for t in last_canary.values() if t is not None)
    figures["failedAnalysisToStableEverywhere"] = round(stable_everywhere - rollback["at"], 3)
    (fleet.tmp / "waves-rollback-figures.json").write_text(json.dumps(figures, indent=1))
    print("fleet abort figures:", json.dumps(figures))
    assert stable_everywhere - rollback["at"] < 1.0, figures
    assert figures["east"]["errors"] == 0 and figures["central"]["errors"] == 0, figures
    assert 0 < figures[FAILING_IN]["errorExposure"] < 0.25, figures  # below 50% canary x FAIL_RATE 0.5

    log = git(fleet.repo, "log", "--format=%an|%s", f"{run}..HEAD").splitlines()
    assert log == ["lockgate|rollout shop/reviews: roll back v3 in every cluster (100% to v2) in waves[1] rest "
                   f"(west, central), failed at {FAILING_IN}"], log
    body = git(fleet.repo, "log", "-1", "--format=%B")
    assert f"success-rate@{FAILING_IN}:" in body and "Lockgate-Wave: waves[1] rest (west, central)" in body, body
    assert "canary: v2" in git(fleet.repo, "show", "HEAD:rollout.yaml")


def test_manual_approval_holds_the_next_wave_until_approved(fleet: Fleet) -> None:
    # Four steps: the next test kills lockgate while the second wave still has steps to go, on a slow machine too.
    run = fleet.commit_rollout(rollout(stable="v2", canary="v1", waves=GATED, steps="[25, 50, 75, 100]"),
                               "reviews: canary v1, rest gated")
    waiting = _watch(fleet, lambda s: s["canaryRevision"] == run and s["waitingForApproval"], timeout=30)[-1]
    assert waiting["wave"] == 1 and waiting["weights"] == {"east": 100, "west": 0, "central": 0}, waiting
    assert waiting["waves"][1]["state"] == "waiting-for-approval" and waiting["waves"][1]["waitingForApproval"]
    text = lockgate("rollout", "status", "reviews", "--state-dir", str(fleet.state)).stdout
    assert "waiting-for-approval (lockgate rollout approve reviews)" in text, text
    t_wait = time.time()
    time.sleep(3 * INTERVAL)  # three analyses' worth: nothing moves by itself
    held = fleet.rollout()
    assert held["waitingForApproval"] and held["weights"] == waiting["weights"], held
    for c in ("west", "central"):
        assert fleet.loads[c].versions(t_wait, time.time()) == {"v2"}, c
    assert fleet.loads["east"].versions(t_wait, time.time()) == {"v1"}

    out = lockgate("rollout", "approve", "reviews", "--state-dir", str(fleet.state))
    assert out.stdout.startswith("rollout shop/reviews: approve: waves[1] rest (west, central) approved by command"), \
        out.stdout
    s = fleet.rollout()
    assert not s["waitingForApproval"] and s["weights"] == {"east": 100, "west": 25, "central": 25}, s
    t = time.time()
    wait_for("west serving the canary's share", lambda: fleet.loads["west"].versions(t, time.time()) == {"v1", "v2"},
             timeout=10)
    again = lockgate("rollout", "approve", "reviews", "--state-dir", str(fleet.state), check=False)
    assert again.returncode == 1 and "approve ignored: no wave waits for approval" in again.stdout, again


def test_a_sigkilled_lockgate_resumes_in_the_same_wave_at_the_same_step(fleet: Fleet) -> None:
    running = fleet.rollout()
    assert running["phase"] == "progressing" and running["wave"] == 1, running  # (c) left the second wave running
    proms = fleet.prometheus_pids()
    children = set(fleet.up.child_pids)
    fleet.up.proc.kill()
    fleet.up.proc.wait()
    before = json.loads((fleet.state / "rollouts" / "shop.reviews.json").read_text())["state"]
    assert before["phase"] == "progressing" and before["wave"] == 1, before
    wait_for("prometheus gone with lockgate", lambda: not alive(proms), timeout=15)
    assert alive(children - proms) == children - proms  # the data plane outlives lockgate

    fleet.up.forget()
    pids = fleet.up.child_pids
    fleet.up = Up(repo=fleet.repo, state_dir=fleet.state)
    fleet.up.child_pids |= pids
    fleet.up.wait_converged(git(fleet.repo, "rev-parse", "HEAD"), timeout=60)
    fleet.prometheus_pids()
    resumed = fleet.rollout()
    assert (resumed["canaryRevision"], resumed["startedAt"]) == (before["canaryRevision"], before["startedAt"])
    assert resumed["wave"] == 1 and resumed["phase"] == "progressing", resumed
    assert resumed["step"] - 1 >= before["step"] and resumed["weights"]["east"] == 100, (before, resumed)
    if resumed["step"] - 1 == before["step"]:  # no analysis since the restart (Prometheus refills its window)
        assert resumed["weights"] == before["weights"], (before, resumed)
    assert not resumed["waitingForApproval"]  # the approval given before the kill still stands
    t = time.time()
    west = {"v1"} if resumed["weights"]["west"] == 100 else {"v1", "v2"}
    wait_for("east all canary, west at its step", lambda: fleet.loads["east"].versions(t, time.time()) == {"v1"}
             and fleet.loads["west"].versions(t, time.time()) == west, timeout=10)

    before_end = fleet.rollout()
    seen = _watch(fleet, _written_back("promoted", before_end), timeout=60)
    assert all(s["wave"] == 1 for s in seen if s["phase"] == "progressing"), seen  # never back to the first wave
    log = git(fleet.repo, "log", "-1", "--format=%an|%s")
    assert log == "lockgate|rollout shop/reviews: promote v1 (stable v2 -> v1)", log
    with contextlib.suppress(Exception):
        fleet.prometheus_pids()
