"""The readiness probes every start-up wait uses (mesh/probe.py, and Envoy's `wait_ready` on top), against
small servers on 127.0.0.1: ready, not yet, never, and a peer that accepts and then hangs."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from mesh.envoy import wait_ready
from mesh.probe import wait_http, wait_tcp

LOOPBACK = "127.0.0.1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def http_server(routes: dict[str, Handler]) -> AsyncIterator[int]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@asynccontextmanager
async def silent_server(hang_first: int = 10**6) -> AsyncIterator[tuple[int, list[int]]]:
    """Accepts connections and never answers the first `hang_first` of them; later ones get a 200."""
    seen: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        writers.append(writer)
        try:
            if len(seen) <= hang_first:
                await reader.read()  # until the client gives up
            else:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), seen
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def test_wait_tcp_returns_once_something_listens_and_names_what_it_waited_for() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda _r, w: w.close(), LOOPBACK, 0)
        try:
            await wait_tcp(LOOPBACK, int(server.sockets[0].getsockname()[1]), timeout=2)
        finally:
            server.close()
            await server.wait_closed()
        port = free_port()  # nothing listens there
        t0 = time.monotonic()
        refused = rf"TCP 127\.0\.0\.1:{port} not ready after 0\.2s \(last: ConnectionRefused"
        with pytest.raises(TimeoutError, match=refused):
            await wait_tcp(LOOPBACK, port, timeout=0.2)
        assert 0.2 <= time.monotonic() - t0 < 1.0
        with pytest.raises(TimeoutError, match=r"^the app not ready after 0\.1s"):
            await wait_tcp(LOOPBACK, port, timeout=0.1, name="the app")

    asyncio.run(scenario())


def test_wait_http_polls_until_ok_and_shows_the_last_answer() -> None:
    calls: list[str] = []

    async def warming(_request: web.Request) -> web.Response:
        calls.append("warming")
        if len(calls) < 3:
            return web.Response(status=503, text="PRE_INITIALIZING\n")
        return web.Response(text="LIVE\n")

    async def never(_request: web.Request) -> web.Response:
        return web.Response(status=503, text="PRE_INITIALIZING\n")

    async def scenario() -> None:
        async with http_server({"/ready": warming, "/never": never}) as port:
            await wait_http(f"http://{LOOPBACK}:{port}/ready", timeout=5, interval=0.01)
            assert len(calls) == 3
            await wait_http(f"http://{LOOPBACK}:{port}/ready", timeout=5, ok=lambda status, body: b"LIVE" in body)
            last = r"/never not ready after 0\.3s \(last: HTTP 503 'PRE_INITIALIZING'\)"
            with pytest.raises(TimeoutError, match=last):
                await wait_http(f"http://{LOOPBACK}:{port}/never", timeout=0.3, interval=0.01)
            # `ok` decides: here any answer at all means ready.
            await wait_http(f"http://{LOOPBACK}:{port}/never", timeout=1, ok=lambda _status, _body: True)
            with pytest.raises(TimeoutError, match="HTTP 404"):
                await wait_http(f"http://{LOOPBACK}:{port}/missing", timeout=0.1)
        t0 = time.monotonic()
        with pytest.raises(ValueError):  # a URL no attempt can reach fails at once
            await wait_http("http://", timeout=5)
        assert time.monotonic() - t0 < 1

    asyncio.run(scenario())


def test_a_peer_that_hangs_costs_one_attempt_not_the_whole_wait() -> None:
    async def scenario() -> None:
        async with silent_server(hang_first=1) as (port, seen):
            t0 = time.monotonic()
            await wait_http(f"http://{LOOPBACK}:{port}/ready", timeout=5, attempt_timeout=0.2, interval=0.01)
            assert len(seen) == 2 and time.monotonic() - t0 < 2
        async with silent_server() as (port, seen):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"not ready after 0\.5s \(last: no answer within"):
                await wait_http(f"http://{LOOPBACK}:{port}/ready", timeout=0.5, attempt_timeout=0.2, interval=0.01)
            assert len(seen) >= 2 and time.monotonic() - t0 < 1.5  # the total timeout holds too

    asyncio.run(scenario())


def test_wait_http_ignores_the_proxy_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A workload's environment points HTTP_PROXY at its own sidecar: a probe must not go through it."""
    proxied: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        proxied.append(str(request.url))
        return web.Response(status=502)

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def scenario() -> None:
        async with http_server({"/{tail:.*}": proxy}) as proxy_port, http_server({"/ready": ready}) as port:
            for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
                monkeypatch.setenv(var, f"http://{LOOPBACK}:{proxy_port}")
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            await wait_http(f"http://{LOOPBACK}:{port}/ready", timeout=2)
        assert proxied == []

    asyncio.run(scenario())


def test_envoy_wait_ready_on_the_probe() -> None:
    answers = [503, 503, 200]

    async def admin_ready(_request: web.Request) -> web.Response:
        status = answers.pop(0) if len(answers) > 1 else answers[0]
        return web.Response(status=status, text="LIVE\n" if status == 200 else "PRE_INITIALIZING\n")

    async def scenario() -> None:
        async with http_server({"/ready": admin_ready}) as port:
            await wait_ready(LOOPBACK, port, timeout=5)
            assert answers == [200]
        port = free_port()
        with pytest.raises(TimeoutError, match=rf"^Envoy admin at 127\.0\.0\.1:{port} not ready after 0\.2s \(last: "):
            await wait_ready(LOOPBACK, port, timeout=0.2)

    asyncio.run(scenario())
