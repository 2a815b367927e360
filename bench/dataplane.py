"""Data-plane cost of lockgate's configuration: frontend sidecar -> reviews sidecar -> app.

Two Envoys configured by lockgate (control plane in this process, config rendered from intent) are
compared, in the same run, with the same two Envoys running a minimal hand-written static config that
does the same forwarding. Four HTTP/1.1 configurations: lockgate plaintext, lockgate mTLS (SPIFFE
certificates over SDS), hand-written plaintext and hand-written mTLS (the same certificates, from files).
Both mTLS configurations allow TLS 1.2-1.3 and negotiate TLS 1.3 (the bench prints what the sidecars'
stats saw). One gRPC pair: lockgate's config for a Service with `protocol: GRPC` (h2 between the sidecars
and to the app, the grpc_stats filter on the inbound side) against a hand-written static h2 config.

The HTTP/1.1 app is native: `openloop serve` (bench/openloop.c), one epoll thread answering every request
head with `200 ok` (a body gets a 400 and a close; the bench sends none). It used to be a third Envoy with
a direct response, but that Envoy's request processing and wake-up put the overhead row at 156-228 us p50
on this 2-core machine, above the 0.1 ms the figures must resolve, and hid the client's own cost inside
the app's. That Envoy stays as a reference row, "client -> Envoy direct response", and the table prints
its p50 minus the overhead row's: what one Envoy hop of work costs here (66-109 us in a full run). gRPC
still ends at an Envoy app: a direct response cannot answer gRPC (Envoy turns a local reply to a gRPC
request into a grpc-status error), so the app Envoy has a front listener with the gRPC-HTTP/1.1 reverse
bridge (it frames the message and adds `grpc-status: 0` trailers) in front of a direct-response listener:
a real grpcio client gets OK (checked on every path before measuring).

Latency: `bench/openloop.c`, built here with gcc into a temporary directory. It is open loop: request i is
due at start + i/rate and timed, with CLOCK_MONOTONIC, from when it was due (stalls are not hidden), over
keep-alive connections (HTTP/1.1, or h2c streams for gRPC: POST, application/grpc, te: trailers, one
pre-framed unary message). h2load's `--rps` was tried for gRPC and rejected: it submits in bursts and times
from the actual send (p50 ~3.5 ms against the app directly at 1000 rps). The client sleeps until
`--spin-us` (100) before each due time and polls from there: waking from a timer costs ~50 us here, and
that lateness counts in every latency (direct p50 ~97 us sleeping to the due time, ~50 us with 100 us of
polling; polling while waiting for responses too was worse, so responses are waited for asleep).

The client's overhead is the "client -> app (overhead)" row: the same client against the native app
directly, so client + loopback + a trivial server, the floor under every other row. Its p50 must be
<= 0.1 ms for the figures to resolve 0.1 ms.
Throughput: Debian's `wrk` (HTTP/1.1) and `h2load` (gRPC), closed loop.

Every measurement is interleaved (A B C D A B C D ..., the starting configuration rotating each round) and
repeated for several rounds; the tables show medians over rounds and lockgate / hand-written ratios.
Compare ratios within one run, never absolute figures across runs.

    python bench/dataplane.py [--rates 500,1000,2000] [--seconds 3] [--rounds 3] [--spin-us 100] [--quick]

Exit status: 0; 1 when the client's overhead p50 exceeds 0.1 ms (the figures are printed anyway); 2 when
gcc, wrk or h2load is missing (scripts/apt-deps installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from policies.identity import IssuedCert
from reconciler.load import load

ADDR = "127.0.0.1"
HERE = Path(__file__).resolve().parent
OVERHEAD_LIMIT_US = 100.0
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
REVERSE_BRIDGE = {"name": "envoy.filters.http.grpc_http1_reverse_bridge", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_http1_reverse_bridge.v3.FilterConfig",
    "content_type": "application/x-bench", "withhold_grpc_frames": True}}
TLS = "envoy.transport_sockets.tls"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
GRPC_PATH = "/bench.Echo/Call"
SPIN_US = 100.0
"""How long before each due time the client stops sleeping and polls (see the module docstring)."""
TOOLS = {"gcc": "gcc", "wrk": "wrk", "h2load": "nghttp2-client"}
"""Command -> the Debian package that has it."""

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
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {ports: [{name: grpc, port: 80, protocol: GRPC}], versions: [v1]}
"""


