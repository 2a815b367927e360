"""Kubernetes: an EndpointSlice change -> the callers' EDS in the snapshot cache, through the operator.

The operator (kopf, the Kubernetes runtime, the reconcile loop) runs in-process against kmock, an emulated
API (no API server can be installed here). Each round creates or deletes an EndpointSlice listing one more
reviews pod and times until frontend's EDS changes in its control plane's cache: the API's watch,
kopf's index and event handler, the topology rebuilt from memory, one render of the mesh, the cache. The
same-run baseline is that render and cache set alone (the loop's push, called directly): the floor this
path adds the watch to.

    python bench/endpoints.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.xds.snapshot import ENDPOINT
from reconciler.cli.operator import Operator, OperatorConfig
from reconciler.runtime.base import Bind
from tests.fixtures.kube import OperatorThread, kube, slice_body
from tests.integration import test_operator as scenario

SLICES = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
FRONTEND = "east/shop/frontend-a"


async def main(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lockgate-bench-endpoints-"))
    async with kube() as k:
        op = Operator(config=OperatorConfig(cluster="east", state_dir=tmp / "state", xds=Bind("127.0.0.1", 0),
                                            webhook=None, metrics=None, standalone=True), api=k.api())
        thread = OperatorThread(op)
        await asyncio.to_thread(thread.start)
        try:
            await k.watched("pods", "endpointslices", "gitsources")
            await scenario.gitsource(k, scenario.repo(tmp))
            await scenario.until(lambda: op.session and op.session.reconciler.applied, timeout=60)
            for name, service, ip in (("frontend-a", "frontend", "10.0.0.1"), ("reviews-v1-a", "reviews", "10.0.0.2"),
                                      ("reviews-v1-b", "reviews", "10.0.0.3")):
                await k.create("/api/v1/namespaces/shop/pods", scenario.pod(name, service, "v1", ip))
            await k.create(SLICES, slice_body(namespace="shop", name="reviews-1", service="reviews", port=9080,
                                              endpoints=[("reviews-v1-a", "10.0.0.2", True)]))
            rec = op.session.reconciler  # type: ignore[union-attr]
            plane = rec.planes["east"]
            await scenario.until(lambda: (snap := plane.cache.get(FRONTEND)) is not None
                                 and "10.0.0.2" in str(dict(snap.items(ENDPOINT))), timeout=60)
            await asyncio.sleep(0.5)  # nothing else in flight
            watched: list[float] = []
            for i in range(rounds):
                before = plane.cache.get(FRONTEND).version(ENDPOINT)  # type: ignore[union-attr]
                t0 = time.monotonic()
                if i % 2 == 0:  # a second slice appears with reviews-v1-b, as the endpoints controller makes them
                    await k.create(SLICES, slice_body(namespace="shop", name="reviews-2", service="reviews", port=9080,
                                                      endpoints=[("reviews-v1-b", "10.0.0.3", True)]))
                else:
                    await k.delete(f"{SLICES}/reviews-2")
                deadline = t0 + 30
                while plane.cache.get(FRONTEND).version(ENDPOINT) == before:  # type: ignore[union-attr]
                    if time.monotonic() > deadline:
                        raise SystemExit(f"round {i}: frontend's EDS did not change within 30 s")
                    await asyncio.sleep(0.0005)
                watched.append((time.monotonic() - t0) * 1000)
                has_b = "10.0.0.3" in str(dict(plane.cache.get(FRONTEND).items(ENDPOINT)))  # type: ignore[union-attr]
                assert has_b == (i % 2 == 0), f"round {i}: the EDS does not show what the API says"

            async def push_once() -> float:
                t = time.perf_counter()
                await rec.push()  # render (in a worker thread) and cache set
                return (time.perf_counter() - t) * 1000

            floor = [thread.call(push_once) for _ in range(rounds)]
        finally:
            await asyncio.to_thread(thread.stop)
    med, fl = statistics.median(watched), statistics.median(floor)
    print(f"EndpointSlice created/deleted -> frontend's EDS in the cache ({rounds} rounds): "
          f"median {med:.1f} ms, max {max(watched):.1f} ms")
    print(f"baseline, the same render + cache set called directly: median {fl:.1f} ms; "
          f"watch path / floor = {med / fl:.1f}x (the rest: kmock's HTTP, the watch stream, kopf's handlers)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    asyncio.run(main(parser.parse_args().rounds))
