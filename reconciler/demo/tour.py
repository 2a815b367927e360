"""`lockgate demo`: the one-command tour on real processes.

A fresh intent repo from the template, the whole local mesh, then the commits a user would make: all
traffic on v1, a 50/50 split, a broken commit that changes nothing; then progressive delivery: a
Rollout and a bad canary (FAIL_RATE=0.3) rolled back, judged by Prometheus from the Envoys' own stats;
then a second cluster under the same root CA and a good canary rolled out in two waves (east, then west
after a short bake), each wave judged by its own cluster's Prometheus, with what each cluster's ingress
answered; and finally `git log` with lockgate's own commits in it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from reconciler.load import load
from reconciler.loop import Reconciler, UpConfig, install_stop_signals
from reconciler.source.git import Pygit2Source, init_repo
from reconciler.state import TEMPLATE

V1_ONLY = "- version: v1\n          weight: 100\n        - version: v2\n          weight: 0"
HALF = "- version: v1\n          weight: 50\n        - version: v2\n          weight: 50"
V2_ONLY = "- version: v1\n          weight: 0\n        - version: v2\n          weight: 100"
BROKEN = "- version: v1\n          weight: 70\n        - version: v2\n          weight: 50"
USER = ("demo user", "demo@example.org")


def _tally(address: str, host: str, n: int, *, where: bool = False) -> Counter[str]:
    """n requests at the ingress for `host`; which reviews version (and cluster, with `where`) answered
    each (via frontend)."""
    h, p = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(h, int(p), timeout=5)
    seen: Counter[str] = Counter()
    try:
        for _ in range(n):
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                seen[f"HTTP {resp.status}"] += 1
                continue
            up = json.loads(body)["upstreams"][0]["body"]
            seen[f"{up['version']}@{up['cluster']}" if where else up["version"]] += 1
    finally:
        conn.close()
    return seen


def _bar(seen: Counter[str]) -> str:
    total = sum(seen.values()) or 1
    return "   ".join(f"{k}: {v:4d} ({100 * v / total:3.0f}%) {'#' * round(30 * v / total)}"
                       for k, v in sorted(seen.items()))


async def run_demo(*, workdir: Path | None, keep_running: bool,
                   make: Callable[[UpConfig], Awaitable[Reconciler]]) -> int:
    """The tour. `make` builds the reconciler (the CLI, the one composition root, picks the implementations)."""
    logging.getLogger("lockgate").setLevel(logging.CRITICAL)  # the tour reports invalid commits itself
    root = Path(tempfile.mkdtemp(prefix="lockgate-demo-")) if workdir is None else workdir
    repo, state = root / "mesh-repo", root / "state"
    template = TEMPLATE
    print(f"== lockgate demo in {root}")
    init_repo(repo, template=template)
    print(f"   lockgate init {repo}: a mesh with frontend -> reviews (v1, v2), all reviews traffic on v1")

    config = UpConfig(repo=str(repo), state_dir=state)
    source = Pygit2Source.open(str(repo))  # the tour's own commits: it plays the person using lockgate
    rec = await make(config)
    stop = asyncio.Event()
    install_stop_signals(stop)
    runner = asyncio.create_task(rec.run(stop))
    try:
        await _converged(rec, source.head())
        ingress = rec.ingress(next(iter(rec.planes))) or ""
        host = "shop.example.com"
        print(f"== up: control plane, ingress gateway and 4 sidecars are real Envoys; ingress http://{ingress}")
        print(f"   curl -H 'Host: {host}' http://{ingress}/   (frontend, which calls reviews through its sidecar)")
        print(f"   v1 only:      {_bar(await asyncio.to_thread(_tally, ingress, host, 100))}")

        async def commit(text: str, message: str) -> tuple[str, float]:
            routes = (repo / "routes.yaml").read_text()
            for old in (V1_ONLY, HALF, V2_ONLY, BROKEN):
                routes = routes.replace(old, text)
            t0 = time.monotonic()
            sha = source.commit(files={"routes.yaml": routes.encode()}, message=message,
                                parent=source.head() or "", author=USER)
            return sha, t0

        sha, t0 = await commit(HALF, "reviews: split 50/50 between v1 and v2")
        await _converged(rec, sha)
        took = (time.monotonic() - t0) * 1000
        print(f"== git commit 'reviews: split 50/50' -> every Envoy ACKed it {took:.0f} ms later")
        print(f"   50/50:        {_bar(await asyncio.to_thread(_tally, ingress, host, 400))}")

        sha, _ = await commit(BROKEN, "reviews: 70/50 (a typo)")
        for _ in range(200):
            if rec.failed == sha:
                break
            await asyncio.sleep(0.01)
        print("== git commit 'reviews: 70/50 (a typo)' is invalid; lockgate refuses it, the mesh keeps serving:")
        for line in load(source.read_tree(sha)).problems:
            print(f"   {line}")
        print(f"   still 50/50:  {_bar(await asyncio.to_thread(_tally, ingress, host, 400))}")

        await _rollouts(rec, source, repo, ingress, host)
        await _waves(rec, source, host)
        print(f"== git log in {repo} (lockgate's own commits are the audit trail; `lockgate history` adds the "
              "decisions):")
        for c in source.log("HEAD", limit=8):
            print(f"   {c.sha[:10]} {c.author_name:10} {c.message.splitlines()[0]}")
        if keep_running:
            print(f"== still running: edit {repo}/routes.yaml, commit, and watch `lockgate status "
                  f"--state-dir {state}`; Ctrl-C stops everything")
            await stop.wait()
        else:
            print("== done; `lockgate demo --keep-running` leaves the mesh up to explore")
    finally:
        stop.set()
        await asyncio.gather(runner, return_exceptions=True)
        await rec.close()
        if workdir is None and not keep_running:
            shutil.rmtree(root, ignore_errors=True)
    return 0


ROLLOUT = """\
# Progressive delivery for reviews: commit a new `canary`; lockgate moves traffic step by step,
# judges each step from Prometheus, and commits the promotion or the rollback here.
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata:
  name: reviews
  namespace: shop
