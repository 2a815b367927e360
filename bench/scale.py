"""Control-plane scale: 1000 services, 2000 route rules, 100 simulated proxies + 2 real Envoys.

The control plane (render, snapshot cache, ADS server) runs in this process; the simulated proxies are
real gRPC ADS clients in a second process that subscribe like Envoy (LDS/CDS/SRDS wildcard, then RDS/EDS by
name) and ACK every response. Two real Envoys (an ingress and a sidecar) join them. Prints:

- full push: every snapshot set -> every proxy ACKed all of it;
- one route change: one Route's weights change -> every proxy ACKed the new version;
- render time alone for both, and control-plane RSS;
- a same-run baseline with 10 proxies, as ratios;
- the floor: the same two real Envoys started on a static file holding the same final configuration
  (`mesh.envoy.static_bootstrap`), time to ready, in the same run; printed as lockgate / floor;
- the clients' own share of a full push (the simulated proxies' and Envoys' CPU over the cores): what a
  1 s full push leaves the control plane on this machine;
- the one route's floor: the same streams through bare gRPC aio, one message and one answer each, with
  nothing computed (`grpc_floor`), in the same run; printed as lockgate / floor.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.envoy import bootstrap, envoy_argv, static_bootstrap, wait_ready
from mesh.intent import Intent
from mesh.render import RenderCache, render
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds import wire
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import TOKEN_METADATA, AdsServer, forget_serialised, serialise_ahead
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET
from reconciler.load import load
from reconciler.loop import GC_SETTLE_S, Reconciler, UpConfig, gc_paused, settle_gc
from reconciler.runtime.base import Bind, Metrics, RuntimeStatus

ADDR = "127.0.0.1"


MESH_YAML = ("apiVersion: lockgate.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\n"
             "spec: {trustDomain: bench.local, clusters: [{name: c1}]}\n")


def service_yaml(i: int, *, canary_weight: int = 0) -> str:
    """Service s<i> (versions v1, v2) and its Route: a header rule to v2, then v1/v2 by weight."""
    ns, w = f"ns{i % 10}", canary_weight
    return (f"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
            "spec: {ports: [{name: http, port: 80}], versions: [v1, v2]}\n---\n"
            f"apiVersion: lockgate.io/v1alpha1\nkind: Route\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
            f"spec:\n  service: s{i}\n  hosts: [s{i}.bench.example]\n  http:\n"
            "    - name: testers\n      match: [{headers: {x-tester: {exact: 'yes'}}}]\n      route: [{version: v2}]\n"
            f"    - name: default\n      route: [{{version: v1, weight: {100 - w}}}, {{version: v2, weight: {w}}}]\n")


def intent_files(services: int, *, canary_weight: int = 0) -> dict[str, bytes]:
    """The bench mesh as an intent repository lays it out: one file per service (Service + Route; one
    file of 5000 would pass the loader's 1 MiB limit). `canary_weight`: s0's weight to v2."""
    files = {"mesh.yaml": MESH_YAML.encode()}
    for i in range(services):
        files[f"ns{i % 10}/s{i}.yaml"] = service_yaml(i, canary_weight=canary_weight if i == 0 else 0).encode()
    return files


def big_intent(services: int, *, canary_weight: int = 0) -> Intent:
    loaded = load(intent_files(services, canary_weight=canary_weight))
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


Subs = dict[str, tuple[list[str], list[str], list[str]]]
"""node id -> (EDS names, RDS names, SDS names) it subscribes to."""


def _clients_main(port: int, subs: Subs, ready: Any, stop: Any, delta: bool = False, token: bool = False) -> None:
    asyncio.run(_clients(port, subs, ready, stop, delta=delta, token=token))


async def _clients(port: int, subs: Subs, ready: Any, stop: Any, *, delta: bool = False, token: bool = False) -> None:
    """One ADS stream per simulated proxy: LDS, CDS, SRDS by wildcard (and SDS by name, when the snapshot has
    secrets), then RDS and EDS by the names it was given (a real Envoy reads them from its listeners and
    clusters, in C++ and in microseconds; doing that in Python here would make this process, not the
    control plane, what the bench measures). Every response is ACKed with its version and nonce. `token`:
    each stream carries `bench:<node id>` as its credential (what `BenchRuntime` accepts)."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2

    envelope = _envelope_class()

    def stream(channel: Any, method: str, request_type: Any) -> Any:
        # Responses decoded as an envelope (see _envelope_class): the simulated proxies stand for Envoys on
        # other machines, and decoding 100 x 2.5 MB of resources here would be this machine's CPU spent on
        # the bench, not on the control plane (the 2 real Envoys decode everything).
        return channel.stream_stream(f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{method}",
                                     request_serializer=request_type.SerializeToString,
                                     response_deserializer=envelope.FromString)

    eds_type = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    rds_type = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

    def metadata(node_id: str) -> Any:
        return ((TOKEN_METADATA, f"bench:{node_id}"),) if token else None

    async def one(node_id: str, channel: Any) -> None:
        call = stream(channel, "StreamAggregatedResources", discovery_pb2.DiscoveryRequest)(
            metadata=metadata(node_id))  # written to and read from directly: see one_delta
        eds, rds, sds = subs[node_id]
        names = {CLUSTER: [], LISTENER: [], SCOPED_ROUTE: [], eds_type: eds, rds_type: rds, SECRET: sds}

        def req(type_url: str, version: str = "", nonce: str = "") -> Any:
            r = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce)
            r.node.id = node_id
            r.resource_names.extend(names[type_url])
            return r

        for t in (SECRET, CLUSTER, LISTENER, SCOPED_ROUTE) if sds else (CLUSTER, LISTENER, SCOPED_ROUTE):
            await call.write(req(t))
        subscribed: set[str] = set()
        while (resp := await call.read()) is not grpc.aio.EOF:
            t = resp.type_url
            await call.write(req(t, resp.version_info, resp.nonce))  # ACK
            follow = {CLUSTER: eds_type, LISTENER: rds_type}.get(t)
            if follow and resp.resource and follow not in subscribed and names[follow]:
                subscribed.add(follow)
                await call.write(req(follow))

    async def one_delta(node_id: str, channel: Any) -> None:
        """The same subscriptions over delta xDS: LDS/CDS/SRDS wildcard, RDS/EDS names once the first answer
        that refers to them arrived; every response ACKed by its nonce. The stream is written to and read
        from directly (`call.write`, `call.read`) rather than through an async generator fed by a queue,
        which cost this process a task switch or two per ACK: 98 streams share it, and it stands for
        proxies on other machines (one-route change, same runs: its CPU 0.01-0.03 s instead of 0.04 s)."""
        call = stream(channel, "DeltaAggregatedResources", discovery_pb2.DeltaDiscoveryRequest)(
            metadata=metadata(node_id))
        eds, rds, sds = subs[node_id]
        first = True

        def req(type_url: str, nonce: str = "", subscribe: list[str] | None = None) -> Any:
            nonlocal first
            r = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                                    resource_names_subscribe=subscribe or [])
            if first:
                r.node.id = node_id
                first = False
            return r

        if sds:
            await call.write(req(SECRET, subscribe=sds))
        for t in (CLUSTER, LISTENER, SCOPED_ROUTE):
            await call.write(req(t))
        subscribed: set[str] = set()
        while (resp := await call.read()) is not grpc.aio.EOF:
            t = resp.type_url
            await call.write(req(t, resp.nonce))  # ACK
            follow = {CLUSTER: (eds_type, eds), LISTENER: (rds_type, rds)}.get(t)
            if follow and resp.resource and follow[0] not in subscribed and follow[1]:
                subscribed.add(follow[0])
                await call.write(req(follow[0], subscribe=follow[1]))

    channels = [grpc.aio.insecure_channel(f"{ADDR}:{port}", options=[("grpc.max_receive_message_length", 1 << 28)])
                for _ in range(4)]
    await _until_stopped([asyncio.create_task((one_delta if delta else one)(n, channels[i % 4]))
                          for i, n in enumerate(subs)], ready, stop)


