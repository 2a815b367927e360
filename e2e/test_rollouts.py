"""Progressive delivery on real processes: Envoys, demo apps, Prometheus, `lockgate up`, `git commit`.

One mesh for the whole file (setup is the expensive part), driven through the CLI, with a steady load
at the ingress recorded request by request. Scenarios, in order:
(a) a healthy canary promoted through every step, the promotion committed to Git;
(b) a canary failing 30% of requests rolled back within two intervals of its first analysis, with the
    share of failed requests at the ingress below the canary's weight;
(c) A/B: only requests with the header reach the canary; `lockgate rollout abort` ends it;
(d) Prometheus stopped (SIGSTOP) mid-rollout: the rollout holds and never promotes;
(e) `lockgate up` SIGKILLed mid-rollout: restarted, it resumes at the same step;
(f) session affinity at a 20% canary: a client that got the canary's cookie stays on the canary, one
    without it sees the split; after the run the cookie routes nowhere special;
(g) mirror to the canary that fails 30%: it is judged on the copies and rolled back, and no client ever
    got an answer from it;
(h) blue/green: the canary previewed through a header while every other request stays on the stable,
    then all traffic switched at once after its analyses passed.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Up, alive, commit_file, git, lockgate, wait_for

pytestmark = pytest.mark.e2e

HOST = "reviews.example.com"
INTERVAL = 3.0
MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
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
    - name: default          # weights come from the Rollout
"""
WORKLOADS = "".join(f"""---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: reviews-{v}, namespace: shop}}
spec: {{service: reviews, version: {v}, clusters: [east], command: [lockgate, demo-app], env: {{FAIL_RATE: "{f}"}}}}
""" for v, f in (("v1", 0), ("v2", 0), ("v3", 0.3)))


def rollout(*, stable: str, canary: str | None, strategy: str = "canary", steps: str = "[20, 50, 100]",
            extra: str = "") -> str:
    return f"""\
# The reviews rollout: commit a new `canary` and lockgate takes it from there.
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata:
  name: reviews
  namespace: shop
spec:
  service: reviews
  stable: {stable}
{f"  canary: {canary}" + chr(10) if canary else ""}  strategy: {strategy}
  steps: {steps}
  interval: {INTERVAL:g}s
{extra}  analysis:
    failureThreshold: 2
    minRequests: 20
    noData: hold
    metrics:
      - {{name: success-rate, builtin: request-success-rate, min: 99}}
      - {{name: latency, builtin: request-duration-p99, max: 500, noData: pass}}
"""


