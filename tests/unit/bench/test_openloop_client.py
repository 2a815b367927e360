"""bench/openloop.c against small local servers: every due request is answered and timed from when it was
due, a wrong status is an error, and the gRPC mode's hand-made HTTP/2 frames and HPACK headers are taken by
a real grpcio server (its message arrives intact, an error status counts as an error).

Then `openloop serve`, the HTTP/1.1 app the bench measures against, driven over raw sockets: keep-alive,
pipelining in order, a head split across writes, 400 + close for a request with a body, `connection: close`,
many connections at once; and the client polling with `-s` against it."""

from __future__ import annotations

import importlib.util
import os
import select
import shutil
import signal
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
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
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


# ------------------------------------------------------------------------------------------ openloop serve

REQUEST = b"GET /reviews HTTP/1.1\r\nHost: reviews.shop\r\n\r\n"
CLOSE = b"GET /reviews HTTP/1.1\r\nHost: reviews.shop\r\nconnection: close\r\n\r\n"
TIMEOUT = 10.0  # generous: the machine is shared; no test waits this long when the server behaves


@pytest.fixture
def serve(openloop: Path) -> Iterator[int]:
    """`openloop serve` on 127.0.0.1 and a free port, once it says it listens; stopped by its PID afterwards,
    pass or fail, and the test fails if it had exited on its own meanwhile (a crash is a finding)."""
    for _ in range(3):  # the free port can be taken by someone else before the server binds it
        port = dp.free()
        proc = subprocess.Popen([str(openloop), "serve", "127.0.0.1", str(port)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if line == b"serving\n":
            break
        _stop(proc)
    else:
        pytest.fail(f"openloop serve did not start: {line!r}")
    try:
        yield port
        assert proc.poll() is None, f"openloop serve exited during the test: {proc.returncode}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


class _Client:
    """One connection to the server, reading whole HTTP/1.1 responses (head, then content-length bytes)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes] | None:
        """The next response (status, lower-cased headers, body); None at EOF before any byte of one."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                assert not self.buf, f"EOF inside a response head: {self.buf!r}"
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            assert self._fill(), "EOF inside a response body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status), headers, body

    def until_eof(self) -> list[tuple[int, dict[str, str], bytes]]:
        """Every response up to the server's close (a reset instead of a FIN raises)."""
        out = []
        while (r := self.response()) is not None:
            out.append(r)
        return out

    def nothing_pending(self, wait: float = 0.1) -> bool:
        """No byte and no EOF arrives within `wait` (only ever asserted true: a slow machine cannot fail it)."""
        ready, _, _ = select.select([self.sock], [], [], wait)
        return not ready and not self.buf


@pytest.fixture
def client(serve: int) -> Iterator[_Client]:
    c = _Client(serve)
    yield c
    c.close()


def _ok(r: tuple[int, dict[str, str], bytes] | None) -> bool:
    return r is not None and (r[0], r[2]) == (200, b"ok\n")


def test_serve_keeps_the_connection_alive(client: _Client) -> None:
    answers = []
    for _ in range(50):
        client.sock.sendall(REQUEST)
        answers.append(client.response())
    assert all(map(_ok, answers)) and len(answers) == 50
    assert client.nothing_pending()  # still open: no EOF after the 50th
    client.sock.sendall(CLOSE)
    assert len(client.until_eof()) == 1


def test_serve_answers_pipelined_requests_each_exactly_once(client: _Client) -> None:
    client.sock.sendall(REQUEST * 200)  # all of them before reading any answer
    answers = [client.response() for _ in range(200)]
    assert all(map(_ok, answers))
    assert client.nothing_pending()
    client.sock.sendall(CLOSE)  # the 201st: exactly one more answer, then EOF, so there were exactly 200
    assert [r[0] for r in client.until_eof()] == [200]


def test_serve_answers_pipelined_requests_in_order(client: _Client) -> None:
    """The answers are alike, so the order shows through the one request that ends the connection: with
    `connection: close` at position 120 of 200, exactly 120 answers come back, then EOF."""
    client.sock.sendall(REQUEST * 119 + CLOSE + REQUEST * 80)
    answers = client.until_eof()
    assert len(answers) == 120 and all(map(_ok, answers))


@pytest.mark.parametrize("cut", [len(REQUEST) // 2, len(REQUEST) - 1], ids=["mid-head", "inside-blank-line"])
def test_serve_answers_a_request_split_across_writes_once(client: _Client, cut: int) -> None:
    client.sock.sendall(REQUEST[:cut])
    assert client.nothing_pending()  # half a head is not a request
    client.sock.sendall(REQUEST[cut:])
    assert _ok(client.response())
    client.sock.sendall(CLOSE)
    assert len(client.until_eof()) == 1  # the split one was answered once, not twice


@pytest.mark.parametrize("request_bytes", [
    b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
], ids=["content-length", "chunked"])
def test_serve_refuses_a_request_with_a_body_and_closes(client: _Client, request_bytes: bytes) -> None:
    client.sock.sendall(request_bytes)
    r = client.response()
    assert r is not None and r[0] == 400 and r[1].get("connection") == "close"
    assert client.buf == b"" and client.sock.recv(1) == b""  # a FIN, not a reset, and nothing after the 400


def test_serve_takes_content_length_zero_as_no_body(client: _Client) -> None:
    client.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" + REQUEST)
    assert _ok(client.response()) and _ok(client.response())
    assert client.nothing_pending()


@pytest.mark.parametrize("header", [b"connection: close", b"Connection:  Close"])
def test_serve_closes_after_answering_connection_close(client: _Client, header: bytes) -> None:
    client.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    assert _ok(client.response())
    assert client.buf == b"" and client.sock.recv(1) == b""


def test_serve_answers_many_connections_at_once(serve: int) -> None:
    clients = [_Client(serve) for _ in range(100)]
    try:
        for c in clients:  # all open and all asked before any answer is read
            c.sock.sendall(REQUEST)
        assert all(_ok(c.response()) for c in clients)
        for c in clients:  # and each is still served on its own connection
            c.sock.sendall(CLOSE)
        assert [len(c.until_eof()) for c in clients] == [1] * 100
    finally:
        for c in clients:
            c.close()


def test_the_spinning_client_against_serve(openloop: Path, serve: int) -> None:
    """`-s 100` polls from 100 us before each due time: every due request is still sent, answered and timed
    from when it was due (a latency is never zero or negative, so no send time is taken for the due one)."""
    rate, seconds = 500, 1
    out = subprocess.run([str(openloop), "-s", "100", "h1", "127.0.0.1", str(serve), "reviews.shop", "/reviews",
                          str(rate), str(seconds), "2"], check=True, capture_output=True, text=True, timeout=60)
    head, *lines = out.stdout.split("\n")
    assert lines.pop() == ""  # the output ends with a newline
    raw = [int(line) for line in lines]  # nanoseconds, as printed
    run = dp.parse_openloop(out.stdout)
    assert (len(raw), len(run.latencies_us), run.errors) == (rate * seconds, rate * seconds, 0)
    assert head.startswith(f"openloop n={rate * seconds} errors=0 ")
    assert min(raw) > 0
