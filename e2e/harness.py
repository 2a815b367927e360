"""Drive lockgate the way a user does: `lockgate init`, `lockgate up` in the background, `git commit`,
requests at the ingress. Shared by the e2e tests and the benchmarks.

Every process is started here and stopped here by PID, on success and on failure alike.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mesh.envoy import admin_request
from reconciler.state import read_status
from tests.fixtures import waiting

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

GIT_ENV = {"GIT_AUTHOR_NAME": "dev", "GIT_AUTHOR_EMAIL": "dev@example.org",
           "GIT_COMMITTER_NAME": "dev", "GIT_COMMITTER_EMAIL": "dev@example.org"}


def lockgate(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI of this installation as a user would; with `check`, a non-zero exit fails with what the
    command printed (a CalledProcessError shows neither stream)."""
    out = subprocess.run([sys.executable, "-m", "reconciler.cli", *args], capture_output=True, text=True,
                         cwd=cwd, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"lockgate {' '.join(args)} exited {out.returncode}\nstdout: {out.stdout}\n"
                             f"stderr: {out.stderr}")
    return out


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **GIT_ENV}, timeout=30)
    return out.stdout.strip()


def commit_file(repo: Path, path: str, text: str, message: str) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """`tests.fixtures.waiting.wait_for` where any exception of `check` is "not yet": a CLI or a process
    that is still starting."""
    return waiting.wait_for(what, check, timeout=timeout, interval=interval, tolerate=(Exception,))


class Up:
    """`lockgate up` as a background process, with helpers to read its status and send traffic."""

    def __init__(self, *, repo: Path, state_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.repo, self.state_dir = repo, state_dir
        self.log = state_dir.parent / f"{state_dir.name}-up.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "up", "--repo", str(repo), "--state-dir", str(state_dir),
             *extra],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.child_pids: set[int] = set()

    def status(self) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"lockgate up exited with {self.proc.returncode}; log:\n{self.log.read_text()}")
        # What `lockgate status --json` prints (the same function), read here: the harness polls it many times
        # a second, and a CLI process per poll took CPU from the mesh under test (tests/unit/reconciler/
        # test_cli_light.py and the CLI tests cover the command itself).
        status = read_status(self.state_dir)
        if status["lockgate"].get("pid") != self.proc.pid:
            # The last status an earlier lockgate wrote (one SIGKILLed, say) is not this one's: a restarted `up`
            # looks converged on it before it has written anything (`lockgate rollout` then finds no `up`).
            raise RuntimeError(f"status in {self.state_dir} is not yet this lockgate up's (pid {self.proc.pid})")
        for c in status["clusters"]:
            self.child_pids |= {p["pid"] for p in c["proxies"] if p.get("pid")}
        self.child_pids |= {w["pid"] for w in status.get("workloads", []) if w.get("pid")}
        return status

    def converged(self, revision: str) -> dict[str, Any] | None:
        """Status once `revision` is applied, every proxy ACKed it and every workload is ready."""
        st = self.status()
        ok = (st["revision"]["applied"] == revision and st["clusters"]
              and all(c["convergedRevision"] == revision for c in st["clusters"])
              and all(w["ready"] for w in st["workloads"]))
        return st if ok else None

    def wait_converged(self, revision: str, timeout: float = 60.0) -> dict[str, Any]:
        try:
            result: dict[str, Any] = wait_for(f"revision {revision[:12]} converged",
                                              lambda: self.converged(revision), timeout=timeout, interval=0.05)
        except TimeoutError as exc:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"
            exited = self.proc.poll()
            state = "running" if exited is None else f"exited {exited}"
            raise TimeoutError(f"{exc}; {self.unconverged()}; lockgate up {state}; the end of {self.log}:\n{tail}"
                               ) from None
        return result

    def unconverged(self) -> str:
        """What keeps the last status from converging: a timeout names it (a CI log is all there is)."""
        try:
            st = self.status()
        except Exception as exc:  # no status yet, or another lockgate's
            return f"no status: {exc!r}"
        proxies = [f"{p['id']} acked {str(p.get('ackedRevision'))[:12]} v{str(p.get('ackedVersion'))[:8]}"
                   f"{' nack' if p.get('nack') else ''}{'' if p.get('connected') else ' disconnected'}"
                   for c in st["clusters"] for p in c["proxies"]]
        return (f"applied {str(st['revision']['applied'])[:12]}, pushError {st['lockgate'].get('pushError')}, "
                f"pushesPending {st['lockgate'].get('pushesPending')}, "
                f"clusters {[(c['name'], c['convergedRevision']) for c in st['clusters']]}, "
                f"unready {[w['id'] for w in st['workloads'] if not w['ready']]}, "
                f"proxies {proxies}")

    def ingress(self, cluster: int = 0) -> tuple[str, int]:
        host, port = self.status()["clusters"][cluster]["ingress"].rsplit(":", 1)
        return host, int(port)

    def forget(self) -> None:
        """After lockgate was killed on purpose: close its log and leave its children (the data plane,
        which outlives it) for the next `lockgate up` to adopt. They stay in `child_pids` for cleanup."""
        assert self.proc.poll() is not None, "forget() is for a lockgate that has exited"
        self._log.close()

    def stop(self) -> None:
        """SIGINT (as Ctrl-C), then SIGKILL; then make sure no child it reported survives."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.status()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(self.child_pids):
            time.sleep(0.05)
        for pid in alive(self.child_pids):  # only ever PIDs lockgate reported as its own children
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z":
            out.add(pid)
    return out


@contextlib.contextmanager
def running(*, repo: Path, state_dir: Path, extra: tuple[str, ...] = ()) -> Iterator[Up]:
    up = Up(repo=repo, state_dir=state_dir, extra=extra)
    try:
        yield up
    finally:
        up.stop()


class Client:
    """Keep-alive HTTP/1.1 client for the ingress."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.address, self.timeout = address, timeout
        self.conn = http.client.HTTPConnection(*address, timeout=timeout)

    def get(self, host: str, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, Any]:
        for attempt in (0, 1):
            try:
                self.conn.request("GET", path, headers={"Host": host, **(headers or {})})
                resp = self.conn.getresponse()
                body = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
                if attempt:
                    raise
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body.decode(errors="replace")

    def close(self) -> None:
        self.conn.close()