@dataclass
class Load:
    """A steady keep-alive client at the ingress; every request is recorded (time, status, version)."""

    address: tuple[str, int]
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every request besides the Host (a preview header, say)."""
    records: list[tuple[float, int, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=5)
        while not self.stop.is_set():
            t = time.time()
            try:
                conn.request("GET", "/", headers={"Host": HOST, **self.headers})
                resp = conn.getresponse()
                body = resp.read()
                version = json.loads(body).get("version") if resp.status == 200 else None
                self.records.append((t, resp.status, version))
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection(*self.address, timeout=5)
                self.records.append((t, 0, None))
                time.sleep(0.05)
            time.sleep(0.004)
        conn.close()

    def between(self, t0: float, t1: float) -> list[tuple[float, int, str | None]]:
        return [r for r in list(self.records) if t0 <= r[0] <= t1]

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)


@dataclass
class Mesh:
    tmp: Path
    repo: Path
    state: Path
    up: Up
    load: Load

    def restart(self) -> None:
        self.up.forget()  # already dead; its Envoys and workloads live on, for the new one to adopt
        pids = self.up.child_pids
        self.up = Up(repo=self.repo, state_dir=self.state)
        self.up.child_pids |= pids

    def rollout(self) -> dict[str, Any]:
        out = lockgate("rollout", "status", "reviews", "--json", "--state-dir", str(self.state))
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def commit_rollout(self, text: str, message: str) -> str:
        return commit_file(self.repo, "rollout.yaml", text, message)

    def decisions(self, since: float = 0.0) -> list[dict[str, Any]]:
        path = self.state / "rollouts" / "decisions.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [d for d in map(json.loads, lines) if d["at"] >= since]

    def prometheus_pid(self) -> int:
        pid: int = self.up.status()["clusters"][0]["prometheus"]["pid"]
        self.up.child_pids.add(pid)
        return pid


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("rollouts")
    repo, state = tmp / "repo", tmp / "state"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.yaml").write_text(MESH + WORKLOADS)
    (repo / "rollout.yaml").write_text(rollout(stable="v1", canary=None))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "reviews on v1, with a Rollout")
    up = Up(repo=repo, state_dir=state)
    m = Mesh(tmp=tmp, repo=repo, state=state, up=up, load=Load(("", 0)))
    try:
        try:
            up.wait_converged(git(repo, "rev-parse", "HEAD"))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- lockgate up log ---\n{up.log.read_text()[-4000:]}\n--- status ---\n"
                               f"{json.dumps(up.status(), indent=1)[-4000:]}") from None
        m.prometheus_pid()
        m.load = Load(up.ingress())
        m.load.start()
        # Prometheus has discovered every sidecar before the first run (new targets take a few seconds).
        proxies = len(up.status()["clusters"][0]["proxies"])  # the gateways and every sidecar
        wait_for("prometheus scraping every proxy", lambda: len(_targets(m)) == proxies, timeout=30)
        yield m
    finally:
        m.load.close()
        with contextlib.suppress(Exception):
            os.kill(m.prometheus_pid(), signal.SIGCONT)
        children = set(m.up.child_pids)
        m.up.stop()
        assert not alive(children), "processes left behind"


def _targets(m: Mesh) -> list[Any]:
    import urllib.request

    url = m.up.status()["clusters"][0]["prometheus"]["url"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/api/v1/targets", timeout=2) as resp:
        data = json.load(resp)
    return [t for t in data["data"]["activeTargets"]
            if t["health"] == "up" and t["labels"].get("kind") != "lockgate"]  # the proxies (not lockgate's /metrics)


def _watch(m: Mesh, until: Any, timeout: float) -> list[dict[str, Any]]:
    """Poll `rollout status --json` until `until(status)`; every distinct status seen, in order."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = m.rollout()
        if not seen or (s["phase"], s["weight"], s["step"]) != (seen[-1]["phase"], seen[-1]["weight"],
                                                                 seen[-1]["step"]):
            seen.append(s)
        if until(s):
            return seen
        time.sleep(0.1)
    raise TimeoutError(f"rollout did not get there in {timeout:.0f}s; seen {[(s['phase'], s['weight']) for s in seen]}")


def _written_back(phase: str, before: dict[str, Any]) -> Any:
    """The run ended in `phase` and its outcome is committed (a write-back sha the run before did not have)."""
    return lambda s: s["phase"] == phase and s.get("writeBack") not in (None, before.get("writeBack"))


def test_a_healthy_canary_is_promoted_step_by_step(mesh: Mesh) -> None:
    before = mesh.rollout()
    start = mesh.commit_rollout(rollout(stable="v1", canary="v2"), "reviews: canary v2")
    seen = _watch(mesh, _written_back("promoted", before), timeout=60)
    assert seen[-1]["stable"] == "v2" and seen[-1]["finishedAt"], seen[-1]
    weights = [s["weight"] for s in seen if s["phase"] == "progressing"]
    assert weights == [20, 50, 100], seen  # every step, in order, never backwards
    assert any(s["phase"] == "promoted" or s["lastDecision"]["action"] == "promote" for s in seen)

    # Git has the outcome: a commit by lockgate whose Rollout now says stable v2 and has no canary.
    log = git(mesh.repo, "log", "--format=%an|%s", f"{start}..HEAD").splitlines()
    assert log == ["lockgate|rollout shop/reviews: promote v2 (stable v1 -> v2)"], log
    body = git(mesh.repo, "log", "-1", "--format=%B")
    assert "success-rate@east: 100" in body and "Lockgate-Decision: promote" in body
    text = git(mesh.repo, "show", "HEAD:rollout.yaml")
    assert "stable: v2" in text and "canary:" not in text
    assert "# The reviews rollout" in text  # comments survive the write-back

    # All traffic on v2 now, and the write-back commit did not start another run.
    t = time.time()
    wait_for("traffic all on v2", lambda: {v for _, _, v in mesh.load.between(t + 0.3, time.time())} == {"v2"},
             timeout=10)
    assert mesh.rollout()["phase"] == "promoted"  # the outcome stays until the next run starts

    history = json.loads(lockgate("history", "--json", "--state-dir", str(mesh.state)).stdout)
    actions = [e["action"] for e in history if e["type"] == "decision" and e["sha"] == start]
    assert actions == ["promote", "step", "step", "start"], actions
    assert any(e["type"] == "commit" and e["automated"] and e["decision"] == "promote" for e in history)
    assert any(e["type"] == "applied" and e["clusters"] == ["east"] for e in history)


