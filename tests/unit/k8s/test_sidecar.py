"""`lockgate sidecar`: the bootstrap it writes (checked by a real Envoy) and the launcher that runs Envoy,
rotates the service-account token by hot restart and leaves no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mesh.envoy import ADMIN_CLUSTER, STATS_LISTENER, XDS_CLUSTER, admin_address, admin_request, bootstrap
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import TOKEN_METADATA, AdsServer
from reconciler.k8s import inject
from reconciler.k8s.sidecar import run, sidecar_bootstrap
from tests.fixtures.envoy import envoy_validate
from tests.fixtures.waiting import wait_for

ROOT = Path(__file__).resolve().parents[3]
LOOPBACK = "127.0.0.1"
NODE = "east/shop/reviews-v1-7d9f"


def pod_env(tmp_path: Path, *, xds: str = "10.96.0.15:15010", **extra: str) -> dict[str, str]:
    """What the injected container's environment resolves to in a pod (downward API values filled in)."""
    return {
        inject.ENV_POD_NAME: "reviews-v1-7d9f", inject.ENV_POD_NAMESPACE: "shop", inject.ENV_POD_IP: "10.0.0.7",
        inject.ENV_SERVICE_ACCOUNT: "reviews", inject.ENV_CLUSTER: "east", inject.ENV_XDS: xds,
        inject.ENV_TOKEN_FILE: str(tmp_path / "token"), inject.ENV_INBOUND_PORT: "15006",
        inject.ENV_OUTBOUND_PORT: "15001", inject.ENV_OUTBOUND_ADDRESS: LOOPBACK, inject.ENV_STATS_PORT: "15090",
        inject.ENV_ADMIN_SOCKET: str(tmp_path / "admin.sock"), inject.ENV_LOG_LEVEL: "warning", **extra,
    }


def xds_cluster(config: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER)


# --- mesh.envoy.bootstrap(xds_dns=...) ------------------------------------------------------------------


