"""What the fault suite (e2e/test_faults.py) needs besides e2e/harness: a steady open-loop load that counts
every request, a TCP proxy that can turn into a blackhole, a peak-RSS sampler, commits built object by
object (trees no `git commit` would write), and the writer of docs/reliability.md.

Everything here runs in the test process (threads and sockets): no process is started here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import queue
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pygit2

RATE = 100.0
"""Requests per second of the steady load."""
CONNECTIONS = 8
"""Keep-alive connections the load spreads over: at most this many requests are in flight at once."""


# --- the steady load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One request of the load: when it was due on the schedule, sent and answered (time.monotonic()),
    and what came back. `status` None is a transport error (its text in `detail`)."""

    due: float
    start: float
    end: float
    status: int | None
    version: str | None
    instance: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Load:
    """An open-loop client at the ingress: request i is due at t0 + i/rate whatever happened to the others
    (a stall queues requests, it does not slow the schedule), spread over `connections` keep-alive
    connections (or one fresh connection per request with `fresh`). Nothing is retried: every request is
    recorded once, and a failure is any non-2xx answer or transport error.

    Requests still queued when the load stops are sent before `stop()` returns, so every request that fell
    due is counted."""

    def __init__(self, address: tuple[str, int], host: str, *, rate: float = RATE, connections: int = CONNECTIONS,
                 fresh: bool = False, path: str = "/", timeout: float = 10.0, name: str = "") -> None:
        self.address, self.host, self.rate, self.path = address, host, rate, path
        self.name = name or (f"{rate:.0f}/s, a fresh connection per request" if fresh
                             else f"{rate:.0f}/s over {connections} keep-alive connections")
        self.connections, self.fresh, self.timeout = connections, fresh, timeout
        self._due: queue.SimpleQueue[float | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent: list[Sent] = []
        self._threads: list[threading.Thread] = []
        self.started = self.stopped = 0.0

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Load:
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._schedule, name="load-schedule", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
                          for i in range(self.connections)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, *, wait: bool = True) -> None:
        """No request falls due after this; with `wait`, return once every one that did is answered.
        `wait=False` lets a scenario go on while a slow machine drains the queue (call `stop()` later)."""
        self._stop.set()
        if not wait or self.stopped:
            return
        for t in self._threads:
            t.join(self.timeout + 30)
        self.stopped = time.monotonic()

    def _schedule(self) -> None:
        i = 0
        while True:
            due = self.started + i / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            if self._stop.is_set():
                break
            self._due.put(due)
            i += 1
        for _ in range(self.connections):
            self._due.put(None)

    def _work(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while (due := self._due.get()) is not None:
            c = conn or http.client.HTTPConnection(*self.address, timeout=self.timeout)
            conn = None
            start = time.monotonic()
            status: int | None = None
            version = instance = None
            try:
                headers = {"Host": self.host, **({"Connection": "close"} if self.fresh else {})}
                c.request("GET", self.path, headers=headers)
                resp = c.getresponse()
                body = resp.read()
                status = resp.status
                version, instance, detail = _answer(status, body)
                if not (self.fresh or resp.will_close):
                    conn = c  # kept alive for the next request
            except (OSError, http.client.HTTPException) as exc:
                detail = f"{type(exc).__name__}: {exc}"
            if conn is None:
                c.close()
            sent = Sent(due, start, time.monotonic(), status, version, instance, detail)
            with self._lock:
                self._sent.append(sent)
        if conn is not None:
            conn.close()

    def sent(self, since: float = 0.0, until: float = float("inf")) -> list[Sent]:
        """Requests due within [since, until] (monotonic), in the order they were answered."""
        with self._lock:
            return [s for s in self._sent if since <= s.due <= until]

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[Sent]:
        return [s for s in self.sent(since, until) if not s.ok]

    def versions(self, since: float = 0.0) -> Counter[str]:
        return Counter(s.version or f"HTTP {s.status}" for s in self.sent(since) if s.ok)

    def instances(self, since: float = 0.0) -> Counter[str]:
        return Counter(s.instance or "?" for s in self.sent(since) if s.ok)

    def in_flight(self, at: float) -> list[Sent]:
        """Requests sent before `at` and answered after it (call once they are all answered)."""
        return [s for s in self.sent() if s.start <= at <= s.end]

    def describe(self) -> str:
        """`N requests, F failed, p50/p99/max latency` (latency from when each request was due)."""
        sent = self.sent()
        if not sent:
            return "no requests"
        lat = sorted(s.end - s.due for s in sent)

        def p(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

        took = (self.stopped or time.monotonic()) - self.started
        return (f"load ({self.name}): {len(sent)} requests in {took:.1f} s, {len(self.failures())} failed; "
                f"latency from due "
                f"p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms, max {lat[-1] * 1000:.0f} ms")


def _answer(status: int, body: bytes) -> tuple[str | None, str | None, str]:
    """(reviews version, reviews instance, detail) of one answer. The frontend embeds its upstream's
    answer; a failure keeps the body's start, where Envoy says why."""
    version: str | None = None
    instance: str | None = None
    try:
        doc: Any = json.loads(body)
        upstream = doc["upstreams"][0]["body"] if "upstreams" in doc else doc
        version, instance = str(upstream["version"]), str(upstream["instance"])
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    detail = "" if 200 <= status < 300 else f"HTTP {status}: {body[:1000].decode(errors='replace')}"
    return version, instance, detail


# --- a TCP proxy that can become a blackhole ---------------------------------------------------------


class SwitchProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream`. Forwarding, it copies bytes both ways; switched to a
    blackhole, it accepts every new connection and never sends a byte or reads one (a peer gone silent, as
    behind a dropped route: no reset, no FIN). Connections taken in as a blackhole stay silent after the
    switch back, as they would on a real network; only new connections are forwarded again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._blackhole = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.accepted: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._accept, name="switch-proxy", daemon=True)
        self._thread.start()

    def blackhole(self) -> None:
        self._blackhole.set()

    def forward(self) -> None:
        self._blackhole.clear()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
        self._listener.close()

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(conn)
            if self._blackhole.is_set():
                self.accepted["blackholed"] += 1
                continue
            self.accepted["forwarded"] += 1
            threading.Thread(target=self._pair, args=(conn,), daemon=True).start()

    def _pair(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        self._keep(up)
        back = threading.Thread(target=_pump, args=(up, conn), daemon=True)
        back.start()
        _pump(conn, up)
        back.join()
        conn.close()
        up.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until `src` ends, then pass the end on (half-close), as TCP would."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# --- the memory lockgate uses ------------------------------------------------------------------------


class PeakRss:
    """The largest resident set of one process (psutil, every `interval` s, on a thread), and of its
    Python children (a loading worker, if lockgate runs one): a spike shorter than `interval` goes unseen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def children_peak_mb(self) -> float:
        return self.children_peak / 2**20

    def _run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, proc.memory_info().rss)
                if n % 5 == 0:  # children cost a /proc scan: every fifth sample
                    for child in proc.children():
                        if "python" in child.name():
                            self.children_peak = max(self.children_peak, child.memory_info().rss)
            n += 1
            self._stop.wait(self.interval)


# --- commits built object by object ------------------------------------------------------------------

BLOB, LINK, TREE = 0o100644, 0o120000, 0o040000


def commit(repo_path: Path, message: str, *, put: Mapping[str, bytes] | None = None,
           links: Mapping[str, str] | None = None, remove: tuple[str, ...] = (), base: str | None = None) -> str:
    """A commit on the branch HEAD names (a work tree's or a bare repository's), parent the branch tip, tree
    `base`'s top level (default: the tip's) with `put` files, `links` symbolic links and `remove` gone.

    The tree is written as a raw object: libgit2's TreeBuilder refuses entry names such as
    `sub/../evil.yaml` (`invalid name for a tree entry`), its object database stores what it is given,
    and a remote or a careless tool can hand lockgate exactly that. A work tree is left as it was: the
    suite never commits from it."""
    repo = pygit2.Repository(str(repo_path))
    try:
        ref = repo.lookup_reference("HEAD").target
        assert isinstance(ref, str), "HEAD must name a branch"
        tip = repo.references[ref].peel(pygit2.Commit)
        tree = (repo.revparse_single(base).peel(pygit2.Commit) if base else tip).tree
        entries: dict[bytes, tuple[int, bytes]] = {}
        for entry in tree:
            assert entry.raw_name is not None
            entries[entry.raw_name] = (int(entry.filemode), entry.id.raw)
        for name in remove:
            entries.pop(name.encode(), None)
        for name, data in (put or {}).items():
            entries[name.encode()] = (BLOB, repo.create_blob(data).raw)
        for name, target in (links or {}).items():
            entries[name.encode()] = (LINK, repo.create_blob(target.encode()).raw)
        # Git's order: by name, a tree's name compared as if it ended in "/".
        order = sorted(entries, key=lambda n: n + b"/" if entries[n][0] == TREE else n)
        raw = b"".join(b"%o %s\0%s" % (entries[n][0], n, entries[n][1]) for n in order)
        tree_id = repo.odb.write(pygit2.enums.ObjectType.TREE, raw)
        sig = pygit2.Signature("dev", "dev@example.org")
        return str(repo.create_commit(ref, sig, sig, message, tree_id, [tip.id]))
    finally:
        repo.free()


# --- docs/reliability.md ------------------------------------------------------------------------------


@dataclass
class Row:
    """One scenario of the table: what ran, the traffic, the measured figure against its bound, the outcome."""

    number: str
    scenario: str
    ran: str = ""
    requests: int | None = None
    failed: int | None = None
    measured: str = ""
    bound: str = ""
    result: str = "not run"
    notes: list[str] = field(default_factory=list)

    def traffic(self, *loads: Load) -> None:
        self.requests = sum(len(load.sent()) for load in loads)
        self.failed = sum(len(load.failures()) for load in loads)
        self.notes += [load.describe() for load in loads]


class Report:
    """The session's rows, written to docs/reliability.md at the end (a row per scenario that ran)."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.started = time.monotonic()
        self.started_at = dt.datetime.now(dt.UTC)
        self.load_at_start = os.getloadavg()

    @contextlib.contextmanager
    def scenario(self, number: str, title: str) -> Iterator[Row]:
        """A row for the block: `pass` if it ends normally, else `FAIL` and the reason (re-raised)."""
        row = self.rows[number] = Row(number, title)
        try:
            yield row
        except BaseException as exc:
            row.result = "FAIL"
            where = traceback.extract_tb(exc.__traceback__)[-1]
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            row.notes.append(f"failed at {Path(where.filename).name}:{where.lineno}: {type(exc).__name__}: {first}")
            raise
        row.result = "pass"

    def reference(self, number: str, title: str, *, where: str, note: str) -> None:
        self.rows[number] = Row(number, title, ran=where, result="see there", notes=[note])

    def write(self, path: Path, *, commands: tuple[str, ...]) -> None:
        took = time.monotonic() - self.started
        cpu = _cpu_model()
        mem = psutil.virtual_memory().total / 2**30
        lines = [
            "# Reliability: the fault suite's figures",
            "",
            "Generated by `e2e/test_faults.py` at the end of its run (do not edit by hand). Each scenario runs real",
            "Envoys, workloads and `lockgate up` under a steady open-loop load through the ingress: "
            f"{RATE:.0f} requests/s",
            f"over {CONNECTIONS} keep-alive connections unless a note says otherwise, every request counted with its",
            "status and time, nothing retried by the client; a failure is any non-2xx answer or transport error.",
            "Bounds are generous on purpose; the figures are what this run measured.",
            "",
            f"- date: {self.started_at:%Y-%m-%d %H:%M} UTC; the fault suite took {took:.0f} s",
            f"- machine: {platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB,"
            f" Python {platform.python_version()}; load average {self.load_at_start[0]:.1f} at the start,"
            f" {os.getloadavg()[0]:.1f} at the end (the cores are shared)",
            "- commands: " + ", ".join(f"`{c}`" for c in commands),
            "",
            "| # | scenario | what ran | requests | failed | measured | bound | result |",
            "|---|---|---|---:|---:|---|---|---|",
        ]
        rows = sorted(self.rows.values(), key=lambda r: (int("".join(c for c in r.number if c.isdigit())), r.number))
        for r in rows:
            cells = [r.number, r.scenario, r.ran, _n(r.requests), _n(r.failed), r.measured, r.bound, r.result]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += ["", "## Notes per scenario", ""]
        for r in rows:
            lines.append(f"**{r.number}. {r.scenario}** ({r.result})")
            lines.append("")
            lines += [f"- {note}" for note in r.notes] or ["- (no notes)"]
            lines.append("")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))


def _n(value: int | None) -> str:
    return "" if value is None else str(value)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a server that wants one on its command line)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
    return port


def wait_listening(address: tuple[str, int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