def test_a_failing_canary_is_rolled_back_fast_with_bounded_exposure(mesh: Mesh) -> None:
    t_commit = time.time()
    before = mesh.rollout()
    start = mesh.commit_rollout(rollout(stable="v2", canary="v3"), "reviews: canary v3 (fails 30%)")
    _watch(mesh, _written_back("rolled-back", before), timeout=60)
    decisions = [d for d in mesh.decisions(t_commit) if d["canaryRevision"] == start]
    by_action = {d["action"]: d for d in decisions}
    assert set(by_action) == {"start", "hold", "rollback"}, decisions
    first_analysis = min(d["at"] for d in decisions if d["checks"])
    rolled_back = by_action["rollback"]["at"]
    assert rolled_back - first_analysis <= 2 * INTERVAL + 0.5, decisions  # within 2 intervals
    rate = next(c for c in by_action["rollback"]["checks"] if c["metric"] == "success-rate")
    assert rate["value"] < 99 and rate["result"] == "fail"

    # Measured at the ingress: the last answer from v3, and the share of failures over the run.
    wait_for("traffic all on v2 again", lambda: {v for _, _, v in mesh.load.between(rolled_back + 0.5,
                                                                                    time.time())} == {"v2"}, timeout=10)
    time.sleep(0.5)
    run = mesh.load.between(by_action["start"]["at"], time.time())
    last_bad = max(t for t, status, v in run if v == "v3" or status >= 500)
    during = mesh.load.between(by_action["start"]["at"], rolled_back)  # the run itself, start to rollback
    failed = sum(1 for _, status, _ in during if status >= 500)
    exposure = failed / len(during)
    report = {"firstBadAnalysisToStable": round(last_bad - first_analysis, 3),
              "analysisToRollbackDecision": round(rolled_back - first_analysis, 3),
              "failed": failed, "requests": len(during), "errorExposure": round(exposure, 4), "canaryWeight": 0.20}
    (mesh.tmp / "rollback-figures.json").write_text(json.dumps(report))
    print("rollback figures:", report)
    assert last_bad - first_analysis <= 2 * INTERVAL + 1.0, report
    assert 0 < exposure < 0.20, report  # below the canary's weight at the time (20%)
    assert all(status in (200, 500) for _, status, _ in run), "requests failed for other reasons"

    # Git: the canary reverted to the stable by lockgate, with the reason and the numbers.
    assert git(mesh.repo, "log", "-1", "--format=%an|%s") == "lockgate|rollout shop/reviews: roll back v3 (100% to v2)"
    assert "success-rate@east" in git(mesh.repo, "log", "-1", "--format=%B")
    assert "canary: v2" in git(mesh.repo, "show", "HEAD:rollout.yaml")


def _get(address: tuple[str, int], headers: dict[str, str], n: int) -> dict[str | None, int]:
    conn = http.client.HTTPConnection(*address, timeout=5)
    seen: dict[str | None, int] = {}
    for _ in range(n):
        conn.request("GET", "/", headers={"Host": HOST, **headers})
        resp = conn.getresponse()
        v = json.loads(resp.read()).get("version") if resp.status == 200 else f"HTTP {resp.status}"
        seen[v] = seen.get(v, 0) + 1
    conn.close()
    return seen


def test_ab_sends_only_matching_requests_to_the_canary(mesh: Mesh) -> None:
    ab = rollout(stable="v2", canary="v1", strategy="ab", extra=(
        "  iterations: 1000\n  match:\n    - headers: {x-canary: {exact: \"yes\"}}\n"))
    mesh.commit_rollout(ab, "reviews: A/B test v1 for x-canary: yes")
    _watch(mesh, lambda s: s["phase"] == "progressing" and s["canary"] == "v1", timeout=20)
    t = time.time()
    address = mesh.up.ingress()
    wait_for("the canary rule applied", lambda: _get(address, {"x-canary": "yes"}, 1) == {"v1": 1}, timeout=10)
    assert _get(address, {"x-canary": "yes"}, 50) == {"v1": 50}
    assert _get(address, {"x-canary": "no"}, 50) == {"v2": 50}
    assert {v for _, _, v in mesh.load.between(t, time.time())} == {"v2"}  # the load has no header

    before = mesh.rollout()
    out = lockgate("rollout", "abort", "reviews", "--state-dir", str(mesh.state))
    assert out.stdout.startswith("rollout shop/reviews: rollback: aborted by command"), out.stdout
    _watch(mesh, _written_back("rolled-back", before), timeout=20)
    wait_for("the canary rule gone", lambda: _get(address, {"x-canary": "yes"}, 20) == {"v2": 20}, timeout=10)
    assert git(mesh.repo, "log", "-1", "--format=%an|%s") == "lockgate|rollout shop/reviews: roll back v1 (100% to v2)"