def test_bootstrap_xds_cluster_is_static_unless_asked_for_dns() -> None:
    args: dict[str, Any] = {"node_id": NODE, "cluster": "east", "xds_port": 15010, "admin_socket": Path("/a.sock")}
    static = xds_cluster(bootstrap(xds_host="10.96.0.15", **args))
    dns = xds_cluster(bootstrap(xds_host="lockgate-operator.lockgate-system.svc", xds_dns=True, **args))
    assert static["type"] == "STATIC" and "dns_lookup_family" not in static
    assert (dns["type"], dns["dns_lookup_family"]) == ("STRICT_DNS", "V4_PREFERRED")
    endpoint = dns["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "lockgate-operator.lockgate-system.svc", "port_value": 15010}
    # Everything but the type and the address is the same cluster (HTTP/2 for gRPC, the timeout).
    same = ("type", "dns_lookup_family", "load_assignment")
    assert {k: v for k, v in dns.items() if k not in same} == {k: v for k, v in static.items() if k not in same}


# --- sidecar_bootstrap --------------------------------------------------------------------------------


@pytest.mark.parametrize(("xds", "kind"), [("10.96.0.15:15010", "STATIC"),
                                           (inject.DEFAULT_XDS, "STRICT_DNS")])
def test_sidecar_bootstrap(tmp_path: Path, xds: str, kind: str) -> None:
    config = sidecar_bootstrap(pod_env(tmp_path, xds=xds), " tok-1\n")
    assert config["node"] == {"id": NODE, "cluster": "east"}
    cluster = xds_cluster(config)
    assert cluster["type"] == kind
    host, port = xds.rsplit(":", 1)
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": host, "port_value": int(port)}}
    grpc = config["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert grpc["initial_metadata"] == [{"key": TOKEN_METADATA, "value": "tok-1"}]
    assert config["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"  # mesh.envoy.XDS_DELTA
    assert config["deferred_stat_options"] == {"enable_deferred_creation_stats": True}
    assert config["admin"]["address"]["pipe"]["path"] == str(tmp_path / "admin.sock")
    (stats,) = config["static_resources"]["listeners"]
    assert stats["name"] == STATS_LISTENER
    assert stats["address"] == {"socket_address": {"address": "10.0.0.7", "port_value": 15090}}
    assert ADMIN_CLUSTER in {c["name"] for c in config["static_resources"]["clusters"]}


def test_sidecar_bootstrap_without_a_pod_ip_listens_for_stats_everywhere(tmp_path: Path) -> None:
    env = pod_env(tmp_path, **{inject.ENV_STATS_PORT: "19090"})
    del env[inject.ENV_POD_IP]
    (stats,) = sidecar_bootstrap(env, "t")["static_resources"]["listeners"]
    assert stats["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 19090}


@pytest.mark.parametrize("name", [inject.ENV_CLUSTER, inject.ENV_POD_NAMESPACE, inject.ENV_POD_NAME])
def test_sidecar_bootstrap_names_a_missing_variable(tmp_path: Path, name: str) -> None:
    env = pod_env(tmp_path)
    del env[name]
    with pytest.raises(ValueError, match=f"^{name} is not set"):
        sidecar_bootstrap(env, "t")


@pytest.mark.parametrize(("name", "value"), [
    (inject.ENV_XDS, "lockgate-operator"), (inject.ENV_XDS, "host:99999"), (inject.ENV_XDS, ":15010"),
    (inject.ENV_STATS_PORT, "0"), (inject.ENV_STATS_PORT, "http"), (inject.ENV_LOG_LEVEL, "loud"),
    (inject.ENV_POD_NAME, "a/b"), (inject.ENV_POD_IP, "pod-ip"), (inject.ENV_ADMIN_SOCKET, "admin.sock"),
    (inject.ENV_ADMIN_SOCKET, "/" + "x" * 120),
])  # fmt: skip
def test_sidecar_bootstrap_names_a_bad_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must"):
        sidecar_bootstrap(pod_env(tmp_path, **{name: value}), "t")


def test_sidecar_bootstrap_refuses_an_empty_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token is empty"):
        sidecar_bootstrap(pod_env(tmp_path), " \n")


@pytest.mark.integration
@pytest.mark.parametrize("xds", ["10.96.0.15:15010", "[fd00::15]:15010", inject.DEFAULT_XDS])
def test_envoy_accepts_the_sidecar_bootstrap(tmp_path: Path, xds: str) -> None:
    out = envoy_validate(sidecar_bootstrap(pod_env(tmp_path, xds=xds), "tok"), tmp_path / "envoy.json")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_run_refuses_a_missing_or_empty_token_before_starting_anything(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "token").write_text(content)
    env = pod_env(tmp_path, **{"LOCKGATE_RUN_DIR": str(tmp_path)})
    with pytest.raises(ValueError, match=inject.ENV_TOKEN_FILE):
        run(env)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["token"] if content is not None else [])


# --- run: real Envoys against a real ADS server ---------------------------------------------------------


class RecordingAuthenticator:
    """Accepts every token as NODE's credential and records it (the server then holds the stream to NODE:
    a proxy that claimed another node id would be refused, and not show as connected)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def node_for(self, token: str) -> str | None:
        self.tokens.append(token)
        return NODE


class Plane:
    """An AdsServer on its own event loop thread."""

    def __init__(self) -> None:
        self.auth = RecordingAuthenticator()
        self.cache = SnapshotCache()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = AdsServer(self.cache, host=LOOPBACK, authenticator=self.auth)
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def connected(self) -> bool:
        async def status() -> bool:
            st = self.cache.status().get(NODE)
            return st is not None and st.connected

        return asyncio.run_coroutine_threadsafe(status(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("envoy_shared_memory_*")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def write_token(path: Path, token: str) -> None:
    """As the kubelet does: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(token)
    os.replace(tmp, path)


@pytest.mark.parametrize(("returncode", "signum", "want"), [
    (0, signal.SIGTERM, 0),  # Envoy's own clean exit after the SIGTERM passed on
    (1, signal.SIGTERM, 1),  # Envoy's own error code
    (-signal.SIGTERM, signal.SIGTERM, 0),  # the SIGTERM came before Envoy's handler: the stop asked for
    (-signal.SIGINT, signal.SIGINT, 0),
    (-signal.SIGKILL, signal.SIGTERM, 137),  # killed after the stop timeout
    (-signal.SIGSEGV, signal.SIGTERM, 139),
    (None, signal.SIGTERM, 143),  # no Envoy was running
])
def test_the_exit_code_after_a_signal_was_passed_on(returncode: int | None, signum: int, want: int) -> None:
    from reconciler.k8s.sidecar import exit_code

    assert exit_code(returncode, signum) == want
    assert 0 <= exit_code(returncode, signum) < 256  # never a negative code (sys.exit(-15) exits with 241)


class Launcher:
    """`run()` in its own process (it installs signal handlers, as in the container), stopped by PID."""

    SCRIPT = ("import logging, os, sys\n"
              "from reconciler.k8s.sidecar import run\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "sys.exit(run(os.environ, token_poll_s=0.3, drain_time_s=1))\n")

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=f, stderr=subprocess.STDOUT,
                                         env={"PATH": os.environ.get("PATH", ""), **env})
        self.seen: dict[int, psutil.Process] = {}
        """Every Envoy it was seen running: psutil refuses to signal a PID that another process reused."""
        self.shm_before = shm_files()

    def envoys(self) -> list[psutil.Process]:
        """Its Envoy children now, newest last (remembered, so teardown can find them even if it died)."""
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        out = []
        for kid in kids:
            try:
                if kid.status() != psutil.STATUS_ZOMBIE and kid.name() == "envoy":
                    out.append(kid)
            except psutil.NoSuchProcess:
                continue
        self.seen.update((k.pid, k) for k in out)
        return sorted(out, key=lambda k: k.create_time())

    def close(self) -> None:
        self.envoys()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for envoy in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                envoy.kill()
        print(f"--- launcher log ---\n{self.log.read_text(errors='replace')[-4000:]}")  # shown when a test failed


@pytest.fixture
def plane() -> Iterator[Plane]:
    cp = Plane()
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Launcher]]:
    started: list[Launcher] = []

    def start(env: dict[str, str]) -> Launcher:
        launcher = Launcher(env, tmp_path / f"launcher-{len(started)}.log")
        started.append(launcher)
        return launcher

    try:
        yield start
    finally:
        for launcher in started:
            launcher.close()


def run_env(tmp_path: Path, xds_port: int, stats_port: int) -> dict[str, str]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_token(tmp_path / "token", "token-one")
    return pod_env(tmp_path, xds=f"{LOOPBACK}:{xds_port}", **{
        inject.ENV_POD_IP: LOOPBACK, inject.ENV_STATS_PORT: str(stats_port), "LOCKGATE_RUN_DIR": str(run_dir),
        inject.ENV_LOG_LEVEL: "info"})


def ready(env: dict[str, str]) -> bool:
    try:
        status, body = admin_request(admin_address(env[inject.ENV_ADMIN_SOCKET]), "/ready", timeout=1)
    except OSError:
        return False
    return status == 200 and body.strip() == b"LIVE"


def restart_epoch(env: dict[str, str]) -> int:
    info = json.loads(admin_request(admin_address(env[inject.ENV_ADMIN_SOCKET]), "/server_info")[1])
    return int(info["command_line_options"]["restart_epoch"])


def stats_status(port: int) -> int:
    import http.client

    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", "/stats/prometheus")
        return conn.getresponse().status
    finally:
        conn.close()


def stop_and_check_no_orphans(launcher: Launcher, env: dict[str, str]) -> None:
    launcher.envoys()
    pids = set(launcher.seen)
    assert pids
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(30) == 0  # Envoy's own code after SIGTERM, or the SIGTERM ended it (exit_code)
    for pid in pids:
        assert not psutil.pid_exists(pid), f"envoy pid {pid} outlived the launcher"
    assert list(Path(env["LOCKGATE_RUN_DIR"]).iterdir()) == []  # the bootstrap with the token is gone
    assert shm_files() - launcher.shm_before == set()  # nor does hot restart's shared memory pile up


@pytest.mark.integration
def test_run_serves_the_token_and_rotates_it_by_hot_restart(
    tmp_path: Path, plane: Plane, launch: Callable[[dict[str, str]], Launcher],
) -> None:
    stats_port = free_port()
    env = run_env(tmp_path, plane.port, stats_port)
    launcher = launch(env)
    wait_for("the ADS stream carries the first token", lambda: "token-one" in plane.auth.tokens)
    wait_for(f"{NODE} is connected (the node id the token was bound to)", plane.connected)
    wait_for("envoy is live", lambda: ready(env))
    (first,) = launcher.envoys()
    assert stats_status(stats_port) == 200
    assert restart_epoch(env) == 0

    write_token(tmp_path / "token", "token-two")
    wait_for("a new ADS stream carries the new token", lambda: "token-two" in plane.auth.tokens)
    assert plane.auth.tokens[-1] == "token-two"
    second = wait_for("a second envoy", lambda: [p for p in launcher.envoys() if p.pid != first.pid])[0]
    assert "--restart-epoch" in (cmd := second.cmdline()) and cmd[cmd.index("--restart-epoch") + 1] == "1"
    wait_for("the old envoy exits after draining (parent shutdown: 3 s)", lambda: not psutil.pid_exists(first.pid),
          timeout=10)
    wait_for("the new envoy is live", lambda: ready(env))
    assert restart_epoch(env) == 1  # a hot restart: the new Envoy took over the stats listener's socket
    assert stats_status(stats_port) == 200
    assert plane.connected()
    stop_and_check_no_orphans(launcher, env)


@pytest.mark.integration
def test_run_restarts_an_envoy_that_never_got_config(
    tmp_path: Path, launch: Callable[[dict[str, str]], Launcher],
) -> None:
    """Nothing listens at LOCKGATE_XDS: Envoy stays initialising, which Envoy cannot hot restart. The new
    token still reaches a new Envoy (epoch 0), and the old one is gone."""
    env = run_env(tmp_path, free_port(), free_port())
    launcher = launch(env)
    (first,) = wait_for("envoy started", launcher.envoys)
    time.sleep(0.5)
    assert not ready(env)
    write_token(tmp_path / "token", "token-two")
    second = wait_for("a replacement envoy", lambda: [p for p in launcher.envoys() if p.pid != first.pid])[0]
    cmd = second.cmdline()
    assert cmd[cmd.index("--restart-epoch") + 1] == "0"
    wait_for("the first envoy is gone", lambda: not psutil.pid_exists(first.pid), timeout=10)
    (workdir,) = Path(env["LOCKGATE_RUN_DIR"]).iterdir()
    config = json.loads((workdir / "envoy.json").read_text())
    assert config["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"][0]["value"] == "token-two"
    assert oct((workdir / "envoy.json").stat().st_mode & 0o777) == "0o600"
    stop_and_check_no_orphans(launcher, env)


@pytest.mark.integration
def test_sigterm_during_a_hot_restart_ends_both_envoys(
    tmp_path: Path, plane: Plane, launch: Callable[[dict[str, str]], Launcher],
) -> None:
    env = run_env(tmp_path, plane.port, free_port())
    launcher = launch(env)
    wait_for("envoy is live", lambda: ready(env))
    (first,) = launcher.envoys()
    write_token(tmp_path / "token", "token-two")
    wait_for("the new envoy runs beside the draining one", lambda: len(launcher.envoys()) == 2)
    assert psutil.pid_exists(first.pid)
    stop_and_check_no_orphans(launcher, env)