spec:
  service: reviews
  stable: v1
  strategy: canary
  steps: [20, 50, 100]
  interval: 2s
  analysis:
    failureThreshold: 2
    minRequests: 20
    metrics:
      - {name: success-rate, builtin: request-success-rate, min: 99}
      - {name: latency-p99, builtin: request-duration-p99, max: 500, noData: pass}
"""
BAD_BUILD = """---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata:
  name: reviews-v3
  namespace: shop
spec:
  service: reviews
  version: v3
  replicas: 1
  clusters: [east]
  command: [lockgate, demo-app]
  env: {FAIL_RATE: "0.3"}   # a bad build: 30% of its answers are 500
"""


class _Load:
    """Steady requests at the ingress while rollouts run (Prometheus needs traffic to judge)."""

    def __init__(self, address: str, host: str) -> None:
        self.address, self.host = address, host
        self.seen: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="demo load")
        self.thread.start()

    def _run(self) -> None:
        h, p = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(h, int(p), timeout=5)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200
                what = json.loads(body)["upstreams"][0]["body"].get("version", "?") if ok else f"HTTP {resp.status}"
                if ok and json.loads(body)["upstreams"][0].get("status") != 200:
                    what = f"HTTP {json.loads(body)['upstreams'][0].get('status')}"
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
                conn.close()
                conn = http.client.HTTPConnection(h, int(p), timeout=5)
                what = "error"
            self.seen.append((time.time(), what))
            time.sleep(0.005)
        conn.close()

    def since(self, t: float) -> Counter[str]:
        return Counter(w for at, w in list(self.seen) if at >= t)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


async def _rollouts(rec: Reconciler, source: Pygit2Source, repo: Path, ingress: str, host: str) -> None:
    """The progressive-delivery half of the tour, with live progress from the controller's decisions."""
    services = (repo / "services.yaml").read_text().replace("versions: [v1, v2]", "versions: [v1, v2, v3]")
    workloads = (repo / "workloads.yaml").read_text() + BAD_BUILD
    sha = source.commit(files={"rollout.yaml": ROLLOUT.encode(), "services.yaml": services.encode(),
                               "workloads.yaml": workloads.encode()},
                        message="reviews: a Rollout owns the weights; deploy reviews-v3", parent=source.head() or "",
                        author=USER)
    await _converged(rec, sha)
    print("== git commit 'reviews: a Rollout owns the weights; deploy reviews-v3' -> Prometheus per cluster "
          f"({_prometheus(rec)}) scrapes every Envoy")
    load = _Load(ingress, host)
    try:
        await _scraped(rec)
        text = (repo / "rollout.yaml").read_text().replace("  stable: v1\n", "  stable: v1\n  canary: v3\n", 1)
        message = "reviews: canary v3 (the bad build)"
        sha = source.commit(files={"rollout.yaml": text.encode()}, message=message, parent=source.head() or "",
                            author=USER)
        print(f"== git commit '{message}'")
        await _follow(rec, {"east": load}, sha)
    finally:
        load.close()


