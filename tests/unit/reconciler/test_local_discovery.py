"""The HTTP service discovery Prometheus finds every Envoy through, on 127.0.0.1: its answers, its port,
no access log, and a stuck client that neither delays other clients nor `stop`."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import aiohttp
import pytest

from reconciler.runtime.local.prometheus import DiscoveryServer

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(trust_env=False) as session, \
            session.request(method, url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, resp.content_type, await resp.read()


def test_sd_answers_the_current_targets_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    targets: list[dict[str, Any]] = [{"targets": ["127.0.0.1:1"], "labels": {"kind": "ingress"}}]

    async def scenario() -> None:
        sd = DiscoveryServer(address=LOOPBACK, targets=lambda: targets)
        port = await sd.start()
        try:
            assert port > 0 and sd.port == port and sd.url == f"http://{LOOPBACK}:{port}/sd"
            status, ctype, body = await get(sd.url)
            assert (status, ctype, json.loads(body)) == (200, "application/json", targets)
            targets.append({"targets": ["127.0.0.1:2"], "labels": {"kind": "sidecar"}})
            assert json.loads((await get(f"{sd.url}?refresh=1"))[2]) == targets  # asked anew each time
            assert (await get(f"http://{LOOPBACK}:{port}/"))[0] == 404
            assert (await get(f"http://{LOOPBACK}:{port}/sd/x"))[0] == 404
            assert (await get(sd.url, "POST"))[0] == 405
        finally:
            await sd.stop()
        await sd.stop()  # idempotent
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(sd.url)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    assert [r for r in caplog.records if r.name.startswith("aiohttp.access")] == []


def test_a_given_port_is_used() -> None:
    async def scenario() -> None:
        port = free_port()
        sd = DiscoveryServer(address=LOOPBACK, targets=list, port=port)
        try:
            assert await sd.start() == port
            assert (await get(sd.url))[:1] == (200,)
        finally:
            await sd.stop()

    asyncio.run(scenario())


def test_a_stuck_client_delays_neither_others_nor_stop() -> None:
    async def scenario() -> None:
        sd = DiscoveryServer(address=LOOPBACK, targets=list)
        await sd.start()
        stuck: list[asyncio.StreamWriter] = []
        try:
            for partial in (b"", b"GET /sd HTTP/1.1\r\nHost: x\r\n"):  # silent; headers never finished
                _, writer = await asyncio.open_connection(LOOPBACK, sd.port)
                writer.write(partial)
                await writer.drain()
                stuck.append(writer)
            t0 = time.monotonic()
            for _ in range(5):
                assert (await get(sd.url))[0] == 200
            assert time.monotonic() - t0 < 1.0
        finally:
            t0 = time.monotonic()
            await sd.stop()
            took = time.monotonic() - t0
            for writer in stuck:
                writer.close()
        assert took < 3.0

    asyncio.run(scenario())
