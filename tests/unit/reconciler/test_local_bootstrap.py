"""The bootstrap the local runtime writes for each Envoy: a credential on the ADS stream, admin on a Unix
socket only, a stats listener that routes nothing but `GET /stats/prometheus`, and a short xDS reconnect
backoff. Parsed as Envoy's own Bootstrap proto, then checked by Envoy itself (`--mode validate`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf import json_format

from mesh.envoy import ADMIN_CLUSTER, STATS_PATH, admin_address, bootstrap, validate_config
from mesh.xds.server import TOKEN_METADATA


def config(tmp_path: Path, **extra: object) -> dict[str, object]:
    return bootstrap(node_id="east/shop/reviews-v1-0", cluster="east", xds_host="127.0.1.1", xds_port=18000,
                     admin_socket=tmp_path / "a.sock", stats_host="127.0.1.1", stats_port=19000,
                     **extra)  # type: ignore[arg-type]


def test_the_token_travels_as_initial_metadata_of_the_ads_stream(tmp_path: Path) -> None:
    msg = json_format.ParseDict(config(tmp_path, xds_token="s3cret"), bootstrap_pb2.Bootstrap())
    (grpc,) = msg.dynamic_resources.ads_config.grpc_services
    assert [(h.key, h.value) for h in grpc.initial_metadata] == [(TOKEN_METADATA, "s3cret")]
    untokened = json_format.ParseDict(config(tmp_path), bootstrap_pb2.Bootstrap())
    assert not untokened.dynamic_resources.ads_config.grpc_services[0].initial_metadata


def test_the_ads_stream_is_retried_within_half_a_second(tmp_path: Path) -> None:
    msg = json_format.ParseDict(config(tmp_path), bootstrap_pb2.Bootstrap())
    backoff = msg.dynamic_resources.ads_config.grpc_services[0].envoy_grpc.retry_policy.retry_back_off
    assert backoff.base_interval.ToMilliseconds() == 100
    assert backoff.max_interval.ToMilliseconds() == 500  # Envoy's default: 30 s


def test_admin_is_a_private_unix_socket_and_only_stats_are_on_tcp(tmp_path: Path) -> None:
    msg = json_format.ParseDict(config(tmp_path), bootstrap_pb2.Bootstrap())
    assert msg.admin.address.WhichOneof("address") == "pipe"
    assert (msg.admin.address.pipe.path, msg.admin.address.pipe.mode) == (str(tmp_path / "a.sock"), 0o600)
    (listener,) = msg.static_resources.listeners
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (
        "127.0.1.1", 19000)
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    (vhost,) = hcm.route_config.virtual_hosts
    to_admin, rest = vhost.routes
    assert (to_admin.match.path, to_admin.route.cluster) == (STATS_PATH, ADMIN_CLUSTER)
    assert [(h.name, h.string_match.exact) for h in to_admin.match.headers] == [(":method", "GET")]
    assert (rest.match.prefix, rest.direct_response.status) == ("/", 404)
    admin = next(c for c in msg.static_resources.clusters if c.name == ADMIN_CLUSTER)
    (endpoint,) = admin.load_assignment.endpoints[0].lb_endpoints
    assert endpoint.endpoint.address.pipe.path == str(tmp_path / "a.sock")
    assert admin_address(tmp_path / "a.sock") == f"unix:{tmp_path / 'a.sock'}"


def test_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    assert asyncio.run(validate_config(config(tmp_path, xds_token="t"), workdir=tmp_path)) is None


def test_admin_is_one_of_socket_or_tcp() -> None:
    common = {"node_id": "n", "cluster": "c", "xds_host": "127.0.0.1", "xds_port": 1}
    with pytest.raises(ValueError, match="either admin_socket or admin_host/admin_port"):
        bootstrap(**common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either admin_socket or admin_host/admin_port"):
        bootstrap(**common, admin_socket=Path("/x"), admin_port=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stats listener needs"):
        bootstrap(**common, admin_host="127.0.0.1", admin_port=2, stats_host="127.0.0.1",  # type: ignore[arg-type]
                  stats_port=3)


def test_wait_ready_and_admin_request_go_through_the_unix_socket(tmp_path: Path) -> None:
    from aiohttp import web

    from mesh.envoy import admin_request, wait_ready

    answers = [503, 200]
    socket = tmp_path / "admin.sock"

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(status=answers.pop(0) if len(answers) > 1 else answers[0], text="LIVE\n")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.UnixSite(runner, str(socket)).start()
            await wait_ready(socket, timeout=5)
            assert answers == [200]
            await wait_ready(admin_address(socket), timeout=5)  # the `unix:` spelling status uses
            status, body = await asyncio.to_thread(admin_request, admin_address(socket), "/ready")
            assert (status, body) == (200, b"LIVE\n")
        finally:
            await runner.cleanup()
        with pytest.raises(TimeoutError, match=rf"^Envoy admin at unix:{tmp_path}/nothing\.sock not ready after 0\.2s"):
            await wait_ready(tmp_path / "nothing.sock", timeout=0.2)

    asyncio.run(scenario())
