"""`lockgate sidecar`: what runs in every injected pod's `lockgate-proxy` container.

Istio's pilot-agent without the certificate work (our control plane sends certificates over SDS): it
turns the pod's environment (reconciler.k8s.inject sets it) and its service-account token into an Envoy
bootstrap, runs Envoy as its child, passes SIGTERM/SIGINT on and exits with Envoy's code.

The token expires and the kubelet rewrites the file. The xDS stream is authenticated once, at connect,
so a running Envoy is unaffected, but after a reconnect it would present the token in its bootstrap,
expired by then. So the file is polled (every 10 s) and when it changes the bootstrap is rewritten and
Envoy hot restarted (`--restart-epoch N+1`, same base id): the new Envoy takes over the listening
sockets and the old one drains its connections for the drain time instead of dropping them. Envoy
refuses a hot restart while its parent is still initialising (no config yet, so nothing to drain): then,
and if a hot restart fails, the launcher logs a warning and restarts Envoy from epoch 0 once the old one
has drained.

`sidecar_bootstrap` is pure; `run` does the I/O, with the environment as a parameter and no global
state (signal handlers are installed for the call and restored after it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from mesh.envoy import XDS_DELTA, admin_address, admin_request, bootstrap, envoy_argv
from mesh.names import NodeId
from reconciler.k8s import inject

log = logging.getLogger("lockgate.sidecar")

ENV_RUN_DIR = "LOCKGATE_RUN_DIR"
"""Where the bootstrap (it holds the token) is written, in a private temp dir: the `lockgate-run` emptyDir."""
TOKEN_POLL_S = 10.0
DRAIN_TIME_S = 5
"""Envoy's drain time: for listener changes (as in the local runtime) and for the old Envoy of a hot restart."""
CONCURRENCY = 2
"""Envoy worker threads: Istio's sidecar default; the proxy's CPU request is small."""
_UNIX_PATH_MAX = 107
_STOP_TIMEOUT_S = 20.0
"""How long Envoy gets to exit after the signal before it is killed (the pod's grace period is 30 s)."""
_TICK_S = 0.1
_SHM = Path("/dev/shm")


def sidecar_bootstrap(env: Mapping[str, str], token: str) -> dict[str, Any]:
    """Envoy's bootstrap for this pod: node `cluster/namespace/pod`, ADS to `LOCKGATE_XDS` with `token` as
    its credential, admin on the Unix socket, the stats listener on the pod's address.

    ValueError naming the variable that is missing or wrong."""
    s = _Settings.from_env(env)
    if not token.strip():
        raise ValueError("the service-account token is empty")
    node = NodeId(cluster=s.cluster, kind="sidecar", namespace=s.namespace, instance=s.pod)
    return bootstrap(
        node_id=str(node), cluster=s.cluster, xds_host=s.xds_host, xds_port=s.xds_port, xds_dns=s.xds_dns,
        admin_socket=s.admin_socket, stats_host=s.stats_host, stats_port=s.stats_port, xds_token=token.strip(),
        delta=XDS_DELTA,
    )