def test_prometheus_stopped_holds_and_a_sigkilled_lockgate_resumes(mesh: Mesh) -> None:
    steps = "[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]"
    mesh.commit_rollout(rollout(stable="v2", canary="v1", steps=steps), "reviews: canary v1, ten steps")
    _watch(mesh, lambda s: s["phase"] == "progressing" and s["weight"] >= 20, timeout=30)

    # (d) Prometheus stops answering: the rollout holds at its step, however many intervals pass.
    prom = mesh.prometheus_pid()
    os.kill(prom, signal.SIGSTOP)
    try:
        held = mesh.rollout()
        t_stop = time.time()
        wait_for("two analyses with the provider offline",
                 lambda: sum(1 for d in mesh.decisions(t_stop) if "offline" in " ".join(d["reasons"])) >= 2,
                 timeout=4 * INTERVAL + 10)
        now = mesh.rollout()
        assert now["phase"] == "progressing" and now["weight"] <= held["weight"] + 10, (held, now)
        assert all(d["action"] in ("hold", "step") for d in mesh.decisions(t_stop)), mesh.decisions(t_stop)
        assert all(d["action"] == "hold" for d in mesh.decisions(t_stop + INTERVAL))  # never promotes blind
        assert "offline" in " ".join(now["lastDecision"]["reasons"])
    finally:
        os.kill(prom, signal.SIGCONT)
    back = _watch(mesh, lambda s: s["weight"] > now["weight"], timeout=6 * INTERVAL)[-1]

    # (e) SIGKILL mid-rollout: the restarted lockgate resumes at the same step, not from zero.
    before = json.loads((mesh.state / "rollouts" / "shop.reviews.json").read_text())["state"]
    children = set(mesh.up.child_pids)
    mesh.up.proc.kill()
    mesh.up.proc.wait()
    wait_for("prometheus gone with it (it serves no traffic)", lambda: not alive({prom}), timeout=15)
    assert alive(children - {prom}) == children - {prom}  # the data plane outlives lockgate
    mesh.load.records.append((time.time(), -1, "restart"))
    mesh.restart()
    head = git(mesh.repo, "rev-parse", "HEAD")
    st = mesh.up.wait_converged(head)
    prom = mesh.prometheus_pid()
    resumed = mesh.rollout()
    assert resumed["canaryRevision"] == before["canaryRevision"] and resumed["startedAt"] == before["startedAt"]
    assert resumed["weight"] >= before["weight"] >= back["weight"], (before, resumed)
    assert resumed["step"] >= before["step"] + 1  # `step` in the summary is 1-based
    assert st["rollouts"][0]["phase"] == "progressing"
    address = mesh.up.ingress()
    seen = _get(address, {}, 200)
    assert seen.get("v1", 0) > 0 and set(seen) <= {"v1", "v2"}, seen  # the canary still gets its share

    before = mesh.rollout()
    out = lockgate("rollout", "promote", "reviews", "--state-dir", str(mesh.state))
    assert out.stdout.startswith("rollout shop/reviews: promote: promoted by command"), out.stdout
    _watch(mesh, _written_back("promoted", before), timeout=20)
    last = git(mesh.repo, "log", "-1", "--format=%an|%s")
    assert last == "lockgate|rollout shop/reviews: promote v1 (stable v2 -> v1)", last
    assert prom in mesh.up.child_pids


