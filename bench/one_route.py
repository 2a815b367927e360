"""One-route changes, repeated: the render and the push/ACK of issue 15's 50 ms figure, in isolation.

`bench/scale.py` measures one one-route change per round, after a full push, with two real Envoys and a
cold start around it: a figure that swings with the machine. This runs the same mesh (1000 services, 100
simulated proxies + the ingress, delta xDS, no Envoys) through many one-route changes in a row and prints
the medians of each part, wall and control-plane CPU, with the same-run floor of the push (`grpc_floor`:
the same streams through bare gRPC aio). For comparing two versions of the push path at one moment.

    python bench/one_route.py [--services 1000] [--proxies 100] [--changes 30] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import (
    ADDR,
    RESPONSE_FIELDS_B,
    _clients_main,
    big_intent,
    changed_route_size,
    converge,
    end_clients,
    free_port,
    grpc_floor,
    pct,
    rendered,
    report_profile,
    subscriptions,
    topology,
)
from mesh.render import RenderCache
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import AdsServer, forget_serialised
from reconciler.loop import gc_paused, settle_gc


async def run(services: int, proxies: int, changes: int, profile: Any = None) -> dict[str, float]:
    """Medians over `changes` one-route changes (s0's canary weight 10 -> 20 -> 10 ...) after one full push."""
    forget_serialised()
    intents = [big_intent(services, canary_weight=w) for w in (0, 10, 20)]
    topo = topology(proxies, services, [free_port() for _ in range(2 * proxies + 1)])
    cache = SnapshotCache()
    server = AdsServer(cache, host=ADDR)
    port = await server.start()
    rcache = RenderCache()
    snaps = gc_paused(lambda: rendered(intents[0], topo, "r0", rcache))
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    clients = ctx.Process(target=_clients_main, args=(port, subscriptions(snaps, list(snaps)), ready, stop, True),
                          daemon=True)
    clients.start()
    figures: dict[str, list[float]] = {"render_ms": [], "push_ms": [], "render_cpu_ms": [], "push_cpu_ms": []}
    try:
        while not ready.is_set():
            await asyncio.sleep(0.05)
        await converge(cache, snaps)
        settle_gc()
        await asyncio.sleep(0.5)
        for i in range(changes):
            cpu, t = time.process_time(), time.perf_counter()
            new = gc_paused(lambda: rendered(intents[1 + i % 2], topo, f"r{i + 1}", rcache))  # noqa: B023
            cpu1, t1 = time.process_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            await converge(cache, new)
            if profile is not None:
                profile.disable()
            figures["render_ms"].append((t1 - t) * 1000)
            figures["push_ms"].append((time.perf_counter() - t1) * 1000)
            figures["render_cpu_ms"].append((cpu1 - cpu) * 1000)
            figures["push_cpu_ms"].append((time.process_time() - cpu1) * 1000)
            await asyncio.sleep(0.2)  # the ACKs' status settles; each change starts from a quiet loop
    finally:
        end_clients(clients, stop)
        await server.stop(0.1)
    size = changed_route_size(snaps[topo.sidecars[0].node_id]) + RESPONSE_FIELDS_B
    floor_ms, floor_cpu, _ = await grpc_floor(len(snaps), size)
    out = {k: pct(v, 50) for k, v in figures.items()}
    out.update(push_min_ms=min(figures["push_ms"]), push_max_ms=max(figures["push_ms"]),
               floor_ms=floor_ms, floor_cpu_ms=floor_cpu * 1000, streams=float(len(snaps)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="cProfile the pushes (their times then include it)")
    args = parser.parse_args()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    r = asyncio.run(run(args.services, args.proxies, args.changes, prof))
    print(f"one route x {args.changes} [delta]: {args.services} services, {r['streams']:.0f} streams (simulated),"
          f" medians")
    print(f"  render + check + serialise {r['render_ms']:.1f} ms ({r['render_cpu_ms']:.1f} ms CPU);"
          f" push/ACK {r['push_ms']:.1f} ms ({r['push_cpu_ms']:.1f} ms of this process's CPU),"
          f" range {r['push_min_ms']:.1f}-{r['push_max_ms']:.1f} ms")
    print(f"  floor: the same streams through bare gRPC aio, one message and one answer each: {r['floor_ms']:.1f} ms"
          f" ({r['floor_cpu_ms']:.1f} ms CPU); push/ACK / floor = {r['push_ms'] / r['floor_ms']:.1f}x,"
          f" push CPU / floor CPU = {r['push_cpu_ms'] / max(r['floor_cpu_ms'], 0.1):.1f}x")
    if prof is not None:
        report_profile("delta", prof, what=f"{args.changes} one-route pushes, {args.services} x {args.proxies}",
                       top=25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
