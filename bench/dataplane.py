"""Data-plane cost of lockgate's configuration: frontend sidecar -> reviews sidecar -> app.

Two Envoys configured by lockgate (control plane in this process, config rendered from intent) are
compared, in the same run, with the same two Envoys running a minimal hand-written static config that
does the same forwarding. The app is a third Envoy answering with a direct response, so the app is never
the bottleneck. For each fixed request rate, an open-loop client times every request from when it was
due (so stalls are not hidden); the configurations are interleaved (A B A B) and the client's own
overhead is measured against the app directly. Throughput: Debian's `wrk` (closed loop), if installed.

    python bench/dataplane.py [--rates 500,1000,2000] [--seconds 3] [--rounds 2]

The lockgate pair runs twice: plaintext between the sidecars, and with mTLS (SPIFFE certificates over
SDS; Envoy negotiates TLS 1.3 between sidecars, its default maximum being raised by lockgate's TLS params).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.envoy import bootstrap, envoy_argv, wait_ready
from mesh.render import render
from mesh.topology import ClusterTopology, Sidecar
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import AdsServer
from multicluster.ca import new_intermediate, new_root
from multicluster.issuer import WorkloadIssuer
from policies import SecurityExtension
from reconciler.load import load

ADDR = "127.0.0.1"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}

INTENT = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec: {trustDomain: bench.local, clusters: [{name: c1}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: frontend, namespace: shop}
spec: {ports: [{name: http, port: 80}], versions: [v1]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{name: http, port: 80}], versions: [v1]}
"""


def free() -> int:
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return int(s.getsockname()[1])


def listener(name: str, port: int, route: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": ADDR, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": HCM, "stat_prefix": name, "http_filters": [ROUTER],
                "route_config": {"name": name, "virtual_hosts": [
                    {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}]}}}]}]}


def static_cluster(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ADDR, "port_value": port}}}}]}]}}


class Envoys:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []  # type: ignore[var-annotated]

    async def start(self, name: str, config: dict[str, Any], admin: int) -> None:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(config))
        self.procs.append(await asyncio.create_subprocess_exec(
            *envoy_argv(config_path=path, log_level="critical"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL))
        await wait_ready(ADDR, admin, timeout=30)

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.terminate()
                await p.wait()


async def open_loop(port: int, host: str, rate: int, seconds: float, conns: int = 32) -> dict[str, float]:
    """Requests due every 1/rate s; latency measured from when each was due, not when it was sent."""
    request = f"GET /reviews HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await asyncio.open_connection(ADDR, port))
    latencies: list[float] = []
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        reader, writer = await pool.get()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            latencies.append(time.perf_counter() - due)
        except (OSError, asyncio.IncompleteReadError, AttributeError):
            errors += 1
        finally:
            pool.put_nowait((reader, writer))

    tasks = []
    start = time.perf_counter() + 0.05
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        _, w = pool.get_nowait()
        w.close()
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "n": len(latencies), "errors": errors,
            "mean": statistics.mean(latencies) * 1000 if latencies else 0.0}


async def wrk(port: int, host: str, seconds: float) -> float | None:
    if not shutil.which("wrk"):
        return None
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", "-c16", f"-d{max(1, int(seconds))}s", "-H", f"Host: {host}", f"http://{ADDR}:{port}/reviews",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    m = re.search(rb"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else None


