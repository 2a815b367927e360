"""Clusters as isolated networks (`lockgate up --isolate-clusters`): a network namespace per cluster.

The layout, all named after the state dir (`<tag>`: 6 hex digits of its path), so a run finds and removes
what a crashed run on the same state dir left:

```
 root namespace (lockgate: control planes, service discovery)      lg<tag>h  10.77.0.1/16
        │ veth
 lockgate-<tag>          (the hub: one bridge, nothing else)         br0
        │ veth per cluster
 lockgate-<tag>-<cluster> (its gateways, sidecars, workloads, Prometheus)  eth0  10.77.K.1/16, lo 127.0.0.0/8
```

Inside a cluster's namespace, its sidecars and workloads keep 127.0.K.1, now a loopback address of that
namespace alone: nothing outside it can reach them. Only its ingress and east-west gateways (and its
Prometheus, for lockgate's analyses) listen on the bridge address 10.77.K.1, so the one path from one
cluster to another's instances is that cluster's east-west gateway. The namespaces have no default route:
nothing they send leaves the machine. Their processes reach lockgate at 10.77.0.1 (xDS, discovery).

Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): `NetworkError` says so otherwise.
Processes start under `nsenter --net=/run/netns/NS` (it execs the command, so the PID and command line
are the command's own); lockgate itself reaches into a namespace through sockets opened there
(`socket_in`), by a short-lived thread that joins the namespace with setns(2).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SUBNET = ipaddress.ip_network("10.77.0.0/16")
HOST_ADDRESS = "10.77.0.1"
"""lockgate's own address on the bridge (the root namespace side): control planes and discovery listen here."""
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_IP_TIMEOUT = 10.0


class NetworkError(Exception):
    """The isolated network could not be made (no privileges, no `ip`, the subnet taken, a command failed)."""


def network_tag(state_dir: Path) -> str:
    """Six hex digits naming everything one state dir's network holds (short: interface names are 15 bytes)."""
    return hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:6]


def gateway_address(index: int) -> str:
    """The bridge address of the index-th cluster (0-based): 10.77.1.1, 10.77.2.1, ..."""
    if not 0 <= index < 254:
        raise NetworkError(f"cluster #{index + 1}: at most 254 clusters fit in {SUBNET}")
    return f"10.77.{index + 1}.1"


