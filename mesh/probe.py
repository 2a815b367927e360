"""Readiness probes: wait until something accepts connections, or answers HTTP as it should.

One polling loop for every start-up wait (Envoy's admin /ready on its Unix socket, a workload's port,
Prometheus' /-/ready): each attempt has its own timeout, so a peer that accepts and then hangs costs one
attempt, not the whole wait; HTTP ignores proxies from the environment (a workload's HTTP_PROXY names its
own sidecar, which would answer in the target's place); and giving up raises TimeoutError saying what was
awaited and what the last attempt saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

Ok = Callable[[int, bytes], bool]
"""Whether an HTTP answer (status, body) means ready."""
ATTEMPT_TIMEOUT = 1.0
_BODY_SHOWN = 120


def status_200(status: int, _body: bytes) -> bool:
    return status == 200


async def wait_tcp(host: str, port: int, *, timeout: float, interval: float = 0.025,
                   attempt_timeout: float = ATTEMPT_TIMEOUT, name: str | None = None) -> None:
    """Until `host:port` accepts a TCP connection (closed again at once)."""

    async def attempt(budget: float) -> str | None:
        async with asyncio.timeout(budget):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    await _poll(name or f"TCP {host}:{port}", attempt, timeout=timeout, interval=interval,
                attempt_timeout=attempt_timeout)


async def wait_http(url: str, *, timeout: float, interval: float = 0.05, attempt_timeout: float = ATTEMPT_TIMEOUT,
                    ok: Ok = status_200, name: str | None = None, unix_socket: str | Path | None = None) -> None:
    """Until a GET of `url` gets an answer that `ok` accepts (default: status 200). Redirects are not
    followed: a readiness endpoint answers itself. With `unix_socket`, the request goes to that socket
    (Envoy's admin listens on one) and `url` only names the path and the Host header."""
    # force_close: every attempt is a new connection, as a new client's would be.
    connector: aiohttp.BaseConnector = (aiohttp.TCPConnector(force_close=True) if unix_socket is None
                                        else aiohttp.UnixConnector(path=str(unix_socket), force_close=True))
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:

        async def attempt(budget: float) -> str | None:
            per_try = aiohttp.ClientTimeout(total=budget)
            async with session.get(url, allow_redirects=False, timeout=per_try) as resp:
                body = await resp.read()
            if ok(resp.status, body):
                return None
            shown = body[:_BODY_SHOWN].decode("utf-8", errors="replace").strip()
            return f"HTTP {resp.status}" + (f" {shown!r}" if shown else "")

        await _poll(name or url, attempt, timeout=timeout, interval=interval, attempt_timeout=attempt_timeout)


async def _poll(name: str, attempt: Callable[[float], Awaitable[str | None]], *, timeout: float, interval: float,
                attempt_timeout: float) -> None:
    """Call `attempt(budget)` until it returns None (ready); otherwise it returns, or raises, what it saw."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no attempt finished"
    while True:
        budget = max(min(attempt_timeout, deadline - loop.time()), 0.01)  # the first attempt always runs
        try:
            seen = await attempt(budget)
            if seen is None:
                return
            last = seen
        except aiohttp.InvalidURL:
            raise  # no later attempt can do better
        except TimeoutError:  # before aiohttp.ClientError: its timeouts are both
            last = f"no answer within {budget:g}s"
        except (OSError, aiohttp.ClientError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"{name} not ready after {timeout:g}s (last: {last})")
        await asyncio.sleep(min(interval, left))