async def main_async(rates: list[int], seconds: float, rounds: int) -> int:
    tmp = tempfile.TemporaryDirectory(prefix="lockgate-dataplane-")
    envoys = Envoys(Path(tmp.name))
    server = None
    try:
        # The app: an Envoy answering 200 with a small body.
        app_port, app_admin = free(), free()
        await envoys.start("app", {"admin": {"address": {"socket_address": {"address": ADDR, "port_value": app_admin}}},
                                   "static_resources": {"listeners": [listener("app", app_port, {
                                       "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}})]}},
                           app_admin)

        # Static pair: A (frontend sidecar's outbound) -> B (reviews sidecar's inbound) -> app.
        a_port, b_port, a_admin, b_admin = free(), free(), free(), free()
        await envoys.start("static-b", {
            "admin": {"address": {"socket_address": {"address": ADDR, "port_value": b_admin}}},
            "static_resources": {"listeners": [listener("in", b_port, {"route": {"cluster": "app", "timeout": "0s"}})],
                                 "clusters": [static_cluster("app", app_port)]}}, b_admin)
        await envoys.start("static-a", {
            "admin": {"address": {"socket_address": {"address": ADDR, "port_value": a_admin}}},
            "static_resources": {"listeners": [listener("out", a_port, {"route": {"cluster": "b"}})],
                                 "clusters": [static_cluster("b", b_port)]}}, a_admin)

        # lockgate pair: the same two hops, configured over ADS from intent.
        loaded = load({"mesh.yaml": INTENT.encode()})
        assert loaded.intent is not None, loaded.problems
        cache = SnapshotCache()
        server = AdsServer(cache, host=ADDR)
        xds_port = await server.start()

        async def pair(index: int, extensions: list[Any]) -> Sidecar:
            """A frontend sidecar and a reviews sidecar (in front of the app), configured by lockgate."""
            fe = Sidecar(f"c1/shop/frontend-v1-{index}", "shop", "frontend", "v1", "frontend-v1", ADDR, free(), free(),
                         1)
            rv = Sidecar(f"c1/shop/reviews-v1-{index}", "shop", "reviews", "v1", "reviews-v1", ADDR, free(), free(),
                         app_port)
            topo = ClusterTopology(cluster="c1", sidecars=(fe, rv), ready=frozenset({rv.node_id}))
            snaps = render(intent=loaded.intent, topology=topo, revision="bench",
                           extensions=[ext(topo) for ext in extensions])
            for node, snap in snaps.items():
                snap.consistent()
                cache.set(node, snap)
            for sc in (rv, fe):
                admin = free()
                await envoys.start(sc.node_id.replace("/", "_"), bootstrap(
                    node_id=sc.node_id, cluster="c1", xds_host=ADDR, xds_port=xds_port, admin_host=ADDR,
                    admin_port=admin), admin)
                assert await cache.wait_converged(sc.node_id, snaps[sc.node_id].version_all, timeout=30)
            return fe

        fe = await pair(0, [])

        # The same two hops with lockgate's security on: mTLS between the sidecars (SPIFFE certificates over
        # SDS, exact SAN match), as every mesh call is by default.
        issuer = WorkloadIssuer(ttl=3600)
        root = new_root(now=datetime.now(UTC))
        issuer.add_authority("c1", new_intermediate(root, cluster="c1", now=datetime.now(UTC)))

        def security(topo: ClusterTopology) -> SecurityExtension:
            certs = issuer.certs_for(loaded.intent, topo, now=time.time())
            return SecurityExtension(intent=loaded.intent, certs=certs, trust_bundle=issuer.trust_bundle)

        fe2 = await pair(1, [security])

        targets = {"client -> app (client overhead)": (app_port, "app"),
                   "static A -> B -> app": (a_port, "reviews.shop"),
                   "lockgate A -> B -> app": (fe.outbound_port, "reviews.shop"),
                   "lockgate mTLS A -> B -> app": (fe2.outbound_port, "reviews.shop")}
        for port, host in targets.values():  # warm up, and prove each path answers
            r = await open_loop(port, host, 200, 0.5)
            assert r["errors"] == 0 and r["n"] == 100, (port, r)

        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(rounds):
            for rate in rates:
                for label, (port, host) in targets.items():  # interleaved: A B A B
                    results.setdefault((label, rate), []).append(await open_loop(port, host, rate, seconds))
        print(f"dataplane: open-loop latency, {seconds:.0f} s x {rounds} rounds per cell, HTTP/1.1 (mTLS: TLS 1.3), "
              "Envoy --concurrency 1; ms from when each request was due")
        print(f"  {'path':34} {'rate':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'errors':>6}")
        for (label, rate), runs in results.items():
            p = {k: statistics.median(r[k] for r in runs) for k in ("p50", "p90", "p99")}
            err = sum(int(r["errors"]) for r in runs)
            print(f"  {label:34} {rate:6d} {p['p50']:7.3f} {p['p90']:7.3f} {p['p99']:7.3f} {err:6d}")
        for rate in rates:
            s = {k: statistics.median(r[k] for r in results[("static A -> B -> app", rate)]) for k in ("p50", "p99")}
            lg = {k: statistics.median(r[k] for r in results[("lockgate A -> B -> app", rate)]) for k in ("p50", "p99")}
            tls = {k: statistics.median(r[k] for r in results[("lockgate mTLS A -> B -> app", rate)])
                   for k in ("p50", "p99")}
            print(f"  ratio lockgate/static at {rate} rps: p50 {lg['p50'] / s['p50']:.3f}"
                  f"  p99 {lg['p99'] / s['p99']:.3f}  (target <= 1.05);  mTLS/static: p50 {tls['p50'] / s['p50']:.3f}"
                  f"  p99 {tls['p99'] / s['p99']:.3f}")
        runs: dict[str, list[float | None]] = {label: [] for label in targets}
        for _ in range(max(2, rounds)):  # interleaved, like the latency runs
            for label, (port, host) in targets.items():
                runs[label].append(await wrk(port, host, seconds))
        tput = {label: (statistics.median(v for v in vs if v is not None) if all(vs) else None)
                for label, vs in runs.items()}
        if all(v is not None for v in tput.values()):
            print(f"throughput (wrk -t1 -c16, closed loop, median of {max(2, rounds)} interleaved runs):")
            for label, v in tput.items():
                print(f"  {label:34} {v:9.0f} rps")
            static = tput["static A -> B -> app"]
            print(f"  ratio lockgate/static: {tput['lockgate A -> B -> app'] / static:.3f}"  # type: ignore[operator]
                  f"   mTLS/static: {tput['lockgate mTLS A -> B -> app'] / static:.3f}")  # type: ignore[operator]
        else:
            print("throughput: skipped (install Debian's wrk: apt-get install wrk)")
        return 0
    finally:
        await envoys.stop()
        if server is not None:
            await server.stop(0.1)
        tmp.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="500,1000,2000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    return asyncio.run(main_async([int(r) for r in args.rates.split(",")], args.seconds, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