async def _until_stopped(tasks: list[asyncio.Task[None]], ready: Any, stop: Any) -> None:
    """Say the client streams are up, run them until the bench sets `stop`, then end them."""
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


RESPONSE_FIELDS_B = 100
"""About what a DeltaDiscoveryResponse adds around its one resource (version, type URL, nonce, framing)."""


def changed_route_size(snapshot: Any) -> int:
    """Bytes of the route configuration a one-route change replaces (s0's), serialised as it is sent."""
    name = "outbound|s0.ns0"
    return len(wire.to_any_bytes(ROUTE, snapshot.items(ROUTE)[name], content_digest=snapshot.digests[ROUTE][name]))


def end_clients(clients: Any, stop: Any) -> None:
    """Tell a client process to end (its `stop` event), then kill it if it has not within 10 s."""
    stop.set()
    clients.join(10)
    if clients.is_alive():
        clients.kill()


def _raw(b: bytes) -> bytes:
    return b


def _echo_clients_main(port: int, streams: int, ready: Any, stop: Any) -> None:
    asyncio.run(_echo_clients(port, streams, ready, stop))


async def _echo_clients(port: int, streams: int, ready: Any, stop: Any) -> None:
    """`grpc_floor`'s clients: each stream answers every message with a short one, as an ACK does."""
    import grpc

    channels = [grpc.aio.insecure_channel(f"{ADDR}:{port}") for _ in range(4)]  # as the simulated proxies

    async def one(channel: Any) -> None:
        call = channel.stream_stream("/bench.Echo/Stream", request_serializer=_raw, response_deserializer=_raw)()
        await call.write(b"hello")
        while (msg := await call.read()) is not grpc.aio.EOF:
            await call.write(b"ack:" + msg[:8])

    await _until_stopped([asyncio.create_task(one(channels[i % 4])) for i in range(streams)], ready, stop)


async def grpc_floor(streams: int, size: int, *, rounds: int = 15) -> tuple[float, float, int]:
    """What a one-route push costs with nothing computed: `streams` gRPC aio streams (this process serving,
    another one answering, as in the bench) are each sent one `size`-byte message and read one answer.
    Median wall ms and server CPU s over `rounds`, and the answers read (every stream's, every round).
    Measured in the same run as the push it is the floor of (the machine's speed moves by a third within
    minutes): lockgate's own work is the difference."""
    import grpc

    payload = b"x" * size
    go = [asyncio.Event() for _ in range(rounds)]  # one per round, so a stream never polls between rounds
    done = [asyncio.Event() for _ in range(rounds)]
    answered = [0] * rounds

    async def handler(requests: Any, context: Any) -> None:
        it = requests.__aiter__()
        await it.__anext__()
        for i, event in enumerate(go):
            await event.wait()
            await context.write(payload)
            await it.__anext__()
            answered[i] += 1
            if answered[i] == streams:
                done[i].set()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(handler, request_deserializer=_raw,
                                                        response_serializer=_raw)}),))
    port = server.add_insecure_port(f"{ADDR}:0")
    await server.start()
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    clients = ctx.Process(target=_echo_clients_main, args=(port, streams, ready, stop), daemon=True)
    clients.start()
    walls: list[float] = []
    cpus: list[float] = []
    try:
        while not ready.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # every stream has sent its first message
        for i in range(rounds):
            cpu, t = time.process_time(), time.perf_counter()
            go[i].set()
            await asyncio.wait_for(done[i].wait(), 30)
            walls.append((time.perf_counter() - t) * 1000)
            cpus.append(time.process_time() - cpu)
            await asyncio.sleep(0.05)
    finally:
        end_clients(clients, stop)
        await server.stop(0)
    return pct(walls, 50), pct(cpus, 50), sum(answered)