@dataclass
class IsolatedNetwork:
    """One state dir's namespaces, bridge and links: made by `setup` and `add_cluster`, removed by `teardown`."""

    tag: str
    _clusters: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def for_state_dir(state_dir: Path) -> IsolatedNetwork:
        return IsolatedNetwork(tag=network_tag(state_dir))

    @property
    def hub(self) -> str:
        return f"lockgate-{self.tag}"

    @property
    def host_link(self) -> str:
        """The root namespace's end of the veth to the hub."""
        return f"lg{self.tag}h"

    def namespace(self, cluster: str) -> str:
        return f"{self.hub}-{cluster}"

    def prefix(self, cluster: str) -> list[str]:
        """What a command is run under to run inside the cluster's namespace."""
        nsenter = shutil.which("nsenter")
        if nsenter:
            return [nsenter, f"--net={NETNS_DIR / self.namespace(cluster)}", "--"]
        return [_ip(), "netns", "exec", self.namespace(cluster)]

    def path(self, cluster: str) -> Path:
        return NETNS_DIR / self.namespace(cluster)

    # --- making and removing -------------------------------------------------------------------------

    def setup(self) -> None:
        """Remove what a crashed run on this state dir left, then make the hub, its bridge and lockgate's
        link into it. On failure, whatever was made is removed again."""
        check_privileges()
        self.teardown()
        taken = _subnet_users(exclude=self.host_link)
        if taken:
            raise NetworkError(f"{SUBNET} is in use on this machine ({', '.join(taken)}): another `lockgate up "
                               "--isolate-clusters` on another state dir? Stop it first")
        try:
            _run("netns", "add", self.hub)
            _run("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("-n", self.hub, "link", "set", "br0", "up")
            _run("link", "add", self.host_link, "type", "veth", "peer", "name", "lockgate", "netns", self.hub)
            _run("-n", self.hub, "link", "set", "lockgate", "master", "br0")
            _run("-n", self.hub, "link", "set", "lockgate", "up")
            _run("addr", "add", f"{HOST_ADDRESS}/{SUBNET.prefixlen}", "dev", self.host_link)
            _run("link", "set", self.host_link, "up")
        except BaseException:
            self.teardown()
            raise

    def add_cluster(self, cluster: str, *, index: int) -> str:
        """The cluster's namespace, on the bridge at `gateway_address(index)`; returns that address."""
        address = gateway_address(index)
        if self._clusters.get(cluster) == index:
            return address
        ns, port = self.namespace(cluster), f"lg{self.tag}c{index}"
        _run("netns", "add", ns)
        self._clusters[cluster] = index
        _run("-n", ns, "link", "set", "lo", "up")
        _run("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("-n", self.hub, "link", "set", port, "master", "br0")
        _run("-n", self.hub, "link", "set", port, "up")
        _run("-n", ns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
        _run("-n", ns, "link", "set", "eth0", "up")
        return address

    def leftovers(self) -> list[str]:
        """What of this state dir's network exists now: namespaces, and lockgate's link."""
        found = [n for n in list_namespaces() if n == self.hub or n.startswith(f"{self.hub}-")]
        if _link_exists(self.host_link):
            found.append(f"link {self.host_link}")
        return found

    def teardown(self) -> None:
        """Remove every namespace and link of this state dir's network (processes in them must be gone
        first: a namespace lives on while a process is in it). Errors are logged, never raised: this runs
        on the way out."""
        if _link_exists(self.host_link):
            _quiet("link", "del", self.host_link)
        for ns in sorted(list_namespaces(), reverse=True):  # clusters before the hub
            if ns == self.hub or ns.startswith(f"{self.hub}-"):
                _quiet("netns", "del", ns)
        self._clusters.clear()


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise NetworkError("--isolate-clusters makes a network namespace per cluster, which needs root "
                           "(CAP_NET_ADMIN): run lockgate up as root, or leave the flag out (clusters then share "
                           "loopback addresses)")
    _ip()
    if shutil.which("nsenter") is None:
        log.info("nsenter not found: processes start under `ip netns exec`")


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except OSError:
        return []


def _ip() -> str:
    path = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if Path(p).is_file()), None)
    if path is None:
        raise NetworkError("--isolate-clusters needs the `ip` command: apt-get install iproute2 (./scripts/apt-deps)")
    return path


def _run(*args: str) -> None:
    try:
        done = subprocess.run([_ip(), *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"ip {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        why = done.stderr.strip() or f"exit {done.returncode}"
        hint = " (lockgate needs CAP_NET_ADMIN and CAP_SYS_ADMIN here)" if "ermission" in why else ""
        raise NetworkError(f"ip {' '.join(args)}: {why}{hint}")


def _quiet(*args: str) -> None:
    try:
        _run(*args)
    except NetworkError as exc:
        log.warning("cleaning up the isolated network: %s", exc)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _subnet_users(*, exclude: str) -> list[str]:
    """Interfaces of the root namespace with an address in SUBNET (other than `exclude`)."""
    try:
        out = subprocess.run([_ip(), "-o", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=_IP_TIMEOUT, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    users = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "inet" and fields[1] != exclude:
            with_prefix = ipaddress.ip_interface(fields[3])
            if with_prefix.network.overlaps(SUBNET):
                users.append(f"{fields[1]} {fields[3]}")
    return users


# --- reaching into a namespace -----------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in(namespace: Path, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of the network namespace at `namespace` (a socket keeps the namespace it was made in, so
    connecting or binding it works there whatever thread uses it later). Made by a thread of its own that
    joins the namespace and ends, so no thread of this process stays in it."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            with open(namespace, "rb") as f:
                _setns(f.fileno())
            made.append(socket.socket(family, kind))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=make, name=f"netns {namespace.name}", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def free_port_in(namespace: Path, address: str, taken: set[int]) -> int:
    """A port nobody listens on at `address` inside the namespace (and not in `taken`, which gets it)."""
    for _ in range(100):
        with socket_in(namespace) as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError(f"no free port on {address} in {namespace.name}")


def connect_in(namespace: Path, address: tuple[str, int], *, timeout: float = 2.0) -> socket.socket:
    """A TCP connection made from inside the namespace (blocking; what a client there would open)."""
    sock = socket_in(namespace)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_tcp_in(namespace: Path, host: str, port: int, *, timeout: float, interval: float = 0.025,
                      attempt_timeout: float = 1.0, name: str | None = None) -> None:
    """Until `host:port` accepts a TCP connection made inside the namespace (mesh.probe.wait_tcp, there)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no attempt finished"
    while True:
        sock = socket_in(namespace)
        sock.setblocking(False)
        try:
            budget = max(min(attempt_timeout, deadline - loop.time()), 0.01)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), budget)
            return
        except TimeoutError:
            last = f"no answer within {budget:g}s"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(OSError):
                sock.close()
        if loop.time() >= deadline:
            raise TimeoutError(f"{name or f'TCP {host}:{port}'} in {namespace.name} not ready after {timeout:g}s "
                               f"(last: {last})")
        await asyncio.sleep(min(interval, max(deadline - loop.time(), 0.0)))


def namespaces_of(tag: str) -> Sequence[str]:
    """Every namespace named after one state dir's tag (for tests and cleanup checks)."""
    hub = f"lockgate-{tag}"
    return [n for n in list_namespaces() if n == hub or n.startswith(f"{hub}-")]