# --------------------------------------------------------------------------------------------- pure helpers


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence: the smallest value with at least q of the samples
    at or below it (so p99 of 100 samples is the 99th, never an interpolation between two)."""
    if not ordered:
        raise ValueError("no samples")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], not {q}")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class OpenLoopRun:
    """One open-loop run: latencies of good requests (microseconds, ascending) and what went wrong."""

    latencies_us: tuple[float, ...]
    errors: int
    late: int
    """Requests sent more than 1 ms after they were due (the client or its connections fell behind)."""
    max_lag_us: float

    def summary(self) -> dict[str, float]:
        """p50/p90/p99 in microseconds, with the counts, as the tables and the JSON line show them."""
        out = {f"p{q}": percentile(self.latencies_us, q / 100) for q in (50, 90, 99)} if self.latencies_us else {}
        return {**out, "n": len(self.latencies_us), "errors": self.errors, "late": self.late,
                "max_lag_us": self.max_lag_us}


def parse_openloop(text: str) -> OpenLoopRun:
    """bench/openloop.c's output: a summary line, then one latency per line in nanoseconds."""
    head, _, rest = text.partition("\n")
    m = re.fullmatch(r"openloop n=(\d+) errors=(\d+) late=(\d+) max_lag_us=([\d.]+)", head.strip())
    if m is None:
        raise ValueError(f"not openloop output: {head[:80]!r}")
    latencies = sorted(int(line) / 1000 for line in rest.split())
    if len(latencies) != int(m.group(1)):
        raise ValueError(f"openloop announced {m.group(1)} latencies and printed {len(latencies)}")
    return OpenLoopRun(tuple(latencies), int(m.group(2)), int(m.group(3)), float(m.group(4)))


def parse_wrk(text: str) -> float | None:
    """Requests per second from wrk's report; None if it reported none or saw errors (non-2xx answers or
    socket errors make a throughput figure meaningless)."""
    if re.search(r"Non-2xx or 3xx responses|Socket errors", text):
        return None
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return float(m.group(1)) if m else None


def parse_h2load(text: str) -> float | None:
    """Requests per second from h2load's report; None unless every request succeeded."""
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
    if rate is None or counts is None:
        return None
    done, succeeded, failed = int(counts.group(2)), int(counts.group(3)), int(counts.group(4))
    if failed or succeeded != done or done == 0:
        return None
    return float(rate.group(1))


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def medians(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Per key, the median over rounds."""
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def ratios(lockgate: Mapping[str, float], handwritten: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    """lockgate / hand-written per key (above 1: lockgate's configuration is slower, for latencies)."""
    return {k: lockgate[k] / handwritten[k] for k in keys}


def interleaved(labels: Sequence[str], rounds: int) -> list[str]:
    """A B C A B C ..., each round starting one configuration later, so no configuration always runs first
    (right after a warm-up or a wrk run) or always last."""
    n = len(labels)
    return [labels[(r + i) % n] for r in range(rounds) for i in range(n)]


def missing_tools(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The commands the bench needs and cannot find, each with its Debian package."""
    return [f"{cmd} (Debian package {pkg})" for cmd, pkg in TOOLS.items() if which(cmd) is None]


# --------------------------------------------------------------------------------------------- static configs


def free() -> int:
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return int(s.getsockname()[1])


def admin(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": ADDR, "port_value": port}}}


def listener(name: str, port: int, route: dict[str, Any], *, filters: Sequence[dict[str, Any]] = (),
             tls: dict[str, Any] | None = None) -> dict[str, Any]:
    """One HTTP listener (codec AUTO: HTTP/1.1 or h2c) with one catch-all route."""
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM, "stat_prefix": name, "codec_type": "AUTO", "http_filters": [*filters, ROUTER],
        "route_config": {"name": name, "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}]}}}]}
    if tls is not None:
        chain["transport_socket"] = {"name": TLS, "typed_config": tls}
    return {"name": name, "address": {"socket_address": {"address": ADDR, "port_value": port}},
            "filter_chains": [chain]}


def static_cluster(name: str, port: int, *, h2: bool = False, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ADDR, "port_value": port}}}}]}]}}
    if h2:
        out["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}
    if tls is not None:
        out["transport_socket"] = {"name": TLS, "typed_config": tls}
    return out


@dataclass(frozen=True)
class CertFiles:
    chain: Path
    key: Path
    root: Path


def common_tls(files: CertFiles, san: dict[str, str]) -> dict[str, Any]:
    """What a hand-written mTLS config says: TLS 1.2-1.3, our certificate, the root, the peer's SAN."""
    return {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": str(files.chain)},
                                  "private_key": {"filename": str(files.key)}}],
            "validation_context": {"trusted_ca": {"filename": str(files.root)},
                                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]}}