def test_a_restarted_prometheus_is_not_judged_until_it_holds_a_full_window(mesh: Mesh) -> None:
    """Prometheus SIGKILLed mid-run, restarted at once by its supervisor (its data kept): until it has
    scraped a full interval again, every analysis holds and says why; then the run steps again."""
    stable = mesh.rollout()["stable"]
    canary = "v2" if stable == "v1" else "v1"
    steps = "[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]"
    mesh.commit_rollout(rollout(stable=stable, canary=canary, steps=steps), f"reviews: canary {canary}, ten steps")
    _watch(mesh, lambda s: s["phase"] == "progressing" and s["canary"] == canary and s["weight"] >= 20, timeout=40)

    status = mesh.up.status()["clusters"][0]["prometheus"]
    prom, ready_url = mesh.prometheus_pid(), f"{status['url']}/-/ready"
    t_kill = time.time()
    os.kill(prom, signal.SIGKILL)
    wait_for("prometheus gone", lambda: not alive({prom}), timeout=10)
    wait_for("prometheus restarted and ready", lambda: _ready(ready_url), timeout=30)
    t_ready = time.time()  # the restart happened before this
    step = wait_for("a step after the restart",
                    lambda: next((d for d in mesh.decisions(t_kill) if d["action"] == "step"), None),
                    timeout=30 + 4 * INTERVAL)
    decisions = mesh.decisions(t_kill)
    before = [d for d in decisions if d["at"] < step["at"]]
    assert before and all(d["action"] == "hold" for d in before), decisions  # nothing stepped or promoted
    assert all(d["action"] == "hold" for d in decisions if d["at"] <= t_ready + INTERVAL), decisions
    answered = [d for d in before if d["checks"]]  # Prometheus answered (the others: "offline")
    assert answered, decisions
    first = " ".join(answered[0]["reasons"])
    assert "s of 3 s of data (" in first and "Prometheus restarted" in first, first
    assert all("of data" in " ".join(d["reasons"]) for d in answered), answered
    assert all(c["result"] == "pass" for c in step["checks"]), step  # judged on a full window
    assert step["at"] - t_ready >= INTERVAL, (step, t_ready)
    # The restarted one is tracked, so the teardown checks it is stopped with the mesh.
    new = wait_for("status shows the restarted prometheus", lambda: (
        pid if (pid := mesh.up.status()["clusters"][0]["prometheus"]["pid"]) not in (None, prom) else None), timeout=10)
    mesh.up.child_pids.add(new)

    before_abort = mesh.rollout()
    lockgate("rollout", "abort", "reviews", "--state-dir", str(mesh.state))
    _watch(mesh, _written_back("rolled-back", before_abort), timeout=20)


def _ready(url: str) -> bool:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=1) as resp:
        return bool(resp.status == 200)


def _answers(address: tuple[str, int], n: int, cookie: str | None = None) -> list[tuple[str | None, str | None]]:
    """n requests on one connection: (version that answered, its Set-Cookie header) each."""
    conn = http.client.HTTPConnection(*address, timeout=5)
    out = []
    for _ in range(n):
        conn.request("GET", "/", headers={"Host": HOST, **({"Cookie": cookie} if cookie else {})})
        resp = conn.getresponse()
        body = resp.read()
        out.append((json.loads(body).get("version") if resp.status == 200 else f"HTTP {resp.status}",
                    resp.getheader("Set-Cookie")))
    conn.close()
    return out


def test_session_affinity_keeps_a_client_on_the_canary_for_the_run(mesh: Mesh) -> None:
    stable = mesh.rollout()["stable"]
    canary = "v2" if stable == "v1" else "v1"
    paused = rollout(stable=stable, canary=canary, extra="  paused: true           # stays at 20%\n"
                     "  sessionAffinity: {maxAge: 1h}\n")
    mesh.commit_rollout(paused, f"reviews: canary {canary} with session affinity, held at 20%")
    _watch(mesh, lambda s: s["phase"] == "progressing" and s["canary"] == canary and s["weight"] == 20, timeout=20)
    address = mesh.up.ingress()
    cookie = wait_for("the canary's answers set the cookie", lambda: next(
        (c for v, c in _answers(address, 20) if v == canary and c), None), timeout=10)
    pair, *attributes = [part.strip() for part in cookie.split(";")]
    assert pair.startswith("lockgate-canary=") and attributes == ["Max-Age=3600", "Path=/"], cookie

    # Without the cookie: the 80/20 split, and only the canary's answers carry a Set-Cookie.
    split = _answers(address, 300)
    served = {v: sum(1 for w, _ in split if w == v) for v in {w for w, _ in split}}
    assert set(served) == {stable, canary} and 0.08 < served[canary] / len(split) < 0.35, served
    wrong = [(v, c) for v, c in split if (c is not None) != (v == canary)]
    assert not wrong, wrong
    assert all(c == cookie for v, c in split if v == canary)  # one cookie for the whole run

    # With it (among other cookies, as a browser sends them): the canary, 30 times in a row.
    sticky = _answers(address, 30, cookie=f"theme=dark; {pair}; lang=en")
    in_a_row = sum(1 for _ in itertools.takewhile(lambda a: a[0] == canary, sticky))
    assert in_a_row == 30, sticky
    assert {v for v, _ in _answers(address, 30, cookie=f"{pair}0")} >= {stable}  # another value: the split

    # The run ends: the cookie no longer means anything, and nobody gets a new one.
    before = mesh.rollout()
    lockgate("rollout", "abort", "reviews", "--state-dir", str(mesh.state))
    _watch(mesh, _written_back("rolled-back", before), timeout=20)
    wait_for("the affinity rule gone", lambda: _answers(address, 20, cookie=pair) == [(stable, None)] * 20,
             timeout=10)
    assert all(c is None for _, c in _answers(address, 100))