WAVES = """\
  steps: [50, 100]
  waves:                    # east first; west after east passed and a short soak (bake)
    - clusters: [east]
    - clusters: [west]
      bake: 2s
"""


async def _waves(rec: Reconciler, source: Pygit2Source, host: str) -> None:
    """The multi-cluster step: a second cluster under the same root CA, then a good canary rolled out in
    two waves, each judged by its own cluster's Prometheus."""
    tree = source.read_tree(source.head() or "")  # lockgate's write-back is in it
    mesh, workloads, rollout = (tree[f].decode() for f in ("mesh.yaml", "workloads.yaml", "rollout.yaml"))
    everywhere = {name: f"  name: {name}\n  namespace: shop\nspec:\n  service: {svc}\n  version: {v}\n  replicas: {n}\n"
                        "  clusters: [east]" for name, svc, v, n in (("frontend-v1", "frontend", "v1", 1),
                                                                      ("reviews-v1", "reviews", "v1", 2),
                                                                      ("reviews-v2", "reviews", "v2", 1))}
    if "    - name: east\n" not in mesh or any(w not in workloads for w in everywhere.values()) \
            or "  steps: [20, 50, 100]\n" not in rollout or "  stable: v1\n" not in rollout:
        return  # the repo was edited by hand: nothing to show here
    for w in everywhere.values():
        workloads = workloads.replace(w, w.replace("clusters: [east]", "clusters: [east, west]"))
    sha = source.commit(files={
        "mesh.yaml": mesh.replace("    - name: east\n", "    - name: east\n    - name: west\n").encode(),
        "workloads.yaml": workloads.encode(),
    }, message="west: a second cluster, with frontend and reviews v1, v2", parent=source.head() or "", author=USER)
    await _converged(rec, sha)
    west = rec.ingress("west") or ""
    print("== git commit 'west: a second cluster, with frontend and reviews v1, v2' -> west gets its own control\n"
          "   plane, gateways and Prometheus; both clusters' certificates chain to one root (east-west gateways\n"
          f"   carry calls between them, SNI passthrough: mTLS end to end); west's ingress http://{west}")
    print(f"   from west:    {_bar(await asyncio.to_thread(_tally, west, host, 100, where=True))}")
    loads = {"east": _Load(rec.ingress("east") or "", host), "west": _Load(west, host)}
    try:
        await _scraped(rec)  # west's new targets, and east's reviews-v2 (restarted: its Workload changed)
        text = rollout.replace("  steps: [20, 50, 100]\n", WAVES).replace("  canary: v1\n", "")
        text = text.replace("  stable: v1\n", "  stable: v1\n  canary: v2\n")  # after the rollback: canary v1
        message = "reviews: canary v2 in two waves (east, then west)"
        sha = source.commit(files={"rollout.yaml": text.encode()}, message=message, parent=source.head() or "",
                            author=USER)
        print(f"== git commit '{message}'\n"
              "   the steps run in east, judged by east's Prometheus, while west stays on v1; once east passed,\n"
              "   west bakes 2s (east still judged), then takes its own steps, judged by west's Prometheus")
        await _follow(rec, loads, sha)
    finally:
        for load in loads.values():
            load.close()


def _prometheus(rec: Reconciler) -> str:
    """The first cluster's Prometheus URL."""
    metrics = rec.runtime.metrics(next(iter(rec.planes)))
    return metrics.url if metrics is not None else "-"