def write_cert(tmp: Path, name: str, cert: IssuedCert, root_pem: str) -> CertFiles:
    files = CertFiles(tmp / f"{name}.crt", tmp / f"{name}.key", tmp / "root.crt")
    files.chain.write_text(cert.cert_chain_pem)
    files.key.write_text(cert.private_key_pem)
    files.key.chmod(0o600)
    files.root.write_text(root_pem)
    return files


# --------------------------------------------------------------------------------------------- processes


class Envoys:
    """The bench's child processes: the Envoys and the native app; stop() ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, name: str, config: dict[str, Any], admin_port: int) -> None:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(config))
        self.procs.append(await asyncio.create_subprocess_exec(
            *envoy_argv(config_path=path, log_level="critical"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL))
        await wait_ready(ADDR, admin_port, timeout=30)

    async def static(self, name: str, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> None:
        port = free()
        await self.start(name, {"admin": admin(port), "static_resources": {
            "listeners": listeners, "clusters": clusters}}, port)

    async def native_app(self, binary: Path) -> int:
        """Start `openloop serve` on a free port; the port, once it says it is listening."""
        port = free()
        proc = await asyncio.create_subprocess_exec(str(binary), "serve", ADDR, str(port),
                                                    stdout=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        if line != b"serving\n":
            raise RuntimeError(f"openloop serve did not start: {line!r}, exit {proc.returncode}")
        return port

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.terminate()
                await p.wait()


@dataclass(frozen=True)
class Target:
    """Where a configuration is measured: the port the client sends to, the authority it names, gRPC or not,
    and the admin port of the Envoy whose stats say what it negotiated (0: none)."""

    port: int
    authority: str
    grpc: bool = False
    stats_admin: int = 0


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {out.decode(errors='replace')[-500:]}")
    return out.decode()


class Client:
    """The native clients: openloop (built here), wrk and h2load."""

    def __init__(self, tmp: Path, *, spin_us: float = SPIN_US) -> None:
        self.spin = ("-s", f"{spin_us:g}") if spin_us > 0 else ()
        self.binary = tmp / "openloop"
        self.body = tmp / "call.bin"
        self.body.write_bytes(grpc_frame(b"\x0a\x05bench"))  # field 1, "bench": any bytes do for the app

    async def build(self) -> None:
        await run("gcc", "-O2", "-o", str(self.binary), str(HERE / "openloop.c"))

    async def latency(self, t: Target, rate: int, seconds: float) -> OpenLoopRun:
        if t.grpc:
            out = await run(str(self.binary), *self.spin, "grpc", ADDR, str(t.port), t.authority, GRPC_PATH, str(rate),
                            str(seconds), "4", str(self.body))
        else:
            out = await run(str(self.binary), *self.spin, "h1", ADDR, str(t.port), t.authority, "/reviews", str(rate),
                            str(seconds), "32")
        return parse_openloop(out)

    async def throughput(self, t: Target, seconds: float) -> float | None:
        duration = f"{max(1, round(seconds))}s"
        if t.grpc:
            out = await run("h2load", "-t1", "-c4", "-m16", "-D", duration, "-d", str(self.body),
                            "-H", "content-type: application/grpc", "-H", "te: trailers",
                            "-H", f":authority: {t.authority}", f"http://{ADDR}:{t.port}{GRPC_PATH}")
            return parse_h2load(out)
        out = await run("wrk", "-t1", "-c16", f"-d{duration}", "-H", f"Host: {t.authority}",
                        f"http://{ADDR}:{t.port}/reviews")
        return parse_wrk(out)


def grpc_call(port: int, authority: str) -> str:
    """One real unary call with grpcio (blocking): the status it ended with."""
    import grpc

    with grpc.insecure_channel(f"{ADDR}:{port}", options=[("grpc.default_authority", authority)]) as channel:
        call = channel.unary_unary(GRPC_PATH)
        try:
            call(b"\x0a\x05bench", timeout=5)
        except grpc.RpcError as e:
            return str(e.code())
        return "StatusCode.OK"


def stats(admin_port: int, pattern: str) -> dict[str, int]:
    """Counters of one Envoy whose names match `pattern` and are non-zero (blocking)."""
    with urllib.request.urlopen(f"http://{ADDR}:{admin_port}/stats?filter={pattern}", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit() and int(value) > 0:
            out[name] = int(value)
    return out


# --------------------------------------------------------------------------------------------- the run


PLAIN_LG, PLAIN_HW = "lockgate plaintext", "hand-written plaintext"
MTLS_LG, MTLS_HW = "lockgate mTLS", "hand-written mTLS"
GRPC_LG, GRPC_HW = "lockgate gRPC (h2)", "hand-written gRPC (h2)"
DIRECT, GRPC_DIRECT = "client -> app (overhead)", "gRPC client -> app"
ENVOY_DIRECT = "client -> Envoy direct response"
"""Reference: the same client against an Envoy that answers itself (what one Envoy hop of work costs)."""
W = 32
"""Width of the configuration column."""
PAIRS = {"plaintext": (PLAIN_LG, PLAIN_HW), "mTLS": (MTLS_LG, MTLS_HW), "gRPC": (GRPC_LG, GRPC_HW)}
QS = ("p50", "p90", "p99")


async def setup(envoys: Envoys, client: Client, tmp: Path) -> tuple[dict[str, Target], AdsServer]:
    """Start the apps, the three lockgate pairs and the three hand-written pairs; where each is measured."""
    app_port = await envoys.native_app(client.binary)
    envoy_app_port, grpc_app_port, inner = free(), free(), free()
    await envoys.static("app", [
        listener("app", envoy_app_port, {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}),
        listener("grpc", grpc_app_port, {"route": {"cluster": "inner"}}, filters=[REVERSE_BRIDGE]),
        listener("inner", inner, {
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/x-bench"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}})],
        [static_cluster("inner", inner)])

    loaded = load({"mesh.yaml": INTENT.encode()})
    assert loaded.intent is not None, loaded.problems
    intent = loaded.intent
    cache = SnapshotCache()
    server = AdsServer(cache, host=ADDR)
    xds_port = await server.start()
    issuer = WorkloadIssuer(ttl=3600)
    root = new_root(now=datetime.now(UTC))
    issuer.add_authority("c1", new_intermediate(root, cluster="c1", now=datetime.now(UTC)))
    certs: dict[str, IssuedCert] = {}

    async def pair(index: int, service: str, app: int, *, mtls: bool) -> tuple[Sidecar, Sidecar, int]:
        """A frontend sidecar and a `service` sidecar in front of `app`, configured by lockgate over ADS;
        both, and the admin port of the second."""
        fe = Sidecar(f"c1/shop/frontend-v1-{index}", "shop", "frontend", "v1", "frontend-v1", ADDR, free(), free(), 1)
        up = Sidecar(f"c1/shop/{service}-v1-{index}", "shop", service, "v1", f"{service}-v1", ADDR, free(), free(), app)
        topo = ClusterTopology(cluster="c1", sidecars=(fe, up), ready=frozenset({up.node_id}))
        extensions = []
        if mtls:
            issued = issuer.certs_for(intent, topo, now=time.time())
            certs.update(issued)
            extensions.append(SecurityExtension(intent=intent, certs=issued, trust_bundle=issuer.trust_bundle))
        snaps = render(intent=intent, topology=topo, revision="bench", extensions=extensions)
        admins = {}
        for sc in (up, fe):
            snaps[sc.node_id].consistent()
            cache.set(sc.node_id, snaps[sc.node_id])
            admins[sc.node_id] = free()
            await envoys.start(sc.node_id.replace("/", "_"), bootstrap(
                node_id=sc.node_id, cluster="c1", xds_host=ADDR, xds_port=xds_port, admin_host=ADDR,
                admin_port=admins[sc.node_id]), admins[sc.node_id])
            assert await cache.wait_converged(sc.node_id, snaps[sc.node_id].version_all, timeout=30)
        return fe, up, admins[up.node_id]

    fe, _, _ = await pair(0, "reviews", app_port, mtls=False)
    fe_tls, up_tls, up_tls_admin = await pair(1, "reviews", app_port, mtls=True)
    fe_grpc, _, up_grpc_admin = await pair(2, "ratings", grpc_app_port, mtls=False)

    # Hand-written: A (frontend's outbound) -> B (the service's inbound) -> app, static, the fewest lines.
    hw: dict[str, int] = {}
    for name, app, h2 in (("plain", app_port, False), ("grpc", grpc_app_port, True)):
        a, b = free(), free()
        await envoys.static(f"hw-{name}-b", [listener("in", b, {"route": {"cluster": "app", "timeout": "0s"}})],
                            [static_cluster("app", app, h2=h2)])
        await envoys.static(f"hw-{name}-a", [listener("out", a, {"route": {"cluster": "b"}})],
                            [static_cluster("b", b, h2=h2)])
        hw[name] = a
    # Hand-written mTLS: the certificates the lockgate mTLS pair got over SDS, here from files.
    td = intent.mesh.spec.trust_domain
    fe_cert, rv_cert = certs[fe_tls.node_id], certs[up_tls.node_id]
    fe_files = write_cert(tmp, "frontend", fe_cert, "".join(issuer.trust_bundle))
    rv_files = write_cert(tmp, "reviews", rv_cert, "".join(issuer.trust_bundle))
    a, b, b_admin = free(), free(), free()
    await envoys.start("hw-mtls-b", {"admin": admin(b_admin), "static_resources": {
        "listeners": [listener("in", b, {"route": {"cluster": "app", "timeout": "0s"}}, tls={
            "@type": DOWNSTREAM_TLS, "require_client_certificate": True,
            "common_tls_context": common_tls(rv_files, {"prefix": f"spiffe://{td}/"})})],
        "clusters": [static_cluster("app", app_port)]}}, b_admin)
    await envoys.static("hw-mtls-a", [listener("out", a, {"route": {"cluster": "b"}})], [static_cluster("b", b, tls={
        "@type": UPSTREAM_TLS, "sni": "reviews.shop",
        "common_tls_context": common_tls(fe_files, {"exact": rv_cert.spiffe_id})})])

    targets = {
        DIRECT: Target(app_port, "app"),
        ENVOY_DIRECT: Target(envoy_app_port, "app"),
        PLAIN_LG: Target(fe.outbound_port, "reviews.shop"),
        PLAIN_HW: Target(hw["plain"], "reviews.shop"),
        MTLS_LG: Target(fe_tls.outbound_port, "reviews.shop", stats_admin=up_tls_admin),
        MTLS_HW: Target(a, "reviews.shop", stats_admin=b_admin),
        GRPC_DIRECT: Target(grpc_app_port, "app", grpc=True),
        GRPC_LG: Target(fe_grpc.outbound_port, "ratings.shop", grpc=True, stats_admin=up_grpc_admin),
        GRPC_HW: Target(hw["grpc"], "ratings.shop", grpc=True),
    }
    return targets, server


async def measure(client: Client, targets: dict[str, Target], *, rates: list[int], seconds: float,
                  rounds: int) -> dict[str, Any]:
    """Every configuration at every rate, interleaved over rounds; then closed-loop throughput, interleaved."""
    for label, t in targets.items():  # prove each path answers, and warm it up
        if t.grpc:
            status = await asyncio.to_thread(grpc_call, t.port, t.authority)
            assert status == "StatusCode.OK", (label, status)
        warm = await client.latency(t, 200, 0.5)
        assert warm.errors == 0 and len(warm.latencies_us) == 100, (label, warm.summary())
    http = [k for k, t in targets.items() if not t.grpc]
    grpc = [k for k, t in targets.items() if t.grpc]
    latency: dict[int, dict[str, list[dict[str, float]]]] = {rate: {} for rate in rates}
    for rate in rates:
        for group in (http, grpc):
            for label in interleaved(group, rounds):
                run_ = await client.latency(targets[label], rate, seconds)
                latency[rate].setdefault(label, []).append(run_.summary())
    tput: dict[str, list[float | None]] = {}
    for group in (http, grpc):
        for label in interleaved(group, rounds):
            tput.setdefault(label, []).append(await client.throughput(targets[label], seconds))
    return {"latency": latency, "throughput": tput}


def report(results: dict[str, Any], *, targets: dict[str, Target], rates: list[int], seconds: float,
           rounds: int, spin_us: float, tls_seen: dict[str, dict[str, int]],
           grpc_seen: dict[str, int]) -> tuple[dict[str, Any], bool]:
    """Print the tables; return the machine-readable summary and whether the client's overhead is in bounds."""
    print(f"dataplane: open-loop latency (bench/openloop.c, polling from {spin_us:g} us before each due time), "
          f"{seconds:g} s x {rounds} interleaved rounds per cell, Envoy --concurrency 1, HTTP/1.1 app: openloop "
          "serve; microseconds from when each request was due; medians over rounds")
    print(f"  {'configuration':{W}} {'rate':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'errors':>6} {'late':>5}")
    summary: dict[str, Any] = {"bench": "dataplane", "seconds": seconds, "rounds": rounds, "rates": rates,
                               "latency_us": {}, "ratios": {}, "throughput_rps": {}, "throughput_ratios": {}}
    overhead_ok = True
    for rate in rates:
        cells = results["latency"][rate]
        med: dict[str, dict[str, float]] = {}
        for label in targets:
            runs = cells[label]
            errors = sum(int(r["errors"]) for r in runs)
            late = sum(int(r["late"]) for r in runs)
            if any("p50" not in r for r in runs):
                print(f"  {label:{W}} {rate:6d} {'no answers':>26} {errors:6d} {late:5d}")
                continue
            med[label] = medians(runs, QS)
            p = med[label]
            print(f"  {label:{W}} {rate:6d} {p['p50']:8.1f} {p['p90']:8.1f} {p['p99']:8.1f} {errors:6d} {late:5d}")
            summary["latency_us"].setdefault(str(rate), {})[label] = {**p, "errors": errors, "late": late}
        direct = med.get(DIRECT, {}).get("p50", math.inf)
        ok = direct <= OVERHEAD_LIMIT_US
        overhead_ok &= ok
        print(f"  client overhead at {rate} rps: p50 {direct:.1f} us (client -> native app directly, app time "
              f"included): {'<=' if ok else 'ABOVE'} {OVERHEAD_LIMIT_US:.0f} us")
        if ENVOY_DIRECT in med and DIRECT in med:
            print(f"  one Envoy hop of work at {rate} rps: p50 {med[ENVOY_DIRECT]['p50'] - direct:.1f} us "
                  f"({ENVOY_DIRECT} minus the overhead row)")
        for name, (lg, hw) in PAIRS.items():
            if lg in med and hw in med:
                r = ratios(med[lg], med[hw], QS)
                summary["ratios"].setdefault(str(rate), {})[name] = r
                print(f"  ratio lockgate / hand-written, {name:9} at {rate} rps: "
                      + "  ".join(f"{q} {r[q]:.3f}" for q in QS))
    print(f"throughput (closed loop, median of {rounds} interleaved runs of {max(1, round(seconds))} s; "
          "HTTP/1.1: wrk -t1 -c16, gRPC: h2load -t1 -c4 -m16)")
    tput: dict[str, float] = {}
    for label, runs in results["throughput"].items():
        good = [v for v in runs if v is not None]
        if len(good) != len(runs):
            print(f"  {label:{W}} {'errors in a run':>14}")
            continue
        tput[label] = statistics.median(good)
        print(f"  {label:{W}} {tput[label]:9.0f} rps")
    summary["throughput_rps"] = tput
    for name, (lg, hw) in PAIRS.items():
        if lg in tput and hw in tput:
            summary["throughput_ratios"][name] = tput[lg] / tput[hw]
            print(f"  ratio lockgate / hand-written, {name:9}: {tput[lg] / tput[hw]:.3f}")
    for label, seen in tls_seen.items():
        print(f"  {label}: TLS versions at the inbound: {seen or 'none counted'}")
    print(f"  {GRPC_LG}: grpc_stats at the inbound: {grpc_seen or 'none counted'}")
    def p50s(label: str) -> dict[str, float | None]:
        return {str(rate): summary["latency_us"].get(str(rate), {}).get(label, {}).get("p50") for rate in rates}

    summary.update(client_overhead_p50_us=p50s(DIRECT), client_overhead_ok=overhead_ok, tls_versions=tls_seen,
                   grpc_stats=grpc_seen, envoy_direct_p50_us=p50s(ENVOY_DIRECT), http_app="openloop serve",
                   client_spin_us=spin_us)
    return summary, overhead_ok