def test_mirror_judges_a_failing_canary_on_copies_nobody_is_answered_from(mesh: Mesh) -> None:
    stable = mesh.rollout()["stable"]
    before, t_commit = mesh.rollout(), time.time()
    start = mesh.commit_rollout(rollout(stable=stable, canary="v3", strategy="mirror", extra="  iterations: 3\n"),
                                "reviews: mirror the traffic to v3 (fails 30%)")
    _watch(mesh, _written_back("rolled-back", before), timeout=60)
    decisions = [d for d in mesh.decisions(t_commit) if d["canaryRevision"] == start]
    began = next(d for d in decisions if d["action"] == "start")
    assert began["reasons"][-1].endswith("traffic mirrored to v3"), began
    rollback = next(d for d in decisions if d["action"] == "rollback")
    # Judged from the canary sidecar's inbound stats: the copies reached it and failed there.
    rate = next(c for c in rollback["checks"] if c["metric"] == "success-rate")
    assert rate["result"] == "fail" and rate["value"] < 99 and rate["requests"] >= 20, rate
    # Every client answer of the run came from the stable, and none failed: the copies' answers are dropped.
    run = mesh.load.between(began["at"], rollback["at"])
    assert len(run) > 100 and {(status, v) for _, status, v in run} == {(200, stable)}, Counter(
        (status, v) for _, status, v in run)
    assert git(mesh.repo, "log", "-1", "--format=%an|%s") == (
        f"lockgate|rollout shop/reviews: roll back v3 (100% to {stable})")


def test_bluegreen_previews_by_header_then_switches_all_traffic_at_once(mesh: Mesh) -> None:
    stable = mesh.rollout()["stable"]
    canary = "v2" if stable == "v1" else "v1"
    preview = Load(mesh.up.ingress(), headers={"x-preview": "yes"})  # what the analyses judge: the preview
    preview.start()
    try:
        before, t_commit = mesh.rollout(), time.time()
        start = mesh.commit_rollout(rollout(stable=stable, canary=canary, strategy="bluegreen", extra=(
            "  iterations: 2\n  match:\n    - headers: {x-preview: {exact: \"yes\"}}\n")),
            f"reviews: blue/green {canary}, previewed with x-preview: yes")
        seen = _watch(mesh, _written_back("promoted", before), timeout=60)
    finally:
        preview.close()
    assert seen[-1]["stable"] == canary, seen[-1]
    assert all(s["weight"] == 0 for s in seen if s["phase"] == "progressing"), seen  # no split on the way
    decisions = [d for d in mesh.decisions(t_commit) if d["canaryRevision"] == start]
    began = next(d for d in decisions if d["action"] == "start")
    assert began["reasons"][-1].endswith(f"{canary} deployed beside {stable} (preview via spec.match), 0% of traffic")
    promote = next(d for d in decisions if d["action"] == "promote")

    # The preview reached the canary once its rule was pushed; the rest stayed on the stable until the
    # promotion, then moved in one switch, never back.
    previewed = [v for t, status, v in preview.records if began["at"] + 1.0 <= t <= promote["at"]]
    assert previewed and set(previewed) == {canary}, Counter(previewed)
    wait_for(f"traffic all on {canary}", lambda: {v for _, _, v in mesh.load.between(
        promote["at"] + 0.5, time.time())} == {canary}, timeout=10)
    default = [v for _, status, v in mesh.load.between(began["at"], time.time())]
    assert set(default) == {stable, canary}, Counter(default)
    switch = default.index(canary)
    assert set(default[:switch]) == {stable} and set(default[switch:]) == {canary}, Counter(default)
    first_on_canary = next(t for t, _, v in mesh.load.between(began["at"], time.time()) if v == canary)
    assert first_on_canary >= promote["at"], (first_on_canary, promote["at"])
