"""`lockgate demo`: the one-command tour on real processes.

A fresh intent repo from the template, the whole local mesh, then four commits a user would make:
all traffic on v1, a 50/50 split, a broken commit that changes nothing, a fix that moves everything
to v2. Each step prints what the ingress actually answered.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from reconciler.gitsource import Pygit2Source, init_repo
from reconciler.load import load
from reconciler.up import Reconciler, UpConfig, install_stop_signals

V1_ONLY = "- version: v1\n          weight: 100\n        - version: v2\n          weight: 0"
HALF = "- version: v1\n          weight: 50\n        - version: v2\n          weight: 50"
V2_ONLY = "- version: v1\n          weight: 0\n        - version: v2\n          weight: 100"
BROKEN = "- version: v1\n          weight: 70\n        - version: v2\n          weight: 50"
USER = ("demo user", "demo@example.org")


def _tally(address: str, host: str, n: int) -> Counter[str]:
    """n requests at the ingress for `host`; which reviews version answered each (via frontend)."""
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
            seen[json.loads(body)["upstreams"][0]["body"]["version"]] += 1
    finally:
        conn.close()
    return seen


def _bar(seen: Counter[str]) -> str:
    total = sum(seen.values()) or 1
    return "   ".join(f"{k}: {v:4d} ({100 * v / total:3.0f}%) {'#' * round(30 * v / total)}"
                       for k, v in sorted(seen.items()))


async def run_demo(*, workdir: Path | None, keep_running: bool) -> int:
    logging.getLogger("lockgate").setLevel(logging.CRITICAL)  # the tour reports invalid commits itself
    root = Path(tempfile.mkdtemp(prefix="lockgate-demo-")) if workdir is None else workdir
    repo, state = root / "mesh-repo", root / "state"
    template = Path(__file__).resolve().parent.parent / "repo-template"
    print(f"== lockgate demo in {root}")
    init_repo(repo, template=template)
    print(f"   lockgate init {repo}: a mesh with frontend -> reviews (v1, v2), all reviews traffic on v1")

    config = UpConfig(repo=str(repo), state_dir=state)
    source = Pygit2Source.open(str(repo))
    rec = Reconciler(config=config, source=source, announced=True)  # the tour announces itself
    stop = asyncio.Event()
    install_stop_signals(stop)
    runner = asyncio.create_task(rec.run(stop))
    try:
        await _converged(rec, source.head())
        ingress = next(iter(rec.planes.values())).ingress
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

        sha, t0 = await commit(V2_ONLY, "reviews: all traffic to v2")
        await _converged(rec, sha)
        print(f"== git commit 'reviews: all traffic to v2' -> applied in {(time.monotonic() - t0) * 1000:.0f} ms")
        print(f"   v2 only:      {_bar(await asyncio.to_thread(_tally, ingress, host, 100))}")
        print(f"== git log in {repo}:")
        for c in source.log("HEAD", limit=5):
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