def _envelope_class() -> Any:
    """A message with the fields a simulated proxy reads from a (Delta)DiscoveryResponse: both put the
    version in 1, the resources in 2, the type URL in 4 and the nonce in 5. `resource` is field 2 declared
    as one bytes field, which the wire format allows (the last occurrence wins): it tells whether any
    resource came without decoding thousands of them. Every other field is kept as unknown bytes."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="bench_envelope.proto", package="bench", syntax="proto3")
    msg = proto.message_type.add(name="Envelope")
    T = descriptor_pb2.FieldDescriptorProto
    for name, number, kind in (("version_info", 1, T.TYPE_STRING), ("resource", 2, T.TYPE_BYTES),
                               ("type_url", 4, T.TYPE_STRING), ("nonce", 5, T.TYPE_STRING)):
        msg.field.add(name=name, number=number, type=kind, label=T.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Envelope"))


# --- the control plane (this process) ----------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def converge(cache: SnapshotCache, snaps: dict[str, Any], timeout: float = 120,
                   acked: dict[str, float] | None = None) -> float:
    """Milliseconds from setting `snaps` until every proxy ACKed its snapshot; `acked` gets each
    proxy's own time (who was last, and by how much)."""
    t0 = time.perf_counter()
    for node, snap in snaps.items():
        cache.set(node, snap)

    async def one(node: str, version: str) -> bool:
        ok = await cache.wait_converged(node, version, timeout=timeout)
        if acked is not None:
            acked[node] = (time.perf_counter() - t0) * 1000
        return ok

    results = await asyncio.gather(*(one(n, s.version_all) for n, s in snaps.items()))
    if not all(results):
        missing = [n for n, ok in zip(snaps, results, strict=True) if not ok]
        raise TimeoutError(f"{len(missing)} proxies did not converge, e.g. {missing[:3]}")
    return (time.perf_counter() - t0) * 1000


async def floor(snaps: dict[str, Any], nodes: list[str], tmp: Path, free: Any, cpu_out: list[float],
                start_out: list[float] | None = None) -> float:
    """Milliseconds the given Envoys, started at once on static files holding their final snapshots, take
    to load them: what loading this configuration costs Envoy itself, control plane aside. The files are
    binary protobuf (`.pb`), the cheapest form Envoy reads (from JSON, each took 0.1-0.2 s more here, which
    is parsing JSON, not loading the mesh). The same Envoys started on an empty configuration are timed
    first, in the same run, and that start is subtracted: the proxies on xDS were started before the push
    began. Appends to `cpu_out` the CPU seconds they used loading (their empty start's taken off), and to
    `start_out` the empty start's milliseconds."""
    empty: dict[str, dict[str, Any]] = {node: {} for node in nodes}
    start_ms, start_cpu = await _static_ready(empty, tmp, free, "empty")
    ms, cpu = await _static_ready({node: snaps[node].to_json() for node in nodes}, tmp, free, "static")
    cpu_out.append(max(0.0, cpu - start_cpu))
    if start_out is not None:
        start_out.append(start_ms)
    return max(0.0, ms - start_ms)


async def _static_ready(configs: dict[str, dict[str, Any]], tmp: Path, free: Any, tag: str) -> tuple[float, float]:
    """(milliseconds until Envoys started at once on these static configurations are all ready, their CPU
    seconds by then)."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from google.protobuf import json_format

    paths, admins = [], []
    for node, parts in configs.items():
        config = static_bootstrap(**{k: parts.get(k, []) for k in (
            "listeners", "routes", "clusters", "endpoints", "scoped_routes")})
        admin = free()
        config["node"] = {"id": node, "cluster": "c1"}
        config["admin"] = {"address": {"socket_address": {"address": ADDR, "port_value": admin}}}
        message = bootstrap_pb2.Bootstrap()
        json_format.ParseDict(config, message)
        path = tmp / f"{tag}-{node.replace('/', '_')}.pb"
        path.write_bytes(message.SerializeToString())
        paths.append(path)
        admins.append(admin)
    procs = []
    t0 = time.perf_counter()
    try:
        for path in paths:
            procs.append(await asyncio.create_subprocess_exec(
                *envoy_argv(config_path=path, log_level="critical"), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL))
        await asyncio.gather(*(wait_ready(ADDR, a, timeout=60) for a in admins))
        ms = (time.perf_counter() - t0) * 1000
        return ms, proc_cpu(p.pid for p in procs)
    finally:
        for p in procs:
            p.terminate()
            await p.wait()


def rendered(intent: Intent, topo: ClusterTopology, revision: str, rcache: RenderCache) -> dict[str, Any]:
    """What the reconciler's render thread does (reconciler.pipeline.render_mesh, then the loop): render,
    check every snapshot is consistent, then serialise the new resources. Earlier rounds left out the
    check, which `up` runs on every push (46-52 ms of a one-route render before its memo was cut)."""
    snaps = render(intent=intent, topology=topo, revision=revision, cache=rcache)
    for snap in snaps.values():
        snap.consistent()
    serialise_ahead(snaps.values())
    return snaps


def subscriptions(snaps: dict[str, Any], nodes: list[str]) -> Subs:
    """What each simulated proxy subscribes to by name: the EDS, RDS and SDS names of its snapshot."""
    return {n: (sorted(snaps[n].items(ENDPOINT)), sorted(snaps[n].items(ROUTE)), sorted(snaps[n].items(SECRET)))
            for n in nodes}


def proc_cpu(pids: Iterable[int | None]) -> float:
    """CPU seconds (user + system) the given processes have used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        if pid is not None:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((ADDR, 0))
        return int(s.getsockname()[1])