def run(env: Mapping[str, str], *, token_poll_s: float = TOKEN_POLL_S, drain_time_s: int = DRAIN_TIME_S) -> int:
    """Run Envoy for this pod until it exits or a SIGTERM/SIGINT has been passed on to it; its exit code.

    ValueError for an environment or token file that cannot give a bootstrap (the container exits with
    the message; the kubelet restarts it)."""
    settings = _Settings.from_env(env)
    token = _read_token(settings.token_file)
    sidecar_bootstrap(env, token)  # every check before anything starts
    run_dir = Path(env.get(ENV_RUN_DIR, inject.RUN_DIR))
    workdir = Path(tempfile.mkdtemp(prefix="lockgate-sidecar-", dir=run_dir))  # 0700
    received: list[int] = []
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    envoys = _Envoys(settings, workdir, drain_time_s=drain_time_s)
    try:
        envoys.configure(sidecar_bootstrap(env, token))
        envoys.start_cold()
        return envoys.supervise(env, token, received, token_poll_s=token_poll_s)
    finally:
        envoys.stop_all(signal.SIGTERM)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`lockgate sidecar` (no arguments: everything comes from the environment)."""
    if argv:
        print(f"lockgate sidecar takes no arguments (got {' '.join(argv)}); it reads its environment",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return run(os.environ)
    except ValueError as exc:
        print(f"lockgate sidecar: {exc}", file=sys.stderr)
        return 2


def exit_code(returncode: int | None, signum: int) -> int:
    """The sidecar's exit code once `signum` was passed on to Envoy and Envoy ended with `returncode`
    (Popen's: negative for a signal). Envoy's own code when it exited; 0 when the very signal passed on
    ended it, which happens when it comes before Envoy has installed its handler (early in its start, seen
    on a loaded machine): that is the stop that was asked for; 128 + n, the shell's convention, for any
    other signal n (137: killed after the stop timeout), and 128 + `signum` when no Envoy ran."""
    if returncode is None:
        return 128 + signum
    if returncode >= 0:
        return returncode
    return 0 if -returncode == signum else 128 - returncode


@dataclass(frozen=True)
class _Settings:
    """The environment, checked once."""

    cluster: str
    namespace: str
    pod: str
    xds_host: str
    xds_port: int
    xds_dns: bool
    admin_socket: Path
    stats_host: str
    stats_port: int
    token_file: Path
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> _Settings:
        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ValueError(f"{name} is not set (the injected container sets it)")
            if "/" in value:
                raise ValueError(f"{name} must not contain '/' (it is part of the node id): {value!r}")
            return value

        def port(name: str, default: int) -> int:
            text = env.get(name, str(default)).strip()
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise ValueError(f"{name} must be a TCP port (1-65535): {text!r}")
            return int(text)

        cluster, namespace, pod = required(inject.ENV_CLUSTER), required(inject.ENV_POD_NAMESPACE), required(
            inject.ENV_POD_NAME)
        xds_host, xds_port = inject.split_host_port(env.get(inject.ENV_XDS, inject.DEFAULT_XDS).strip(),
                                                    what=inject.ENV_XDS)
        admin_socket = Path(env.get(inject.ENV_ADMIN_SOCKET, inject.ADMIN_SOCKET))
        if not admin_socket.is_absolute() or len(str(admin_socket)) > _UNIX_PATH_MAX:
            raise ValueError(f"{inject.ENV_ADMIN_SOCKET} must be an absolute path of at most {_UNIX_PATH_MAX} "
                             f"characters (a Unix socket): {str(admin_socket)!r}")
        # The stats listener binds the pod's address: that is what Prometheus scrapes, and on a host where
        # several "pods" share one network namespace (tests) 0.0.0.0 would be shared by all of them through
        # SO_REUSEPORT. Without POD_IP, every address.
        stats_host = env.get(inject.ENV_POD_IP, "").strip() or "0.0.0.0"
        try:
            ipaddress.ip_address(stats_host)
        except ValueError:
            raise ValueError(f"{inject.ENV_POD_IP} must be an IP address: {stats_host!r}") from None
        log_level = env.get(inject.ENV_LOG_LEVEL, "warning").strip()
        if log_level not in inject.LOG_LEVELS:
            raise ValueError(f"{inject.ENV_LOG_LEVEL} must be one of {', '.join(inject.LOG_LEVELS)}: {log_level!r}")
        return cls(cluster=cluster, namespace=namespace, pod=pod, xds_host=xds_host, xds_port=xds_port,
                   xds_dns=not _is_ip(xds_host), admin_socket=admin_socket, stats_host=stats_host,
                   stats_port=port(inject.ENV_STATS_PORT, inject.STATS_PORT),
                   token_file=Path(env.get(inject.ENV_TOKEN_FILE, inject.TOKEN_FILE)), log_level=log_level)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the service-account token {inject.ENV_TOKEN_FILE}={path}: "
                         f"{exc.strerror or exc}") from None
    if not token:
        raise ValueError(f"the service-account token {inject.ENV_TOKEN_FILE}={path} is empty")
    return token


class _Envoys:
    """The Envoy processes of one launcher: the current one, and older ones draining after a hot restart."""

    def __init__(self, settings: _Settings, workdir: Path, *, drain_time_s: int) -> None:
        self.settings = settings
        self.workdir = workdir
        self.config_path = workdir / "envoy.json"
        self.base_id_path = workdir / "base-id"
        self.drain_time_s = drain_time_s
        self.current: subprocess.Popen[bytes] | None = None
        self.epoch = 0
        self.parents: list[subprocess.Popen[bytes]] = []
        """Older Envoys of a hot restart: each exits by itself once the new one tells it to."""
        self.cold_at: float | None = None
        """When set, a fallback restart is due at this monotonic time (the old Envoy has drained)."""

    def configure(self, config: dict[str, Any]) -> None:
        """Write the bootstrap 0600 (it holds the token), atomically: a starting Envoy never reads half."""
        fd, tmp = tempfile.mkstemp(dir=self.workdir, prefix=".envoy-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.replace(tmp, self.config_path)

    def _argv(self, *, epoch: int, base_id: int | None) -> list[str]:
        # envoy_argv turns hot restart off (several Envoys on one machine); here it is what rotates the
        # token without dropping connections. A dynamic base id keeps Envoys sharing a host apart.
        argv = [a for a in envoy_argv(config_path=self.config_path, concurrency=CONCURRENCY,
                                      log_level=self.settings.log_level, drain_time_s=self.drain_time_s)
                if a != "--disable-hot-restart"]
        argv += ["--restart-epoch", str(epoch), "--parent-shutdown-time-s", str(2 * self.drain_time_s + 1)]
        if base_id is None:
            argv += ["--use-dynamic-base-id", "--base-id-path", str(self.base_id_path)]
        else:
            argv += ["--base-id", str(base_id)]
        return argv

    def _spawn(self, *, epoch: int, base_id: int | None) -> None:
        proc = subprocess.Popen(self._argv(epoch=epoch, base_id=base_id), stdin=subprocess.DEVNULL,
                                cwd=self.workdir)  # Envoy logs to our stderr: the container log
        self.current, self.epoch = proc, epoch
        log.info("started envoy pid %d (restart epoch %d)", proc.pid, epoch)

    def start_cold(self) -> None:
        self.base_id_path.unlink(missing_ok=True)
        self._spawn(epoch=0, base_id=None)

    def _live(self) -> bool:
        """Whether the current Envoy has finished initialising (admin `/ready` says LIVE)."""
        try:
            status, body = admin_request(admin_address(self.settings.admin_socket), "/ready", timeout=2)
        except OSError:
            return False
        return status == 200 and body.strip() == b"LIVE"

    def _base_id(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.base_id_path.read_text().strip())
        return None

    def restart(self) -> None:
        """Pick up a new bootstrap: hot restart if Envoy is live, else a restart once it has drained."""
        assert self.current is not None
        base_id = self._base_id()
        if base_id is not None and self._live():
            self.parents.append(self.current)
            self._spawn(epoch=self.epoch + 1, base_id=base_id)
            return
        log.warning("envoy (pid %d) is not live yet, so it cannot be hot restarted: restarting it",
                    self.current.pid)
        self._fallback(drain=False)

    def _fallback(self, *, drain: bool) -> None:
        """Stop the Envoys that serve (after draining their listeners for the drain time when `drain`), then
        start from epoch 0: `tick` does the second half when `cold_at` has come."""
        if drain:
            with contextlib.suppress(OSError):
                admin_request(admin_address(self.settings.admin_socket), "/drain_listeners?graceful",
                              method="POST", timeout=2)
        self.cold_at = time.monotonic() + (self.drain_time_s if drain else 0)

    def tick(self) -> int | None:
        """One look at the processes: None while the sidecar goes on, else the exit code to end with."""
        self.parents = [p for p in self.parents if p.poll() is None]
        if self.cold_at is not None:
            if time.monotonic() < self.cold_at:
                return None
            self.cold_at = None
            self.stop_all(signal.SIGTERM)
            self.start_cold()
            return None
        assert self.current is not None
        code = self.current.poll()
        if code is None:
            return None
        if self.parents:  # the new Envoy of a hot restart died while its parent still serves
            log.warning("envoy pid %d (restart epoch %d) exited with %d during a hot restart; restarting "
                        "after the old one has drained for %d s", self.current.pid, self.epoch, code,
                        self.drain_time_s)
            self.current = self.parents.pop()
            self._fallback(drain=True)
            return None
        log.info("envoy pid %d exited with %d", self.current.pid, code)
        return code

    def supervise(self, env: Mapping[str, str], token: str, received: list[int], *, token_poll_s: float) -> int:
        next_poll = time.monotonic() + token_poll_s
        while not received:
            code = self.tick()
            if code is not None:
                return code
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + token_poll_s
                try:
                    fresh = _read_token(self.settings.token_file)
                except ValueError as exc:  # mid-rotation, or gone: keep the token Envoy has
                    log.warning("%s; keeping the current token", exc)
                    fresh = token
                if fresh != token and self.cold_at is None:
                    log.info("the service-account token changed: restarting envoy with it")
                    token = fresh
                    self.configure(sidecar_bootstrap(env, token))
                    self.restart()
            time.sleep(_TICK_S)
        signum = received[0]
        log.info("received %s: passing it on to envoy", signal.Signals(signum).name)
        current = self.current
        self.stop_all(signum)
        return exit_code(current.returncode if current is not None else None, signum)

    def stop_all(self, signum: int) -> None:
        """Signal every Envoy of ours, wait for them (kill after _STOP_TIMEOUT_S): no orphans.

        The new Envoy of a hot restart first, its parents once it has exited: a child still in the restart
        handshake blocks on its parent's answers, before its dispatcher (which handles the signal) runs, so
        a parent that left first would leave it deaf to the signal until it is killed."""
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        if self.current is not None:
            self._stop(self.current, signum, deadline=deadline)
        for p in self.parents:
            self._stop(p, signum, deadline=deadline)
        self.parents = []
        self._remove_shared_memory()

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], signum: int, *, deadline: float) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("envoy pid %d did not exit within %.0f s: killing it", proc.pid, _STOP_TIMEOUT_S)
            proc.kill()
            proc.wait()

    def _remove_shared_memory(self) -> None:
        """Envoy leaves its hot-restart shared memory behind when it exits (`envoy_shared_memory_<10 x base
        id>`): with every Envoy of this base id gone, nothing else can use it. In a pod /dev/shm goes with the
        pod anyway; on a shared host (tests) it would pile up."""
        base_id = self._base_id()
        if base_id is not None:
            (_SHM / f"envoy_shared_memory_{base_id * 10}").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
