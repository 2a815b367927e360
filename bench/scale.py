"""Control-plane scale: 1000 services, 2000 route rules, 100 simulated proxies + 2 real Envoys.

The control plane (render, snapshot cache, ADS server) runs in this process; the simulated proxies are
real gRPC ADS clients in a second process that subscribe like Envoy (LDS/CDS wildcard, then RDS/EDS by
name) and ACK every response. Two real Envoys (an ingress and a sidecar) join them. Prints:

- full push: every snapshot set -> every proxy ACKed all of it;
- one route change: one Route's weights change -> every proxy ACKed the new version;
- render time alone for both, and control-plane RSS;
- a same-run baseline with 10 proxies, as ratios;
- the floor: the same two real Envoys started on a static file holding the same final configuration
  (`mesh.envoy.static_bootstrap`), time to ready, in the same run; printed as lockgate / floor.

`--xds sotw|delta|both` picks the protocol every client (simulated and real) speaks; `both` runs each in
the same invocation, so their figures share one machine state.

    python bench/scale.py [--services 1000] [--proxies 100] [--xds both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.envoy import bootstrap, envoy_argv, static_bootstrap, wait_ready
from mesh.intent import Intent
from mesh.render import RenderCache, render
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import AdsServer
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE
from reconciler.load import load
from reconciler.loop import settle_gc

ADDR = "127.0.0.1"


def big_intent(services: int, *, canary_weight: int = 0) -> Intent:
    docs = ["apiVersion: lockgate.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\n"
            "spec: {trustDomain: bench.local, clusters: [{name: c1}]}\n"]
    for i in range(services):
        ns = f"ns{i % 10}"
        docs.append(f"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
                    "spec: {ports: [{name: http, port: 80}], versions: [v1, v2]}\n")
        w = canary_weight if i == 0 else 0
        docs.append(
            f"apiVersion: lockgate.io/v1alpha1\nkind: Route\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
            f"spec:\n  service: s{i}\n  hosts: [s{i}.bench.example]\n  http:\n"
            "    - name: testers\n      match: [{headers: {x-tester: {exact: 'yes'}}}]\n      route: [{version: v2}]\n"
            f"    - name: default\n      route: [{{version: v1, weight: {100 - w}}}, {{version: v2, weight: {w}}}]\n")
    loaded = load({"mesh.yaml": "---\n".join(docs).encode()})
    assert loaded.intent is not None, loaded.problems[:5]
    return loaded.intent


def topology(proxies: int, services: int, ports: list[int]) -> ClusterTopology:
    sidecars = []
    for i in range(proxies):
        svc = i % services
        sidecars.append(Sidecar(node_id=f"c1/ns{svc % 10}/s{svc}-v1-{i}", namespace=f"ns{svc % 10}",
                                service=f"s{svc}", version="v1", workload=f"s{svc}-v1", address=ADDR,
                                inbound_port=ports[2 * i], outbound_port=ports[2 * i + 1], app_port=1))
    return ClusterTopology(cluster="c1", ingress=Gateway("c1/ingress", ADDR, ports[-1]), sidecars=tuple(sidecars),
                           ready=frozenset(s.node_id for s in sidecars))


# --- simulated proxies (second process) ----------------------------------------------------------------


def _clients_main(port: int, subs: dict[str, tuple[list[str], list[str]]], ready: Any, stop: Any,
                  delta: bool = False) -> None:
    asyncio.run(_clients(port, subs, ready, stop, delta=delta))


async def _clients(port: int, subs: dict[str, tuple[list[str], list[str]]], ready: Any, stop: Any, *,
                   delta: bool = False) -> None:
    """One ADS stream per simulated proxy: LDS and CDS by wildcard, then RDS and EDS by the names it was
    given (a real Envoy reads them from its listeners and clusters, in C++ and in microseconds; doing
    that in Python here would make this process, not the control plane, what the bench measures).
    Every response is ACKed with its version and nonce."""
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    eds_type = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    rds_type = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

    async def one(node_id: str, channel: Any) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        out: asyncio.Queue[Any] = asyncio.Queue()
        eds, rds = subs[node_id]
        names = {CLUSTER: [], LISTENER: [], eds_type: eds, rds_type: rds}

        def req(type_url: str, version: str = "", nonce: str = "") -> Any:
            r = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce)
            r.node.id = node_id
            r.resource_names.extend(names[type_url])
            return r

        async def requests() -> Any:
            while True:
                yield await out.get()

        for t in (CLUSTER, LISTENER):
            await out.put(req(t))
        subscribed: set[str] = set()
        async for resp in stub.StreamAggregatedResources(requests()):
            t = resp.type_url
            await out.put(req(t, resp.version_info, resp.nonce))  # ACK
            follow = {CLUSTER: eds_type, LISTENER: rds_type}.get(t)
            if follow and len(resp.resources) and follow not in subscribed and names[follow]:
                subscribed.add(follow)
                await out.put(req(follow))

    async def one_delta(node_id: str, channel: Any) -> None:
        """The same subscriptions over delta xDS: LDS/CDS wildcard, RDS/EDS names once the first answer
        that refers to them arrived; every response ACKed by its nonce."""
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        out: asyncio.Queue[Any] = asyncio.Queue()
        eds, rds = subs[node_id]
        first = True

        def req(type_url: str, nonce: str = "", subscribe: list[str] | None = None) -> Any:
            nonlocal first
            r = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                                    resource_names_subscribe=subscribe or [])
            if first:
                r.node.id = node_id
                first = False
            return r

        async def requests() -> Any:
            while True:
                yield await out.get()

        for t in (CLUSTER, LISTENER):
            await out.put(req(t))
        subscribed: set[str] = set()
        async for resp in stub.DeltaAggregatedResources(requests()):
            t = resp.type_url
            await out.put(req(t, resp.nonce))  # ACK
            follow = {CLUSTER: (eds_type, eds), LISTENER: (rds_type, rds)}.get(t)
            if follow and len(resp.resources) and follow[0] not in subscribed and follow[1]:
                subscribed.add(follow[0])
                await out.put(req(follow[0], subscribe=follow[1]))

    channels = [grpc.aio.insecure_channel(f"{ADDR}:{port}", options=[("grpc.max_receive_message_length", 1 << 28)])
                for _ in range(4)]
    tasks = [asyncio.create_task((one_delta if delta else one)(n, channels[i % 4])) for i, n in enumerate(subs)]
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the control plane (this process) ----------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def converge(cache: SnapshotCache, snaps: dict[str, Any], timeout: float = 120) -> float:
    t0 = time.perf_counter()
    for node, snap in snaps.items():
        cache.set(node, snap)
    pending = {n: s.version_all for n, s in snaps.items()}
    while pending:
        results = await asyncio.gather(*(cache.wait_converged(n, v, timeout=timeout) for n, v in pending.items()))
        if not all(results):
            missing = [n for n, ok in zip(pending, results, strict=True) if not ok]
            raise TimeoutError(f"{len(missing)} proxies did not converge, e.g. {missing[:3]}")
        pending = {}
    return (time.perf_counter() - t0) * 1000


async def floor(snaps: dict[str, Any], nodes: list[str], tmp: Path, free: Any) -> float:
    """Milliseconds until the given Envoys, started at once on static files holding their final
    snapshots, are all ready: what loading this configuration costs Envoy itself, control plane aside."""
    procs, admins = [], []
    t0 = time.perf_counter()
    for node in nodes:
        parts = snaps[node].to_json()
        config = static_bootstrap(**{k: parts.get(k, []) for k in ("listeners", "routes", "clusters", "endpoints")})
        admin = free()
        config["node"] = {"id": node, "cluster": "c1"}
        config["admin"] = {"address": {"socket_address": {"address": ADDR, "port_value": admin}}}
        path = tmp / f"static-{node.replace('/', '_')}.json"
        path.write_text(json.dumps(config))
        procs.append(await asyncio.create_subprocess_exec(
            *envoy_argv(config_path=path, log_level="critical"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL))
        admins.append(admin)
    try:
        await asyncio.gather(*(wait_ready(ADDR, a, timeout=60) for a in admins))
        return (time.perf_counter() - t0) * 1000
    finally:
        for p in procs:
            p.terminate()
            await p.wait()


async def run(services: int, proxies: int, envoys: bool, *, delta: bool = False) -> dict[str, float]:
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind((ADDR, 0))
            return int(s.getsockname()[1])

    ports = [free() for _ in range(2 * proxies + 1)]
    topo = topology(proxies, services, ports)
    intent = big_intent(services)
    cache = SnapshotCache()
    server = AdsServer(cache, host=ADDR)
    port = await server.start()
    real = [topo.ingress.node_id, topo.sidecars[0].node_id] if envoys and topo.ingress else []
    everyone = [topo.ingress.node_id] + [s.node_id for s in topo.sidecars] if topo.ingress else []
    simulated = [n for n in everyone if n not in real]
    rcache = RenderCache()  # what the reconciler keeps per cluster between renders
    t = time.perf_counter()
    snaps = render(intent=intent, topology=topo, revision="r1", cache=rcache)
    render_full = (time.perf_counter() - t) * 1000
    subs = {n: (sorted(snaps[n].items(ENDPOINT)), sorted(snaps[n].items(ROUTE))) for n in simulated}
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    clients = ctx.Process(target=_clients_main, args=(port, subs, ready, stop, delta), daemon=True)
    clients.start()
    procs: list[asyncio.subprocess.Process] = []
    tmp = tempfile.TemporaryDirectory(prefix="lockgate-scale-")
    try:
        for node in real:
            admin = free()
            cfg = Path(tmp.name) / f"{node.replace('/', '_')}.json"
            extra: dict[str, Any] = {"delta": True} if delta else {}  # so --xds sotw runs on older commits
            cfg.write_text(json.dumps(bootstrap(node_id=node, cluster="c1", xds_host=ADDR, xds_port=port,
                                                admin_host=ADDR, admin_port=admin, **extra)))
            procs.append(await asyncio.create_subprocess_exec(
                *envoy_argv(config_path=cfg, log_level="critical"), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL))
            await wait_ready(ADDR, admin, timeout=30)
        while not ready.is_set():
            await asyncio.sleep(0.05)
        rss0 = rss_mb()
        full = await converge(cache, snaps)
        await asyncio.sleep(0.1)
        settle_gc()  # what the reconciler does once a push has settled (reconciler.loop: GC_SETTLE_S)
        changed = big_intent(services, canary_weight=10)
        t = time.perf_counter()
        snaps2 = render(intent=changed, topology=topo, revision="r2", cache=rcache)
        render_one = (time.perf_counter() - t) * 1000
        one = await converge(cache, snaps2)
        route_kb = len(json.dumps(dict(snaps2[topo.sidecars[0].node_id].items(
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration")))) / 1024
        rss = rss_mb()
        floor_ms = await floor(snaps2, real, Path(tmp.name), free) if real else 0.0
        return {"render_full_ms": render_full, "push_full_ms": full, "render_one_ms": render_one,
                "push_one_ms": one, "rss_mb": rss, "rss_before_mb": rss0, "route_kb": route_kb,
                "floor_ms": floor_ms}
    finally:
        stop.set()
        clients.join(10)
        if clients.is_alive():
            clients.kill()
        for p in procs:
            p.terminate()
            await p.wait()
        await server.stop(0.1)
        tmp.cleanup()


def report(services: int, proxies: int, mode: str, base: dict[str, float], big: dict[str, float]) -> None:
    print(f"scale [{mode}]: {services} services, {2 * services} route rules, "
          f"{proxies} proxies (2 real Envoys), pid {os.getpid()}")
    for label, r in (("baseline 10 proxies", base), (f"{proxies} proxies", big)):
        print(f"  {label:20} full: render {r['render_full_ms']:7.0f} ms + push/ACK {r['push_full_ms']:7.0f} ms"
              f"   one route: render {r['render_one_ms']:6.0f} ms + push/ACK {r['push_one_ms']:6.0f} ms"
              f"   RSS {r['rss_mb']:.0f} MB   (route config {r['route_kb']:.0f} KiB per sidecar)")
    full = big["render_full_ms"] + big["push_full_ms"]
    one = big["render_one_ms"] + big["push_one_ms"]
    print(f"  ratio {proxies}/10 proxies: full {full / (base['render_full_ms'] + base['push_full_ms']):.1f}x,"
          f" one route {one / (base['render_one_ms'] + base['push_one_ms']):.1f}x")
    print(f"  floor: the 2 real Envoys on a static file of the same final config ready in {big['floor_ms']:.0f} ms;"
          f" lockgate full push / floor = {full / big['floor_ms']:.1f}x")
    print(f"  targets: full <= 1000 ms: {full:.0f} ms {'met' if full <= 1000 else 'NOT met'};"
          f" one route <= 50 ms: {one:.0f} ms {'met' if one <= 50 else 'NOT met'};"
          f" RSS <= 300 MB: {big['rss_mb']:.0f} MB {'met' if big['rss_mb'] <= 300 else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--xds", choices=("sotw", "delta", "both"), default="both")
    args = parser.parse_args()
    for mode in ("sotw", "delta") if args.xds == "both" else (args.xds,):
        delta = mode == "delta"
        base = asyncio.run(run(args.services, 10, envoys=False, delta=delta))
        big = asyncio.run(run(args.services, args.proxies, envoys=True, delta=delta))
        report(args.services, args.proxies, mode, base, big)
    return 0


if __name__ == "__main__":
    sys.exit(main())