def reviews_version(body: Any) -> str | None:
    """The reviews version that answered a frontend request (frontend embeds its upstream's answer)."""
    try:
        return str(body["upstreams"][0]["body"]["version"])
    except (KeyError, IndexError, TypeError):
        return None


def split(client: Client, host: str, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = client.get(host)
        seen[reviews_version(body) if status == 200 else f"HTTP {status}"] += 1
    return seen


# --- helpers for traffic-management scenarios (e2e/test_traffic.py) -----------------------------------


def envoy_stats(admin: str, contains: str = "") -> dict[str, int]:
    """Counters and gauges from an Envoy admin `/stats` (status' `admin`: `unix:/path`, or `host:port`),
    optionally only names containing `contains` (matched here, not by Envoy's regex filter, so `|` in
    cluster names needs no escaping)."""
    text = admin_request(admin, "/stats")[1].decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and contains in name and value.strip().isdigit():
            out[name] = int(value)
    return out


def proxy_admin(status: dict[str, Any], *, service: str | None = None, version: str | None = None) -> str:
    """Admin address (`unix:/path`) of the ingress (no service given) or of the first instance of
    service/version: what `envoy_stats` takes."""
    proxies = {p["id"]: p for c in status["clusters"] for p in c["proxies"]}
    if service is None:
        return str(next(p["admin"] for p in proxies.values() if p["kind"] == "ingress"))
    wid = next(w["id"] for w in status["workloads"]
               if w["service"] == service and (version is None or w["version"] == version))
    return str(proxies[wid]["admin"])


def request(address: tuple[str, int], host: str, path: str = "/", headers: dict[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
    """One GET on a fresh connection: (status, lower-cased headers, JSON body or text)."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        head = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        return resp.status, head, json.loads(body)
    except ValueError:
        return resp.status, head, body.decode(errors="replace")


# --- the control plane as an attacker sees it (e2e/test_zero_trust.py, tests/integration) -------------


def ads_attempt(address: str, *, node_id: str, token: str | None, type_url: str = SECRET_TYPE,
                names: tuple[str, ...] = ("workload-cert",), wait: float = 1.0) -> tuple[str, list[Any]]:
    """Open one ADS stream to `address` (`host:port`) as a raw gRPC client claiming `node_id` (with
    `token` in the credential metadata, or none), ask for `names` of `type_url`, and read for `wait`
    seconds: (the stream's final status code name, or "OPEN" if it was still open then; the responses).

    gRPC's blocking API, not grpc.aio: when the server ends a stream as it arrives (no credential), an aio
    write racing that end fails locally and replaces the server's status with INTERNAL; here the request
    is sent from a background thread that just stops, and the status read is the server's."""
    import threading

    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from mesh.xds.server import TOKEN_METADATA

    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names))
    request.node.id = node_id
    done = threading.Event()

    def requests() -> Iterator[Any]:
        yield request
        done.wait(wait + 5)  # keep the stream open (no half-close) until we stop reading

    responses: list[Any] = []
    metadata = ((TOKEN_METADATA, token),) if token is not None else ()
    with grpc.insecure_channel(address) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(requests(), metadata=metadata, timeout=wait)
        try:
            for response in call:
                responses.append(response)
            code = call.code()
        except grpc.RpcError:
            code = call.code()
        finally:
            done.set()
    return ("OPEN" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name), responses