async def _scraped(rec: Reconciler, timeout: float = 30.0) -> None:
    """Until each cluster's Prometheus has scraped every sidecar of its cluster: new targets take a few
    seconds (discovery reload)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    workloads = [str(w["id"]) for w in rec.status()["workloads"]]

    def missing() -> int:
        short = 0
        for cluster in rec.planes:
            metrics = rec.runtime.metrics(cluster)
            if metrics is None:
                continue
            want = sum(1 for w in workloads if w.startswith(f"{cluster}/"))
            try:
                with opener.open(f"{metrics.url}/api/v1/targets", timeout=2) as resp:
                    data = json.load(resp)
            except (OSError, ValueError):
                return want or 1
            short += max(0, want - sum(1 for t in data["data"]["activeTargets"]
                                       if t["health"] == "up" and t["labels"].get("service")))
        return short

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and await asyncio.to_thread(missing) > 0:
        await asyncio.sleep(0.3)


async def _follow(rec: Reconciler, loads: dict[str, _Load], sha: str, timeout: float = 60.0) -> None:
    """Print each decision of the run started by `sha` as it happens, with what each cluster's ingress saw
    (and, for a run in waves, the canary's weight in each cluster)."""
    path = rec.config.state_dir / "rollouts" / "decisions.jsonl"
    shown = 0
    t_mark = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries: list[dict[str, Any]] = []
        if path.exists():
            entries = [d for d in map(json.loads, path.read_text().splitlines()) if d.get("canaryRevision") == sha]
        for d in entries[shown:]:
            seen = {cluster: load.since(t_mark) for cluster, load in loads.items()}
            t_mark = time.time()
            numbers = ", ".join(f"{c['metric']}{'@' + c['cluster'] if d.get('weights') is not None else ''} "
                                f"{c['value']:.4g}" for c in d["checks"]
                                if c["value"] is not None and c["metric"] != "requests")
            weights = d.get("weights")
            share = (", ".join(f"{c} {weights.get(c, 0)}%" for c in loads) + f" to {d['canary']}"
                     if weights is not None else f"{d['weight']}% to {d['canary']}")
            what = {"start": share, "step": share, "wave": share, "approve": share,
                    "hold": "holding", "promote": f"promoted {d['canary']}: 100%",
                    "rollback": f"rolled back: 100% to {d['stable']}"}.get(d["action"], d["action"])
            print(f"   {time.strftime('%H:%M:%S', time.localtime(d['at']))} {d['action']:8} {what:26}"
                  f"{'  [' + numbers + ']' if numbers else ''}")
            if d["action"] == "wave":
                print(f"   {'':8} {d['reasons'][-1]}")
            if d["action"] != "start":
                for cluster, counts in seen.items():
                    where = "ingress" if len(seen) == 1 else f"{cluster:7}"
                    print(f"            {where} since the last decision: {_bar(counts)}")
            shown += 1
            if d["action"] in ("promote", "rollback"):
                reason = d["reasons"][0]
                print(f"   {'why:':8} {reason}")
                for _ in range(100):  # the write-back commit lands and is applied
                    if rec.applied != sha and rec.applied is not None:
                        break
                    await asyncio.sleep(0.05)
                head = rec.source.log("HEAD", limit=1)[0]
                print(f"   lockgate committed {head.sha[:10]}: {head.message.splitlines()[0]}")
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the rollout started by {sha[:12]} did not finish within {timeout:.0f}s")


async def _converged(rec: Reconciler, sha: str | None, timeout: float = 60.0) -> None:
    """Until `sha` is applied, every proxy ACKed it, and every workload is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rec.status()
        if (st["revision"]["applied"] == sha and st["clusters"]
                and all(c["convergedRevision"] == sha for c in st["clusters"])
                and all(w["ready"] for w in st["workloads"])):
            return
        if rec.failed == sha:
            raise RuntimeError(f"revision {sha} is invalid: {rec.last_error}")
        await asyncio.sleep(0.01)
    raise TimeoutError(f"revision {sha} did not converge within {timeout:.0f}s; logs in {rec.config.state_dir}")