async def main_async(rates: list[int], seconds: float, rounds: int, spin_us: float = SPIN_US) -> int:
    missing = missing_tools()
    if missing:
        print("dataplane: missing " + ", ".join(missing) + "; run scripts/apt-deps "
              "(or apt-get install -y gcc wrk nghttp2-client)", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix="lockgate-dataplane-")
    envoys = Envoys(Path(tmp.name))
    server = None
    try:
        client = Client(Path(tmp.name), spin_us=spin_us)
        await client.build()
        targets, server = await setup(envoys, client, Path(tmp.name))
        results = await measure(client, targets, rates=rates, seconds=seconds, rounds=rounds)
        tls_seen = {label: await asyncio.to_thread(stats, targets[label].stats_admin, r"ssl\.versions")
                    for label in (MTLS_LG, MTLS_HW)}
        grpc_seen = await asyncio.to_thread(stats, targets[GRPC_LG].stats_admin, r"\.grpc\.")
        summary, ok = report(results, targets=targets, rates=rates, seconds=seconds, rounds=rounds,
                             spin_us=spin_us, tls_seen=tls_seen, grpc_seen=grpc_seen)
        print(json.dumps(summary, sort_keys=True))
        return 0 if ok else 1
    finally:
        await envoys.stop()
        if server is not None:
            await server.stop(0.1)
        tmp.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rates", default="500,1000,2000", help="requests per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (medians over them)")
    parser.add_argument("--spin-us", type=float, default=SPIN_US,
                        help="poll instead of sleeping this long before each due time (0: sleep until it)")
    parser.add_argument("--quick", action="store_true", help="about 30 s: 1000 rps, 1 s cells, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds, args.rounds = "1000", 1.0, 2
    return asyncio.run(main_async([int(r) for r in args.rates.split(",")], args.seconds, args.rounds, args.spin_us))


if __name__ == "__main__":
    sys.exit(main())