async def run(services: int, proxies: int, envoys: bool, *, delta: bool = False,
              profile: Any = None, profile_one: Any = None) -> dict[str, float]:
    """One bench point. `profile`: a cProfile.Profile enabled around the full push only (render + push/ACK),
    `profile_one` around the one-route change (the same); their figures then measure the profiler too, so a
    profiled run's times are not reported as the point's."""
    free = free_port
    forget_serialised()  # every point starts cold: an earlier point's serialised resources would be reused
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
    # Render alone, before any client exists: the subscriptions are read from its snapshots. Its CPU is
    # counted into the full push's CPU below (render is part of every push).
    cpu = time.process_time()
    t = time.perf_counter()
    # As the reconcile loop renders: in a worker thread with the cyclic GC paused (reconciler.loop.gc_paused),
    # then serialising what is new (serialise_ahead), so "render" is the reconciler's whole render step.
    snaps = gc_paused(lambda: rendered(intent, topo, "r1", rcache))
    render_full = (time.perf_counter() - t) * 1000
    cpu_render_full = time.process_time() - cpu
    subs = subscriptions(snaps, simulated)
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
        if profile is not None:
            profile.enable()
        others: dict[str, list[int | None]] = {"sim": [clients.pid], "envoys": [p.pid for p in procs]}
        cpu = time.process_time()
        before = {k: proc_cpu(v) for k, v in others.items()}
        acked_full: dict[str, float] = {}
        full = await converge(cache, snaps, acked=acked_full)
        cpu_full = time.process_time() - cpu + cpu_render_full
        spent_full = {k: proc_cpu(v) - before[k] for k, v in others.items()}
        if profile is not None:
            profile.disable()
        await asyncio.sleep(0.1)
        settle_gc()  # what the reconciler does once a push has settled (reconciler.loop: GC_SETTLE_S)
        changed = big_intent(services, canary_weight=10)
        cpu = time.process_time()
        before = {k: proc_cpu(v) for k, v in others.items()}
        if profile_one is not None:
            profile_one.enable()
        t = time.perf_counter()
        snaps2 = gc_paused(lambda: rendered(changed, topo, "r2", rcache))
        render_one = (time.perf_counter() - t) * 1000
        acked: dict[str, float] = {}
        one = await converge(cache, snaps2, acked=acked)
        if profile_one is not None:
            profile_one.disable()
        sims_acked = [acked[n] for n in simulated]
        cpu_one = time.process_time() - cpu
        spent_one = {k: proc_cpu(v) - before[k] for k, v in others.items()}
        route_kb = len(json.dumps(dict(snaps2[topo.sidecars[0].node_id].items(
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration")))) / 1024
        rss = rss_mb()
        one_size = changed_route_size(snaps2[topo.sidecars[0].node_id])
        echo_ms, echo_cpu, _ = await grpc_floor(len(snaps2), one_size + RESPONSE_FIELDS_B)
        floor_cpu: list[float] = []
        floor_start: list[float] = []
        floor_ms = await floor(snaps2, real, Path(tmp.name), free, floor_cpu, floor_start) if real else 0.0
        return {"render_full_ms": render_full, "push_full_ms": full, "render_one_ms": render_one,
                "push_one_ms": one, "rss_mb": rss, "rss_before_mb": rss0, "route_kb": route_kb,
                "floor_ms": floor_ms, "cpu_full_s": cpu_full, "cpu_one_s": cpu_one,
                "grpc_floor_ms": echo_ms, "grpc_floor_cpu_s": echo_cpu, "one_size_b": float(one_size),
                "sim_cpu_full_s": spent_full["sim"], "envoy_cpu_full_s": spent_full["envoys"],
                "sim_cpu_one_s": spent_one["sim"], "envoy_cpu_one_s": spent_one["envoys"],
                "floor_cpu_s": sum(floor_cpu), "floor_start_ms": sum(floor_start),
                "one_ack_ingress_ms": acked.get(real[0], 0.0) if real else 0.0,
                "one_ack_sidecar_ms": acked.get(real[1], 0.0) if real else 0.0,
                "one_ack_sims_p50_ms": pct(sims_acked, 50) if sims_acked else 0.0,
                "one_ack_sims_max_ms": max(sims_acked, default=0.0),
                "full_ack_ingress_ms": acked_full.get(real[0], 0.0) if real else 0.0,
                "full_ack_sidecar_ms": acked_full.get(real[1], 0.0) if real else 0.0,
                "full_ack_sims_p50_ms": pct([acked_full[n] for n in simulated], 50) if simulated else 0.0,
                "full_ack_sims_max_ms": max((acked_full[n] for n in simulated), default=0.0)}
    finally:
        end_clients(clients, stop)
        for p in procs:
            p.terminate()
            await p.wait()
        await server.stop(0.1)
        tmp.cleanup()


# --- churn and idle: the reconcile loop `lockgate up` runs, on a real Git repository ------------------


def combine(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Several rounds of one bench point as one: each figure's median, the totals' (render + push/ACK)
    medians taken over the rounds' totals, and the totals' ranges. A 2-core VM shared with other jobs
    swings ±30% between runs; a median of three moves less, and the range says how much it swung."""
    import statistics

    totals = [{**r, "full_ms": r["render_full_ms"] + r["push_full_ms"],
               "one_ms": r["render_one_ms"] + r["push_one_ms"]} for r in rounds]
    out = {k: float(statistics.median(t[k] for t in totals)) for k in totals[0]}
    out["rounds"] = float(len(rounds))
    for key in ("full_ms", "one_ms"):
        out[key.replace("_ms", "_min_ms")] = min(t[key] for t in totals)
        out[key.replace("_ms", "_max_ms")] = max(t[key] for t in totals)
    return out


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile by nearest rank (no interpolation: every figure printed was measured)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def growth(small: Mapping[str, float], big: Mapping[str, float]) -> dict[str, float]:
    """big / small for every figure both points have (how each grows from one bench point to the next)."""
    return {k: big[k] / small[k] for k in small if k in big and small[k] > 0}


def commit_latencies(commits: Sequence[tuple[str, float]], acks: Iterable[tuple[float, str, str | None]],
                     nodes: Mapping[str, str | None]) -> list[float | None]:
    """Seconds from each commit to the moment every node had ACKed a snapshot of that commit or a later one.

    `commits`: (sha, time) in commit order; `acks`: (time, node, the revision the node's newest fully ACKed
    snapshot was rendered from), any order; `nodes`: every node that counts, with the revision it held
    before the first commit. A revision that is not among the commits (the one before) ranks below them
    all. None: a commit no ACK ever covered. A node ACKing a later commit covers the ones it skipped,
    which is what coalescing does: the skipped commits are served by a later push."""
    rank = {sha: i for i, (sha, _) in enumerate(commits)}
    held = {n: rank.get(rev or "", -1) for n, rev in nodes.items()}
    out: list[float | None] = [None] * len(commits)
    covered = 0
    for t, node, rev in sorted(acks, key=lambda a: a[0]):
        if node not in held:
            continue
        held[node] = max(held[node], rank.get(rev or "", -1))
        low = min(held.values())
        while covered <= low:
            out[covered] = max(0.0, t - commits[covered][1])
            covered += 1
    return out


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread name of this process (from /proc: which thread an idle cost comes from)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclass
class BenchRuntime:
    """The Runtime protocol over a fixed topology and no processes: the simulated proxies are the second
    process's ADS streams, each carrying `bench:<node id>` as its credential."""

    topo: ClusterTopology
    _callback: Callable[[], None] | None = None

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def authenticator(self, cluster: str) -> BenchRuntime:
        return self

    def node_for(self, token: str) -> str | None:
        return token.removeprefix("bench:") if token.startswith("bench:") else None

    def serves(self, cluster: str) -> bool:
        return cluster == self.topo.cluster

    def control_plane(self, cluster: str, *, index: int) -> Bind:
        return Bind(address=ADDR, port=0)

    async def add_cluster(self, *, name: str, xds: Bind) -> None:
        pass

    async def remove_cluster(self, name: str) -> None:
        pass

    async def apply(self, intent: Intent) -> None:
        pass

    def topology(self, cluster: str) -> ClusterTopology:
        return self.topo if cluster == self.topo.cluster else ClusterTopology(cluster=cluster)

    def metrics(self, cluster: str) -> Metrics | None:
        return None

    def status(self) -> RuntimeStatus:
        return RuntimeStatus()

    async def close(self) -> None:
        pass


@dataclass
class CountingReconciler(Reconciler):
    """The reconcile loop as `lockgate up` runs it, counting its pushes: `renders` (start on the monotonic
    clock, seconds the render took in its worker thread) and `landings` (seconds setting it into the caches
    held the event loop)."""

    renders: list[tuple[float, float]] = field(default_factory=list)
    landings: list[float] = field(default_factory=list)
    cycles: list[dict[str, float]] = field(default_factory=list)
    """Per applied revision, the milliseconds of each step (`Reconciler.stages`) and the whole ("total")."""

    async def apply_revision(self, sha: str) -> None:
        t = time.monotonic()
        await super().apply_revision(sha)
        if self.applied == sha:
            self.cycles.append({**self.stages, "total": (time.monotonic() - t) * 1000})

    async def _render(self) -> Any:
        t = time.monotonic()
        try:
            return await super()._render()
        finally:
            self.renders.append((t, time.monotonic() - t))

    def _push(self) -> None:
        t = time.monotonic()
        try:
            super()._push()
        finally:
            self.landings.append(time.monotonic() - t)


def _committer_main(repo: str, services: int, every: float, seconds: float, start: Any, out: Any) -> None:
    """Commit one Route change every `every` seconds for `seconds` (open loop: each commit is due at its
    slot however long the previous one took) with pygit2, as a user's `git commit` would land; reports
    (sha, monotonic time the commit returned). CLOCK_MONOTONIC is system-wide, so the times compare with
    the control plane's."""
    from reconciler.source.git import Pygit2Source

    source = Pygit2Source.open(repo)
    start.wait()
    t0, done = time.monotonic(), list[tuple[str, float]]()
    while (due := t0 + len(done) * every) < t0 + seconds:
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        k = len(done)
        i = (k * 37) % services  # a different service each time, so no commit undoes the previous one
        sha = source.commit(files={f"ns{i % 10}/s{i}.yaml": service_yaml(i, canary_weight=k % 99 + 1).encode()},
                            message=f"bench: churn {k}: s{i} canary weight {k % 99 + 1}", parent=source.head() or "",
                            author=("bench", "bench@example.org"))
        done.append((sha, time.monotonic()))
    out.put(done)


async def _wait_for(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def churn_and_idle(services: int, proxies: int, *, seconds: float, every: float, idle: float,
                         delta: bool, profile: Any = None) -> dict[str, Any]:
    """Commits through the real reconcile path, then the same reconciler idle.

    The seam: `Reconciler.run` itself (reconciler/loop.py), as `lockgate up` runs it, on a real Git
    repository of the mesh (one file per service), so every commit goes watch (inotify on the ref) ->
    read tree (Git worker) -> load (isolated worker process) -> render (reconciler/pipeline.py
    `render_mesh`, mTLS certificates and all) -> snapshot cache -> ADS. Only the Runtime is a stand-in
    (`BenchRuntime`: a fixed topology, no processes), and the proxies are simulated ADS clients in a
    second process; the commits come from a third, so neither's CPU is counted as the control plane's.
    `seconds` 0 skips the churn, `idle` 0 the idle measurement."""
    from reconciler.source.git import Pygit2Source, init_repo

    # The points run before this in the same process: drop what they memoised and collect what they left.
    # The reconciler's first full collection (GcSettler) scans every object of the process on the loop:
    # ~0.2 s when the churn runs alone, 0.63 s after the 5000-service point, 0.50 s with this (something
    # else of the points' still lives: run `--churn` alone for the reconciler's own loop lag).
    forget_serialised()
    settle_gc()
    tmp = tempfile.TemporaryDirectory(prefix="lockgate-churn-")
    root = Path(tmp.name)
    template = root / "template"
    for rel, data in intent_files(services).items():
        (template / rel).parent.mkdir(parents=True, exist_ok=True)
        (template / rel).write_bytes(data)
    repo = root / "repo"
    init_repo(repo, template=template)
    topo = topology(proxies, services, list(range(30000, 30000 + 2 * proxies + 1)))  # nothing listens there
    rec = CountingReconciler(config=UpConfig(repo=str(repo), state_dir=root / "state"),
                             source=Pygit2Source.open(str(repo)), runtime=BenchRuntime(topo), announced=True)
    stop = asyncio.Event()
    loop_task = asyncio.create_task(rec.run(stop))
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    clients: Any = None
    out: dict[str, Any] = {}
    try:
        t = time.monotonic()
        await _wait_for(lambda: rec.applied is not None and "c1" in rec.planes and rec.renders != [],
                        timeout=300, what="the first revision applied")
        out["first_apply_s"] = time.monotonic() - t
        plane = rec.planes["c1"]
        nodes = [topo.ingress.node_id] if topo.ingress else []
        nodes += [s.node_id for s in topo.sidecars]
        snaps = {n: plane.cache.get(n) for n in nodes}
        # Off the loop: reading 101 proxies' subscriptions and pickling them for the client process took ~1 s,
        # which the loop-lag watchdog reported as the reconciler's.
        subs = await asyncio.to_thread(subscriptions, snaps, nodes)
        clients = ctx.Process(target=_clients_main, args=(plane.port, subs, ready, done, delta, True), daemon=True)
        await asyncio.to_thread(clients.start)
        await _wait_for(ready.is_set, timeout=60, what="the simulated proxies")
        await _wait_for(lambda: all(st.acked_revision == rec.applied for n, st in plane.cache.status().items()
                                    if n in snaps), timeout=300, what="every proxy converged on the first revision")
        out["first_converged_s"] = time.monotonic() - t
        if seconds > 0:
            held = {n: plane.cache.status()[n].acked_revision for n in nodes}
            acks: list[tuple[float, str, str | None]] = []
            last: dict[str, str | None] = dict(held)

            def on_status(st: Any) -> None:
                if st.node_id in last and st.acked_revision != last[st.node_id]:
                    last[st.node_id] = st.acked_revision
                    acks.append((time.monotonic(), st.node_id, st.acked_revision))

            unsubscribe = plane.cache.subscribe(on_status)
            renders_before, cycles_before = len(rec.renders), len(rec.cycles)
            start, results = ctx.Event(), ctx.Queue()
            committer = ctx.Process(target=_committer_main, args=(str(repo), services, every, seconds, start,
                                                                  results), daemon=True)
            committer.start()
            await asyncio.sleep(1.0)  # the committer's interpreter starts and opens the repository
            cpu0, wall0, lag0 = time.process_time(), time.monotonic(), rec.lag.worst
            rec.lag.worst = 0.0
            start.set()
            commits: list[tuple[str, float]] = await asyncio.to_thread(results.get, True, seconds + 120)
            committer.join(10)
            final = commits[-1][0]
            await _wait_for(lambda: all(last[n] == final for n in nodes), timeout=120,
                            what="every proxy converged on the last commit")
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            unsubscribe()
            lat = commit_latencies(commits, acks, held)
            ok = [x * 1000 for x in lat if x is not None]
            renders = rec.renders[renders_before:]
            cycles = rec.cycles[cycles_before:]
            out["cycle_p50_ms"] = {k: pct([c[k] for c in cycles if k in c], 50) for k in (cycles[0] if cycles else {})}
            out.update(commits=len(commits), pushes=len(renders), converged=len(ok),
                       p50_ms=pct(ok, 50), p99_ms=pct(ok, 99), max_ms=max(ok, default=float("nan")),
                       render_p50_ms=pct([r[1] * 1000 for r in renders], 50),
                       render_max_ms=max((r[1] * 1000 for r in renders), default=float("nan")),
                       landing_p50_ms=pct([x * 1000 for x in rec.landings[renders_before:]], 50),
                       churn_cpu_s=cpu, churn_wall_s=wall, loop_lag_max_ms=rec.lag.worst * 1000,
                       commit_span_s=commits[-1][1] - commits[0][1])
            rec.lag.worst = max(rec.lag.worst, lag0)
        if idle > 0:
            await asyncio.sleep(GC_SETTLE_S + 1.0)  # the last push settles (its GC pass) before the window
            renders_before = len(rec.renders)
            threads0, cpu0, wall0 = thread_cpu(), time.process_time(), time.monotonic()
            await asyncio.sleep(idle)
            cpu, wall, threads1 = time.process_time() - cpu0, time.monotonic() - wall0, thread_cpu()
            out.update(idle_s=wall, idle_cpu_s=cpu, idle_pct=100 * cpu / wall,
                       idle_pushes=len(rec.renders) - renders_before,
                       idle_threads={k: v - threads0.get(k, 0.0) for k, v in threads1.items()
                                     if v - threads0.get(k, 0.0) > 0})
            if profile is not None:  # a second, profiled window: where the idle CPU goes (not the figure)
                profile.enable()
                await asyncio.sleep(min(idle, 20.0))
                profile.disable()
        out["rss_mb"] = rss_mb()
        return out
    finally:
        stop.set()
        await asyncio.gather(loop_task, return_exceptions=True)
        done.set()
        if clients is not None:
            clients.join(10)
            if clients.is_alive():
                clients.kill()
        await rec.close()
        tmp.cleanup()


def report_churn(services: int, proxies: int, mode: str, r: Mapping[str, Any], *, every: float) -> None:
    print(f"reconciler [{mode}]: {services} services, {proxies + 1} simulated proxies (ingress + {proxies} sidecars),"
          f" the `lockgate up` loop on a Git repository; first revision applied in {r['first_apply_s']:.1f} s,"
          f" every proxy converged {r['first_converged_s']:.1f} s after start")
    if "commits" in r:
        print(f"  churn: a commit every {every * 1000:.0f} ms for {r['commit_span_s']:.1f} s:"
              f" {r['commits']} commits -> {r['pushes']} pushes (render {r['render_p50_ms']:.0f} ms p50,"
              f" {r['render_max_ms']:.0f} ms max, in a worker thread; setting it into the caches"
              f" {r['landing_p50_ms']:.1f} ms p50 on the event loop)")
        if r.get("cycle_p50_ms"):
            print("  one applied revision, p50 ms per step (reconciler.loop Reconciler.stages; the push is render +"
                  " landing, after the push in flight): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r["cycle_p50_ms"].items()))
        print(f"  commit -> every proxy ACKed it or a later one: p50 {r['p50_ms']:.0f} ms   p99 {r['p99_ms']:.0f} ms"
              f"   max {r['max_ms']:.0f} ms   ({r['converged']}/{r['commits']} covered)")
        print(f"  control-plane CPU during churn: {r['churn_cpu_s']:.1f} s over {r['churn_wall_s']:.1f} s"
              f" ({100 * r['churn_cpu_s'] / r['churn_wall_s']:.0f}% of a core); event-loop lag max"
              f" {r['loop_lag_max_ms']:.0f} ms")
    if "idle_pct" in r:
        top = sorted(r["idle_threads"].items(), key=lambda kv: -kv[1])[:4]
        print(f"  idle: {r['idle_cpu_s']:.2f} CPU s over {r['idle_s']:.0f} s = {r['idle_pct']:.2f}% of a core"
              f" (process CPU time / wall; {r['idle_pushes']} pushes); target <= 1%:"
              f" {'met' if r['idle_pct'] <= 1 else 'NOT met'}; by thread: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in top))
    print(f"  RSS {r['rss_mb']:.0f} MB")


def report(services: int, proxies: int, mode: str, base: dict[str, float] | None, big: dict[str, float]) -> None:
    print(f"scale [{mode}]: {services} services, {2 * services} route rules, "
          f"{proxies} proxies (2 real Envoys), pid {os.getpid()}")
    rows = [("baseline 10 proxies", base)] if base is not None else []
    for label, r in (*rows, (f"{proxies} proxies", big)):
        print(f"  {label:20} full: render {r['render_full_ms']:7.0f} ms + push/ACK {r['push_full_ms']:7.0f} ms"
              f"   one route: render {r['render_one_ms']:6.0f} ms + push/ACK {r['push_one_ms']:6.0f} ms"
              f"   RSS {r['rss_mb']:.0f} MB   (route config {r['route_kb']:.0f} KiB per sidecar)")
    full = big.get("full_ms", big["render_full_ms"] + big["push_full_ms"])
    one = big.get("one_ms", big["render_one_ms"] + big["push_one_ms"])
    if big.get("rounds", 1) > 1:
        print(f"  {proxies} proxies: medians of {big['rounds']:.0f} rounds; full push {big['full_min_ms']:.0f}-"
              f"{big['full_max_ms']:.0f} ms, one route {big['one_min_ms']:.0f}-{big['one_max_ms']:.0f} ms")
    print(f"  CPU seconds per push (control-plane process, time.process_time(): every thread of it):"
          f" full {big['cpu_full_s']:.2f} s, one route {big['cpu_one_s']:.2f} s")
    print(f"  CPU seconds of the others on this machine's {os.cpu_count()} cores, full / one route:"
          f" the {proxies - 2} simulated proxies {big['sim_cpu_full_s']:.2f} / {big['sim_cpu_one_s']:.2f} s,"
          f" the 2 real Envoys {big['envoy_cpu_full_s']:.2f} / {big['envoy_cpu_one_s']:.2f} s")
    if base is not None:
        print(f"  ratio {proxies}/10 proxies: full {full / (base['render_full_ms'] + base['push_full_ms']):.1f}x,"
              f" one route {one / (base['render_one_ms'] + base['push_one_ms']):.1f}x")
    busy_full = big["cpu_full_s"] + big["sim_cpu_full_s"] + big["envoy_cpu_full_s"]
    busy_one = big["cpu_one_s"] + big["sim_cpu_one_s"] + big["envoy_cpu_one_s"]
    cores = os.cpu_count() or 1
    print(f"  this machine's own floor: every process's CPU over {cores} cores, full {busy_full:.2f} s ="
          f" {busy_full / cores * 1000:.0f} ms, one route {busy_one:.2f} s = {busy_one / cores * 1000:.0f} ms"
          f" (wall time can be no less; the render, {big['render_full_ms']:.0f} ms full, runs on one core)")
    clients = big["sim_cpu_full_s"] + big["envoy_cpu_full_s"]
    least = big["sim_cpu_full_s"] + big["floor_cpu_s"] if big["floor_cpu_s"] else clients
    print(f"  the clients' own share of a full push: the simulated proxies and the Envoys {clients:.2f} CPU s ="
          f" {clients / cores * 1000:.0f} ms of {cores} cores ({least / cores * 1000:.0f} ms with the Envoys at"
          f" their from-a-file CPU); a 1000 ms full push on this machine leaves the control plane"
          f" {max(0.0, cores - clients):.2f} CPU s for render and push (it used {big['cpu_full_s']:.2f})")
    if big.get("full_ack_ingress_ms"):
        print(f"  full push, ACKed after the push began: the ingress Envoy {big['full_ack_ingress_ms']:.0f} ms,"
              f" the sidecar Envoy {big['full_ack_sidecar_ms']:.0f} ms, the simulated proxies p50"
              f" {big['full_ack_sims_p50_ms']:.0f} / max {big['full_ack_sims_max_ms']:.0f} ms")
    if big["one_ack_ingress_ms"]:
        print(f"  one route, ACKed after the push began: the ingress Envoy (scoped: one route configuration per exposed"
              f" host) {big['one_ack_ingress_ms']:.0f} ms, the sidecar Envoy {big['one_ack_sidecar_ms']:.0f} ms,"
              f" the simulated proxies p50 {big['one_ack_sims_p50_ms']:.0f} / max {big['one_ack_sims_max_ms']:.0f} ms")
    print(f"  floor: the 2 real Envoys load the same final config from a static protobuf file in"
          f" {big['floor_ms']:.0f} ms"
          f" (ready after {big['floor_ms'] + big.get('floor_start_ms', 0):.0f} ms, less the"
          f" {big.get('floor_start_ms', 0):.0f} ms they take to start on an empty one);"
          f" lockgate full push / floor = {full / big['floor_ms']:.1f}x"
          f" (their CPU: {big['floor_cpu_s']:.2f} s from a file, {big['envoy_cpu_full_s']:.2f} s over xDS)")
    if big.get("grpc_floor_ms"):
        print(f"  one route's floor: the same {proxies + 1} streams each sent one"
              f" {big['one_size_b'] + RESPONSE_FIELDS_B:.0f}-byte"
              f" message and read its answer through bare gRPC aio, nothing computed: {big['grpc_floor_ms']:.0f} ms"
              f" ({big['grpc_floor_cpu_s'] * 1000:.0f} ms of this process's CPU); lockgate's push/ACK / floor ="
              f" {big['push_one_ms'] / big['grpc_floor_ms']:.1f}x, render + push / floor ="
              f" {one / big['grpc_floor_ms']:.1f}x")
    print(f"  targets: full <= 1000 ms: {full:.0f} ms {'met' if full <= 1000 else 'NOT met'};"
          f" one route <= 50 ms: {one:.0f} ms {'met' if one <= 50 else 'NOT met'};"
          f" RSS <= 300 MB: {big['rss_mb']:.0f} MB {'met' if big['rss_mb'] <= 300 else 'NOT met'}")


def headline(r: Mapping[str, float]) -> dict[str, float]:
    """The figures a bench point is compared by: full push and one-route change (render + push/ACK), RSS,
    CPU seconds per push."""
    return {"full push ms": r.get("full_ms", r["render_full_ms"] + r["push_full_ms"]),
            "one route ms": r.get("one_ms", r["render_one_ms"] + r["push_one_ms"]),
            "RSS MB": r["rss_mb"], "CPU s full push": r["cpu_full_s"], "CPU s one route": r["cpu_one_s"]}


def report_growth(mode: str, points: Sequence[tuple[int, int, dict[str, float]]]) -> None:
    (s0, p0, small), (s1, p1, big) = points[0], points[-1]
    a, b = headline(small), headline(big)
    ratios = growth(a, b)
    print(f"growth [{mode}] {s0} services x {p0} proxies -> {s1} x {p1}"
          f" ({s1 / s0:.0f}x services, {p1 / p0:.0f}x proxies):")
    for k, r in ratios.items():
        print(f"  {k:16} {a[k]:9.2f} -> {b[k]:9.2f}   {r:5.1f}x")


def report_profile(mode: str, prof: Any, *, what: str, top: int = 10) -> None:
    """The top functions by cumulative and by own time, and the shares of the main thread's time spent in
    render, serialisation, the ADS protocol, gRPC's send, and waiting on the loop's selector (the clients
    decoding and ACKing, gRPC's C threads sending). cProfile sees the main thread only."""
    import io
    import pstats

    stats = pstats.Stats(prof, stream=io.StringIO())
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())

    def name(key: tuple[str, int, str]) -> str:
        path, line, func = key
        return f"{Path(path).parent.name}/{Path(path).name}:{line}({func})" if line else func

    def cumulative(pred: Callable[[str, str], bool]) -> float:
        return sum(v[3] for (path, _line, func), v in raw.items() if pred(path, func))

    print(f"profile [{mode}] {what}: {total:.2f} s of main-thread time")
    for title, col in (("cumulative", 3), ("own (self) time", 2)):
        print(f"  top {top} by {title}:")
        for key, v in sorted(raw.items(), key=lambda kv: -kv[1][col])[:top]:
            print(f"    {v[col]:7.3f} s  {100 * v[col] / total:5.1f}%  {v[1]:8d} calls  {name(key)}")
    shares = {
        "render (mesh/render build.render)": cumulative(lambda p, f: p.endswith("render/build.py") and f == "render"),
        "serialisation (wire.to_any_bytes)": cumulative(lambda p, f: p.endswith("xds/wire.py") and f == "to_any_bytes"),
        "ADS protocol (pending + on_request, incl. serialisation)": cumulative(
            lambda p, f: p.endswith("xds/server.py") and f in ("pending", "on_request")),
        "response bytes joined (_serialize)": cumulative(
            lambda p, f: p.endswith("xds/server.py") and f == "_serialize"),
        "gRPC send (grpc aio write)": cumulative(lambda p, f: "grpc" in p and f == "write"),
        "waiting in the selector (clients ACKing)": cumulative(lambda p, f: "epoll" in f),
    }
    for k, share in shares.items():
        print(f"  {k:58} {share:7.3f} s  {100 * share / total:5.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--point", type=int, help="one bench point: N services and N/10 simulated proxies")
    parser.add_argument("--grow", action="store_true", help="the 1000 x 100 and 5000 x 500 points, and the growth")
    parser.add_argument("--xds", choices=("sotw", "delta", "both"), default="both")
    parser.add_argument("--churn", action="store_true", help="commits through the reconcile loop (at --services)")
    parser.add_argument("--churn-seconds", type=float, default=30.0)
    parser.add_argument("--churn-every", type=float, default=0.1, help="seconds between commits")
    parser.add_argument("--idle", type=float, default=0.0, metavar="S", help="the reconciler idle for S seconds")
    parser.add_argument("--profile", action="store_true", help="cProfile the full push, the one route (and the idle)")
    parser.add_argument("--quick", action="store_true", help="100 services, 10 proxies, 5 s churn: while developing")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each point; medians are reported")
    args = parser.parse_args()
    if args.quick:
        args.services, args.proxies, args.churn_seconds = 100, 10, 5.0
        args.idle = min(args.idle, 5.0)
    points = [(args.services, args.proxies)]
    if args.point:
        points = [(args.point, args.point // 10)]
    if args.grow:
        points = [(100, 10), (500, 50)] if args.quick else [(1000, 100), (5000, 500)]
    reconciler_only = (args.churn or args.idle) and not (args.grow or args.point)
    for mode in ("sotw", "delta") if args.xds == "both" else (args.xds,):
        delta = mode == "delta"
        if not reconciler_only:
            results = []
            for i, (services, proxies) in enumerate(points):
                base = asyncio.run(run(services, 10, envoys=False, delta=delta)) if i == 0 else None
                big = combine([asyncio.run(run(services, proxies, envoys=True, delta=delta))
                               for _ in range(max(1, args.rounds))])
                report(services, proxies, mode, base, big)
                results.append((services, proxies, big))
            if len(results) > 1:
                report_growth(mode, results)
            if args.profile:
                import cProfile

                prof, prof_one = cProfile.Profile(), cProfile.Profile()
                asyncio.run(run(points[0][0], points[0][1], envoys=True, delta=delta, profile=prof,
                                profile_one=prof_one))
                report_profile(mode, prof, what=f"full push (render + push/ACK), {points[0][0]} x {points[0][1]}")
                report_profile(mode, prof_one, what=f"one-route change (render + push/ACK), {points[0][0]} x "
                                                    f"{points[0][1]}", top=25)
        if args.churn or args.idle:
            import cProfile

            idle_prof = cProfile.Profile() if args.profile and args.idle else None
            r = asyncio.run(churn_and_idle(args.services, args.proxies, seconds=args.churn_seconds if args.churn else 0,
                                           every=args.churn_every, idle=args.idle, delta=delta, profile=idle_prof))
            report_churn(args.services, args.proxies, mode, r, every=args.churn_every)
            if idle_prof is not None:
                report_profile(mode, idle_prof, what="the idle reconciler", top=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
