"""bench/openloop.c against small local servers: every due request is answered and timed from when it was
due, a wrong status is an error, and the gRPC mode's hand-made HTTP/2 frames and HPACK headers are taken by
a real grpcio server (its message arrives intact, an error status counts as an error)."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (scripts/apt-deps)")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockgate_bench_dataplane", ROOT / "bench" / "dataplane.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


dp = _load()


@pytest.fixture(scope="module")
def openloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("openloop") / "openloop"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(ROOT / "bench" / "openloop.c")],
                   check=True)
    return binary


class _Http(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    delay = 0.0
    status = "200 OK"


class _Handler(socketserver.StreamRequestHandler):
    """Keep-alive HTTP/1.1: reads a request head, waits `delay`, answers with a 3-byte body."""

    server: _Http

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            lines = []
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                lines.append(line)
            if not lines:
                return
            time.sleep(self.server.delay)
            self.wfile.write(f"HTTP/1.1 {self.server.status}\r\ncontent-length: 3\r\n\r\nok\n".encode())


@pytest.fixture
def http() -> Iterator[_Http]:
    server = _Http(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run(binary: Path, *args: Any) -> Any:
    out = subprocess.run([str(binary), *map(str, args)], check=True, capture_output=True, text=True, timeout=60)
    return dp.parse_openloop(out.stdout)


def test_every_due_request_is_answered_and_timed_from_when_it_was_due(openloop: Path, http: _Http) -> None:
    http.delay = 0.005
    port = http.server_address[1]
    run = _run(openloop, "h1", "127.0.0.1", port, "reviews.shop", "/reviews", 200, 1, 4)
    assert (len(run.latencies_us), run.errors) == (200, 0)
    assert run.latencies_us[0] >= 5000  # never less than the server's own delay


def test_a_request_waiting_for_a_connection_counts_its_wait(openloop: Path, http: _Http) -> None:
    """One connection, 10 ms per answer, 200 due per second: they queue, and the queueing is measured (a
    closed-loop client timing from the send would report ~10 ms for every request)."""
    http.delay = 0.010
    run = _run(openloop, "h1", "127.0.0.1", http.server_address[1], "x", "/", 200, 0.5, 1)
    assert run.errors == 0 and len(run.latencies_us) == 100
    assert dp.percentile(run.latencies_us, 0.99) > 100_000  # the 100th waited for ~99 before it
    assert run.late > 0


def test_a_non_200_answer_is_an_error(openloop: Path, http: _Http) -> None:
    http.status = "503 Service Unavailable"
    run = _run(openloop, "h1", "127.0.0.1", http.server_address[1], "x", "/", 100, 0.5, 2)
    assert (len(run.latencies_us), run.errors) == (0, 50)


@pytest.fixture
def grpc_server() -> Iterator[tuple[int, list[str]]]:
    grpc = pytest.importorskip("grpc")
    seen: list[str] = []

    class Every(grpc.GenericRpcHandler):  # type: ignore[misc,name-defined]
        def service(self, details: Any) -> Any:
            seen.append(details.method)

            def answer(request: bytes, context: Any) -> bytes:
                if request != b"\x0a\x05bench":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unexpected message")
                if details.method.endswith("/Fail"):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")
                return b"ok"

            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[Every()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, seen
    server.stop(0).wait()


def test_grpc_calls_reach_a_real_grpc_server(openloop: Path, grpc_server: tuple[int, list[str]],
                                             tmp_path: Path) -> None:
    port, seen = grpc_server
    body = tmp_path / "call.bin"
    body.write_bytes(dp.grpc_frame(b"\x0a\x05bench"))
    run = _run(openloop, "grpc", "127.0.0.1", port, "ratings.shop", "/bench.Echo/Call", 200, 1, 2, body)
    assert (len(run.latencies_us), run.errors) == (200, 0)
    assert set(seen) == {"/bench.Echo/Call"} and len(seen) == 200


def test_a_grpc_error_status_is_an_error(openloop: Path, grpc_server: tuple[int, list[str]], tmp_path: Path) -> None:
    port, _ = grpc_server
    body = tmp_path / "call.bin"
    body.write_bytes(dp.grpc_frame(b"\x0a\x05bench"))
    run = _run(openloop, "grpc", "127.0.0.1", port, "ratings.shop", "/bench.Echo/Fail", 100, 0.5, 2, body)
    assert (len(run.latencies_us), run.errors) == (0, 50)
