"""Commit -> first response served by the new route, through real Envoys.

Flips the `reviews` Route between 100% v1 and 100% v2 (so "applied" is unambiguous) N times, and for
each commit measures the time from `git commit` returning to the first response from the new version
at the ingress, polling with back-to-back keep-alive requests. Prints p50/p90/p99/max, and two
same-run baselines: the time `git commit` itself takes, and one request's round trip (the resolution
of the measurement).

    python bench/propagation.py [--commits 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.harness import Client, commit_file, git, lockgate, running

V1 = "- version: v1\n          weight: 100\n        - version: v2\n          weight: 0"
V2 = "- version: v1\n          weight: 0\n        - version: v2\n          weight: 100"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-") as tmp:
        repo = Path(tmp) / "repo"
        lockgate("init", str(repo))
        with running(repo=repo, state_dir=Path(tmp) / "state") as up:
            up.wait_converged(git(repo, "rev-parse", "HEAD"))
            client = Client(up.ingress())
            routes = (repo / "routes.yaml").read_text()
            assert V1 in routes

            rtt = []
            for _ in range(200):
                t = time.perf_counter()
                client.get("reviews.example.com")
                rtt.append((time.perf_counter() - t) * 1000)

            prop, commit_ms = [], []
            for i in range(args.commits):
                target = "v2" if i % 2 == 0 else "v1"
                text = routes.replace(V1, V2) if target == "v2" else routes
                t0 = time.perf_counter()
                commit_file(repo, "routes.yaml", text, f"bench: all reviews traffic to {target}")
                t1 = time.perf_counter()
                deadline = t1 + 10
                while time.perf_counter() < deadline:
                    status, body = client.get("reviews.example.com")
                    if status == 200 and body.get("version") == target:
                        break
                else:
                    print(f"commit {i}: {target} not served within 10 s", file=sys.stderr)
                    return 1
                t2 = time.perf_counter()
                commit_ms.append((t1 - t0) * 1000)
                prop.append((t2 - t1) * 1000)
                time.sleep(0.2)  # let the previous push settle; we measure single commits, not bursts
            client.close()

    print(f"propagation: commit -> first response from the new version, {len(prop)} commits")
    print(f"  p50 {pct(prop, 50):7.1f} ms   p90 {pct(prop, 90):7.1f} ms   p99 {pct(prop, 99):7.1f} ms"
          f"   max {max(prop):7.1f} ms   mean {statistics.mean(prop):7.1f} ms")
    print(f"baseline: git commit itself   p50 {pct(commit_ms, 50):7.1f} ms")
    print(f"baseline: one request (RTT)   p50 {pct(rtt, 50):7.3f} ms   p99 {pct(rtt, 99):7.3f} ms")
    print(f"ratio: propagation p50 / git commit p50 = {pct(prop, 50) / pct(commit_ms, 50):.2f}")
    target_ok = pct(prop, 50) <= 100
    print(f"target p50 <= 100 ms: {'met' if target_ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
