"""LocalRuntime: every cluster's gateway, sidecars and workloads as processes on this machine.

Each cluster lives on its own loopback address (127.0.K.1). An instance is ready for traffic only when
its app accepts connections and its sidecar has taken its configuration, so render never sends traffic
to something that would refuse it.

With `network` (`lockgate up --isolate-clusters`), each cluster runs in a network namespace of its own
(`netns.py`): 127.0.K.1 is then that namespace's loopback, its gateways and Prometheus listen on its bridge
address 10.77.K.1, and lockgate serves its control planes on 10.77.0.1. A data plane in a network that is
rebuilt cannot be adopted: a start with `network` stops whatever an earlier run left (and so does a start
without it after an isolated run), and an explicit stop removes the network with the processes.

Zero trust, locally: every Envoy gets a fresh random token in its bootstrap (0600, in a 0700 directory)
each time it is started, and its control plane accepts a stream only with the token of the node it claims
(lockgate keeps SHA-256 digests only, in memory and in processes.json, so a restarted lockgate still knows
the Envoys it adopts). Envoy admin listens on a Unix socket, never on TCP; Prometheus scrapes a listener
that answers `GET /stats/prometheus` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.envoy import XDS_DELTA, admin_address, bootstrap, envoy_argv, wait_ready
from mesh.intent import Intent, Workload
from mesh.names import NodeId
from mesh.probe import wait_tcp
from mesh.render import egress_key
from mesh.render.tcp import destinations as tcp_destinations
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.server import Authenticator
from mesh.xds.snapshot import digest
from multicluster.eastwest import EASTWEST
from reconciler.observe.exporter import read_exposition
from reconciler.runtime.base import Bind, Metrics, ProxyProcess, RuntimeStatus, WorkloadInstance
from reconciler.runtime.local.netns import HOST_ADDRESS, IsolatedNetwork, free_port_in, wait_tcp_in
from reconciler.runtime.local.ports import cluster_address, free_port, preferred_port
from reconciler.runtime.local.prometheus import DiscoveryServer, LocalPrometheus, scrape_targets
from reconciler.runtime.local.supervisor import Supervised, child_env, stop_all, stop_and_wait, stop_orphan
from reconciler.state import read_json, write_json

log = logging.getLogger(__name__)
READY_TIMEOUT = 60.0
PROCESSES_FILE = "processes.json"
DRAIN_S = 2.0
"""Seconds a removed instance keeps running after it left the endpoints: callers' Envoys close their
pooled connections to a removed host, so none is reused against a process that is gone (a 502)."""


Destinations = tuple[tuple[str, str, int], ...]
"""(namespace, service, port) of the TCP service ports one workload may call."""


SOCKET_PATH_MAX = 107
"""Bytes a Unix socket path may have on Linux (sun_path is 108 with its terminating NUL)."""
_SOCKET_NAME_LEN = len("0123456789ab.sock")


def socket_dir(state_dir: Path) -> Path:
    """Where the proxies' admin sockets live: STATE/run, or, when that path is too long for a Unix socket
    name, a directory named after the state dir under $XDG_RUNTIME_DIR (per user, 0700 already) or /tmp.
    Created 0700; an existing one must be a real directory of ours that nobody else may enter."""
    home = state_dir.resolve() / "run"
    if len(os.fsencode(home)) + 1 + _SOCKET_NAME_LEN <= SOCKET_PATH_MAX:
        _private_dir(home)
        return home
    tag = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:12]
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and Path(xdg).is_absolute() and Path(xdg).is_dir():
        candidate = Path(xdg) / f"lockgate-{tag}"
        if len(os.fsencode(candidate)) + 1 + _SOCKET_NAME_LEN <= SOCKET_PATH_MAX:
            _private_dir(candidate, shared_parent=True)
            return candidate
    candidate = Path("/tmp") / f"lockgate-{os.getuid()}-{tag}"
    _private_dir(candidate, shared_parent=True)
    return candidate


def _private_dir(path: Path, *, shared_parent: bool = False) -> None:
    """`path` as a 0700 directory. Under a directory others can write to (/tmp), one that exists already
    must be ours and no symlink, or someone else could read or replace the sockets in it."""
    path.mkdir(mode=0o700, parents=not shared_parent, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{path} is not a directory of this user: refusing to put admin sockets there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def write_private(path: Path, text: str) -> None:
    """Write `path` atomically, 0600 from its first byte (mkstemp) in a 0700 directory: a bootstrap holds
    its proxy's credential. No fsync: the file is rewritten before every start of the one process that
    reads it, so after a power loss the next start writes it again."""
    _private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class _Credential:
    cluster: str
    digest: bytes
    owner: Supervised | None
    """The Envoy it was issued to; None: recorded by an earlier lockgate and not (yet) adopted."""


class ProxyTokens:
    """Every proxy's xDS credential, as SHA-256 digests only: the token itself exists in the proxy's
    bootstrap and nowhere else. A token is issued before each start of an Envoy (a restarted Envoy gets
    a new one) and revoked when it stops; an adopted Envoy keeps the one recorded for it."""

    def __init__(self, recorded: Mapping[str, object] | None = None) -> None:
        self._by_node: dict[str, _Credential] = {}
        for node_id, hexdigest in (recorded or {}).items():
            with contextlib.suppress(ValueError, TypeError):
                self._by_node[node_id] = _Credential(cluster=NodeId.parse(node_id).cluster,
                                                     digest=bytes.fromhex(str(hexdigest)), owner=None)

    def issue(self, node_id: str, owner: Supervised) -> str:
        token = secrets.token_urlsafe(32)
        self._by_node[node_id] = _Credential(cluster=NodeId.parse(node_id).cluster, digest=_digest(token),
                                             owner=owner)
        return token

    def recorded(self, node_id: str) -> bool:
        return node_id in self._by_node

    def claim(self, node_id: str, owner: Supervised) -> None:
        """`owner` adopted the process an earlier lockgate started for `node_id`: its token stays valid."""
        if (cred := self._by_node.get(node_id)) is not None:
            cred.owner = owner

    def revoke(self, node_id: str, owner: Supervised) -> None:
        """`owner` stopped for good: its token goes (not a successor's with the same node id)."""
        cred = self._by_node.get(node_id)
        if cred is not None and cred.owner is owner:
            del self._by_node[node_id]

    def drop_unclaimed(self) -> None:
        """After the orphan check: tokens of processes no one adopted are of processes that are gone."""
        self._by_node = {n: c for n, c in self._by_node.items() if c.owner is not None}

    def clear(self) -> None:
        self._by_node.clear()

    def node_for(self, cluster: str, token: str) -> str | None:
        """The node of `cluster` whose token this is. Every candidate is compared in constant time."""
        digest, found = _digest(token), None
        for node_id, cred in self._by_node.items():
            if hmac.compare_digest(cred.digest, digest) and cred.cluster == cluster:
                found = node_id
        return found

    def to_json(self) -> dict[str, str]:
        return {node_id: cred.digest.hex() for node_id, cred in sorted(self._by_node.items())}


@dataclass(frozen=True)
class ClusterAuthenticator:
    """The `Authenticator` of one cluster's control plane: only that cluster's proxies' tokens count."""

    tokens: ProxyTokens
    cluster: str

    def node_for(self, token: str) -> str | None:
        return self.tokens.node_for(self.cluster, token)


def resolve_command(argv: list[str]) -> list[str]:
    """`lockgate ...` runs this very installation, whether or not it is on PATH."""
    if argv and argv[0] == "lockgate":
        return [sys.executable, "-m", "reconciler.cli", *argv[1:]]
    return argv


@dataclass
class _Instance:
    fingerprint: str
    sidecar: Sidecar
    cluster: str
    stats_port: int
    """The proxy's read-only stats listener (what Prometheus scrapes)."""
    admin_socket: Path
    app: Supervised
    envoy: Supervised
    ready: bool = False
    probe: asyncio.Task[None] | None = None


@dataclass
class _Cluster:
    name: str
    address: str
    xds_port: int
    ingress: Gateway
    stats_port: int
    envoy: Supervised
    eastwest: Gateway
    eastwest_stats: int
    eastwest_envoy: Supervised
    discovery: DiscoveryServer
    prometheus: LocalPrometheus | None
    metrics: Metrics
    netns: Path | None = None
    """The cluster's network namespace (with --isolate-clusters); None: the root namespace's loopback."""
    prefix: tuple[str, ...] = ()
    """What its processes run under (`nsenter` into `netns`)."""
    xds_host: str | None = None
    """Where its proxies reach its control plane; None: `address`."""


@dataclass
class LocalRuntime:
    """The `Runtime` of processes on this machine: one loopback address per cluster (127.0.K.1), its
    gateways, sidecars and workloads, and a Prometheus per cluster (or the user's) that finds every proxy
    through service discovery served here."""

    state_dir: Path
    envoy_log_level: str = "warning"
    prometheus_url: str | None = None
    """An existing Prometheus for every cluster (it should scrape each cluster's discovery URL); None
    starts one per cluster."""
    _notify: Callable[[], None] = lambda: None
    _clusters: dict[str, _Cluster] = field(default_factory=dict)
    _instances: dict[tuple[str, str, str, int], _Instance] = field(default_factory=dict)
    _ports: set[int] = field(default_factory=set)
    _drains: set[asyncio.Task[None]] = field(default_factory=set)
    """Instances removed from the endpoints, stopped after DRAIN_S (see `apply`)."""
    _leaving: list[_Instance] = field(default_factory=list)
    _records: dict[str, Any] = field(default_factory=dict)
    """What an earlier `lockgate up` on this state dir left running (PIDs, ports), for adoption."""
    _orphans_checked: bool = False
    _tokens: ProxyTokens = field(default_factory=ProxyTokens)
    _sockets: Path | None = None
    network: IsolatedNetwork | None = None
    """Clusters as isolated networks: a network namespace per cluster, set up here and removed by `close`."""
    _indexes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._records = read_json(self.state_dir / PROCESSES_FILE)
        self._records.setdefault("clusters", {})
        self._records.setdefault("instances", {})
        if self.network is not None or self._records.get("network"):
            self._forget_earlier_run()
        if self.network is not None:
            self.network.setup()  # NetworkError (no root, subnet taken) before anything starts
        # Known before any control plane listens: the Envoys an earlier lockgate left reconnect at once.
        recorded = self._records.get("tokens")
        self._tokens = ProxyTokens(recorded if isinstance(recorded, dict) else {})

    def _forget_earlier_run(self) -> None:
        """Stop what an earlier lockgate on this state dir left running and drop its records: with an
        isolated network on either side, its processes cannot be adopted (their network is rebuilt, or
        their bootstrap points into one that is gone). Only PIDs still running their recorded command."""
        procs: list[tuple[int, list[str], float | None]] = []
        for name, rec in self._records["clusters"].items():
            for kind in ("ingress", "eastwest"):
                if rec.get(f"{kind}_pid"):
                    procs.append((rec[f"{kind}_pid"], self._envoy_argv(f"{name}/{kind}"), rec.get(f"{kind}_started")))
        for node_id, rec in self._records["instances"].items():
            if rec.get("envoy_pid"):
                procs.append((rec["envoy_pid"], self._envoy_argv(node_id), rec.get("envoy_started")))
            if rec.get("app_pid") and rec.get("argv"):
                procs.append((rec["app_pid"], rec["argv"], rec.get("app_started")))
        stop_and_wait(procs)
        stale = self._records.get("network")
        if isinstance(stale, str) and (self.network is None or self.network.tag != stale):
            IsolatedNetwork(tag=stale).teardown()  # an isolated run's network, now that nothing runs in it
        self._records = {"clusters": {}, "instances": {}}
        write_json(self.state_dir / PROCESSES_FILE, {"clusters": {}, "instances": {}, "tokens": {}})

    def on_change(self, callback: Callable[[], None]) -> None:
        self._notify = callback

    def _changed(self) -> None:
        self._notify()

    def _save(self) -> None:
        """Record every process and its ports, so a lockgate restarted after a crash can adopt them."""
        clusters = {c.name: {"xds_port": c.xds_port, "ingress_port": c.ingress.port, "ingress_stats": c.stats_port,
                             "ingress_pid": c.envoy.pid, "ingress_started": c.envoy.started,
                             "eastwest_port": c.eastwest.port, "eastwest_stats": c.eastwest_stats,
                             "eastwest_pid": c.eastwest_envoy.pid, "eastwest_started": c.eastwest_envoy.started,
                             "prometheus_port": c.prometheus.port if c.prometheus else None}
                    for c in self._clusters.values()}
        instances = {inst.sidecar.node_id: {  # leaving ones too: a crash before they stop must not orphan them
            "fingerprint": inst.fingerprint, "inbound": inst.sidecar.inbound_port,
            "outbound": inst.sidecar.outbound_port, "app_port": inst.sidecar.app_port, "stats": inst.stats_port,
            "app_pid": inst.app.pid, "envoy_pid": inst.envoy.pid, "xds_port": self._clusters[inst.cluster].xds_port,
            "app_started": inst.app.started, "envoy_started": inst.envoy.started,
            "argv": list(inst.app.argv), "tcp_outbound": [list(e) for e in inst.sidecar.tcp_outbound],
        } for inst in [*self._leaving, *self._instances.values()]}
        # Records of processes not (yet) taken over stay until the orphan check has dealt with them.
        if not self._orphans_checked:
            clusters = {**self._records["clusters"], **clusters}
            instances = {**self._records["instances"], **instances}
        write_json(self.state_dir / PROCESSES_FILE, {"clusters": clusters, "instances": instances,
                                                     "tokens": self._tokens.to_json(),
                                                     "network": self.network.tag if self.network else None})

    def authenticator(self, cluster: str) -> Authenticator:
        """Each stream must carry the token of one of this cluster's proxies, and is bound to that proxy."""
        return ClusterAuthenticator(self._tokens, cluster)

    def _admin_socket(self, node_id: str) -> Path:
        """A short per-proxy name (Unix socket paths are limited to 107 bytes)."""
        if self._sockets is None:
            self._sockets = socket_dir(self.state_dir)
        return self._sockets / f"{hashlib.sha256(node_id.encode()).hexdigest()[:12]}.sock"

    def serves(self, cluster: str) -> bool:
        return True

    def control_plane(self, cluster: str, *, index: int) -> Bind:
        """The cluster's loopback address, and the control-plane port an earlier lockgate used for it:
        binding it again lets the gateways and sidecars it left running reconnect (their bootstrap names it).
        Isolated: lockgate's own address on the bridge, the one the cluster's namespace can reach."""
        self._indexes[cluster] = index
        port = self._records["clusters"].get(cluster, {}).get("xds_port")
        return Bind(address=HOST_ADDRESS if self.network else cluster_address(index), port=int(port) if port else 0)

    def _free_port(self, address: str, netns: Path | None) -> int:
        return free_port(address, self._ports) if netns is None else free_port_in(netns, address, self._ports)

    def _stop_orphans(self) -> None:
        """After the first apply: processes an earlier lockgate left that were not adopted are stopped
        (only if each PID still runs the command line recorded for it)."""
        if self._orphans_checked:
            return
        self._orphans_checked = True
        self._tokens.drop_unclaimed()
        mine = {pid for c in self._clusters.values() for pid in (c.envoy.pid, c.eastwest_envoy.pid)}
        mine |= {pid for inst in self._instances.values() for pid in (inst.app.pid, inst.envoy.pid)}
        for name, rec in self._records["clusters"].items():
            for kind in ("ingress", "eastwest"):
                pid = rec.get(f"{kind}_pid")
                if pid and pid not in mine:
                    stop_orphan(pid, self._envoy_argv(f"{name}/{kind}"), started=rec.get(f"{kind}_started"))
        for node_id, rec in self._records["instances"].items():
            if rec.get("envoy_pid") and rec["envoy_pid"] not in mine:
                stop_orphan(rec["envoy_pid"], self._envoy_argv(node_id), started=rec.get("envoy_started"))
            if rec.get("app_pid") and rec["app_pid"] not in mine and rec.get("argv"):
                stop_orphan(rec["app_pid"], rec["argv"], started=rec.get("app_started"))
        self._save()

    # --- clusters -------------------------------------------------------------------------------------

    async def add_cluster(self, *, name: str, xds: Bind) -> None:
        """Start the cluster's ingress and east-west gateways, its service discovery and its Prometheus.
        Ports an earlier lockgate used are reused when still free (stable URLs)."""
        if name in self._clusters:
            return
        address, xds_port = xds.address, xds.port
        exposed, netns, prefix = address, None, []
        if self.network is not None:
            # Sidecars and workloads on the namespace's own loopback; gateways on its bridge address.
            index = self._indexes.get(name, len(self._clusters))
            address = cluster_address(index)
            exposed = await asyncio.to_thread(self.network.add_cluster, name, index=index)
            netns, prefix = self.network.path(name), self.network.prefix(name)
        rec = self._records["clusters"].get(name) or {}
        # Records of an older lockgate (TCP admin, no tokens: no "ingress_stats") are not adopted.
        adopting = (rec.get("xds_port") == xds_port and bool(rec.get("ingress_pid") or rec.get("eastwest_pid"))
                    and "ingress_stats" in rec)
        if adopting:
            # An earlier lockgate's gateways, still serving: keep their ports and take them over.
            ingress_port, stats = rec["ingress_port"], rec["ingress_stats"]
            ew_port, ew_stats = rec["eastwest_port"], rec["eastwest_stats"]
            self._ports |= {ingress_port, stats, ew_stats, ew_port}
        elif netns is None:
            ingress_port = preferred_port(address, rec.get("ingress_port"), self._ports)
            stats, ew_stats, ew_port = (free_port(address, self._ports) for _ in range(3))
        else:
            ingress_port, ew_port = (free_port_in(netns, exposed, self._ports) for _ in range(2))
            stats, ew_stats = (free_port_in(netns, address, self._ports) for _ in range(2))
        ingress_id = str(NodeId.gateway(cluster=name, kind="ingress"))
        envoy = self._envoy(node_id=ingress_id, cluster=name, address=address, xds_host=xds.address,
                            xds_port=xds_port, stats_port=stats, prefix=prefix)
        gw = Gateway(node_id=ingress_id, address=exposed, port=ingress_port)
        ew = Gateway(node_id=str(NodeId.gateway(cluster=name, kind=EASTWEST)), address=exposed, port=ew_port,
                     kind=EASTWEST)
        ew_envoy = self._envoy(node_id=ew.node_id, cluster=name, address=address, xds_host=xds.address,
                               xds_port=xds_port, stats_port=ew_stats, prefix=prefix)
        sd = DiscoveryServer(address=xds.address, targets=lambda: scrape_targets(self.status(), name),
                             exporter=lambda: read_exposition(self.state_dir),  # each rollout's canary weight
                             exporter_labels={"cluster": name, "kind": "lockgate"})
        await sd.start()
        local: LocalPrometheus | None = None
        if self.prometheus_url is None:
            # Isolated, it runs in the namespace (it scrapes the proxies there) on the bridge address (lockgate
            # queries it from outside).
            port = (preferred_port(address, rec.get("prometheus_port"), self._ports) if netns is None
                    else free_port_in(netns, exposed, self._ports))
            local = LocalPrometheus(cluster=name, address=exposed, sd_url=sd.url, state_dir=self.state_dir,
                                    port=port, prefix=prefix)
            await local.start()
        metrics = Metrics(url=local.url if local else str(self.prometheus_url), discovery=sd.url,
                          local=local is not None)
        self._clusters[name] = _Cluster(name, address, xds_port, gw, stats, envoy, ew, ew_stats, ew_envoy,
                                        discovery=sd, prometheus=local, metrics=metrics, netns=netns,
                                        prefix=tuple(prefix), xds_host=xds.address)
        for sup, node_id, kind in ((envoy, ingress_id, "ingress"), (ew_envoy, ew.node_id, "eastwest")):
            sup.on_start = lambda _s: self._save()
            pid = rec.get(f"{kind}_pid") if adopting and self._tokens.recorded(node_id) else None
            if pid and sup.adopt(pid, started=rec.get(f"{kind}_started")):
                self._tokens.claim(node_id, sup)  # it reconnects with the token it was started with
            else:
                await sup.start()
        self._save()

    async def remove_cluster(self, name: str) -> None:
        """Stop the cluster's gateways, its service discovery and its Prometheus; instances of it still
        draining stop now (the loop removes a cluster once the others route around it). Isolated, its
        network namespace stays until the explicit stop (`close`), which tears down every namespace."""
        c = self._clusters.get(name)
        if c is None:
            return
        leaving = [inst for inst in self._leaving if inst.cluster == name]
        for inst in leaving:
            await self._stop_instance(inst)
        await stop_all([c.envoy, c.eastwest_envoy])
        for sup, gw, stats in ((c.envoy, c.ingress, c.stats_port), (c.eastwest_envoy, c.eastwest, c.eastwest_stats)):
            self._tokens.revoke(gw.node_id, sup)
            self._admin_socket(gw.node_id).unlink(missing_ok=True)  # Envoy leaves its socket file behind
            self._ports.difference_update((gw.port, stats))
        await c.discovery.stop()
        if c.prometheus is not None:
            await c.prometheus.stop()
            self._ports.discard(c.prometheus.port)
        self._leaving = [inst for inst in self._leaving if inst.cluster != name]  # their drain finds them gone
        del self._clusters[name]
        self._save()
        self._changed()

    def metrics(self, cluster: str) -> Metrics | None:
        c = self._clusters.get(cluster)
        if c is None:
            return None
        pid = c.prometheus.process.info.pid if c.prometheus else None
        return Metrics(url=c.metrics.url, discovery=c.metrics.discovery, local=c.metrics.local, pid=pid)

    def _envoy(self, *, node_id: str, cluster: str, address: str, xds_port: int, stats_port: int,
               xds_host: str | None = None, prefix: Sequence[str] = ()) -> Supervised:
        """A supervised Envoy whose every start (first and restarts, not adoption) writes its bootstrap
        with a new token: the old token dies with the process that held it. Its stats listener is on
        `address`, its control plane at `xds_host` (the same address unless the cluster is isolated)."""
        slug = NodeId.parse(node_id).slug
        cfg = self.state_dir / "envoy" / f"{slug}.json"
        socket = self._admin_socket(node_id)

        def write_bootstrap(sup: Supervised) -> None:
            token = self._tokens.issue(node_id, sup)
            write_private(cfg, json.dumps(bootstrap(
                node_id=node_id, cluster=cluster, xds_host=xds_host or address, xds_port=xds_port, admin_socket=socket,
                stats_host=address, stats_port=stats_port, xds_token=token, delta=XDS_DELTA), indent=1))

        return Supervised(name=f"envoy {node_id}", argv=self._envoy_argv(node_id), env=child_env({}),
                          log_path=self.state_dir / "logs" / f"envoy-{slug}.log", before_spawn=write_bootstrap,
                          prefix=prefix)

    def _envoy_argv(self, node_id: str) -> list[str]:
        cfg = self.state_dir / "envoy" / f"{NodeId.parse(node_id).slug}.json"
        return envoy_argv(config_path=cfg, log_level=self.envoy_log_level)

    # --- workloads ------------------------------------------------------------------------------------

    async def apply(self, intent: Intent) -> None:
        """Make the running instances match the intent's Workloads: start new ones, stop removed ones."""
        desired: dict[tuple[str, str, str, int], tuple[Workload, str, Destinations]] = {}
        for (ns, name), w in sorted(intent.workloads.items()):
            allowed = None if w.spec.egress is None else frozenset(egress_key(e, ns) for e in w.spec.egress)
            tcp = tcp_destinations(intent, allowed)
            # The TCP services an instance may call are part of it: each is a listener of its sidecar at a port
            # its app was told at start, so a new one restarts the instance (only when there are any: workloads
            # without TCP destinations keep the fingerprint they always had).
            fp = digest(w.spec.model_dump(mode="json") if not tcp else [w.spec.model_dump(mode="json"), tcp])
            for cluster in w.spec.clusters:
                if cluster not in self._clusters:
                    continue
                for i in range(w.spec.replicas):
                    desired[(cluster, ns, name, i)] = (w, fp, tcp)
        changed = [k for k, inst in self._instances.items() if k in desired and desired[k][1] != inst.fingerprint]
        for key in changed:  # same node id, new spec: the old one must be gone before its successor starts
            await self._stop_instance(self._instances.pop(key))
        gone = [k for k in self._instances if k not in desired]
        if gone:
            # Break after make: the instances leave the endpoints first (the push below), and their
            # processes stop only once callers' Envoys have let go of connections to them.
            leaving = [self._instances.pop(key) for key in gone]
            for inst in leaving:
                inst.ready = False
            self._leaving += leaving
            task = asyncio.create_task(self._drain(leaving), name="drain instances")
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        if gone or changed:
            self._changed()
        started = [self._start_instance(key, w, fp, tcp) for key, (w, fp, tcp) in desired.items()
                   if key not in self._instances]
        await asyncio.gather(*started)
        self._save()
        self._stop_orphans()  # what an earlier lockgate left and this revision does not want

    async def _start_instance(self, key: tuple[str, str, str, int], w: Workload, fp: str, tcp: Destinations
                              ) -> None:
        cluster, ns, name, i = key
        c = self._clusters[cluster]
        node_id = str(NodeId.sidecar(cluster=cluster, namespace=ns, workload=name, index=i))
        rec = self._records["instances"].get(node_id)
        argv = resolve_command(list(w.spec.command))
        adoptable = (rec is not None and rec.get("fingerprint") == fp and rec.get("xds_port") == c.xds_port
                     and rec.get("argv") == argv and "stats" in rec and self._tokens.recorded(node_id))
        recorded_tcp = [tuple(e) for e in rec.get("tcp_outbound", [])] if rec is not None else []
        if rec is not None and adoptable and [e[:3] for e in recorded_tcp] == list(tcp):
            ports = (rec["inbound"], rec["outbound"], rec["app_port"], rec["stats"])
            tcp_ports = [int(e[3]) for e in recorded_tcp]
        else:
            adoptable = False
            ports = tuple(self._free_port(c.address, c.netns) for _ in range(4))  # type: ignore[assignment]
            tcp_ports = [self._free_port(c.address, c.netns) for _ in tcp]
        self._ports |= {*ports, *tcp_ports}
        sc = Sidecar(
            node_id=node_id, namespace=ns, service=w.spec.service, version=w.spec.version, workload=name,
            address=c.address, inbound_port=ports[0], outbound_port=ports[1], app_port=ports[2],
            tcp_outbound=tuple((dns, dsvc, dport, local) for (dns, dsvc, dport), local in zip(tcp, tcp_ports,
                                                                                             strict=True)),
        )
        stats = ports[3]
        env = child_env({
            **w.spec.env,
            "HOST": sc.address, "PORT": str(sc.app_port),
            "LOCKGATE_SERVICE": sc.service, "LOCKGATE_VERSION": sc.version, "LOCKGATE_CLUSTER": cluster,
            "LOCKGATE_NAMESPACE": ns, "LOCKGATE_INSTANCE": f"{name}-{i}",
            "HTTP_PROXY": f"http://{sc.address}:{sc.outbound_port}",
            "http_proxy": f"http://{sc.address}:{sc.outbound_port}",
            **tcp_env(sc),
        })
        slug = NodeId.parse(node_id).slug
        app = Supervised(name=f"workload {node_id}", argv=argv, env=env,
                         log_path=self.state_dir / "logs" / f"app-{slug}.log", prefix=c.prefix)
        envoy = self._envoy(node_id=node_id, cluster=cluster, address=c.address, xds_host=c.xds_host,
                            xds_port=c.xds_port, stats_port=stats, prefix=c.prefix)
        inst = _Instance(fingerprint=fp, sidecar=sc, cluster=cluster, stats_port=stats,
                         admin_socket=self._admin_socket(node_id), app=app, envoy=envoy)
        app.on_exit = envoy.on_exit = lambda _s: self._unready(inst)
        app.on_start = envoy.on_start = lambda _s: self._started(inst)
        self._instances[key] = inst
        if rec is not None and adoptable and envoy.adopt(rec["envoy_pid"], started=rec.get("envoy_started")):
            self._tokens.claim(node_id, envoy)  # it reconnects with the token it was started with
            if app.adopt(rec["app_pid"], started=rec.get("app_started")):
                # Both still serving, taken over as they are: an endpoint at once, as before the crash. Waiting
                # for the probe would push empty endpoints to proxies that reconnect within half a second
                # ("no healthy upstream"); the probe still runs, and a failed one takes the instance out.
                inst.ready = True
                return
        for sup in (envoy, app):
            if sup.pid is not None:  # half adopted: start the pair afresh
                await sup.stop()
        await envoy.start()
        await app.start()

    def _started(self, inst: _Instance) -> None:
        self._probe(inst)
        self._save()

    def _unready(self, inst: _Instance) -> None:
        if inst.ready:
            inst.ready = False
            self._changed()

    def _probe(self, inst: _Instance) -> None:
        if inst.probe is not None and not inst.probe.done():
            return  # the running probe waits for both the app and its sidecar anyway
        inst.probe = asyncio.create_task(self._wait_ready(inst), name=f"probe {inst.sidecar.node_id}")

    async def _wait_ready(self, inst: _Instance) -> None:
        sc = inst.sidecar
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        try:
            name = f"{sc.node_id}'s app at {sc.address}:{sc.app_port}"
            netns = self._clusters[inst.cluster].netns if inst.cluster in self._clusters else None
            if netns is None:
                await wait_tcp(sc.address, sc.app_port, timeout=READY_TIMEOUT, name=name)
            else:  # the app listens on the namespace's loopback: only a socket made there reaches it
                await wait_tcp_in(netns, sc.address, sc.app_port, timeout=READY_TIMEOUT, name=name)
            await wait_ready(inst.admin_socket, timeout=max(deadline - loop.time(), 0.0))
        except (TimeoutError, OSError) as exc:
            log.warning("%s is not ready: %s (logs in %s)", sc.node_id, exc, self.state_dir / "logs")
            if inst.ready:  # an adopted instance that does not answer after all
                inst.ready = False
                self._changed()
            return
        if inst.app.pid is not None and inst.envoy.pid is not None and not inst.ready:
            inst.ready = True
            self._changed()

    async def _drain(self, leaving: list[_Instance]) -> None:
        await asyncio.sleep(DRAIN_S)
        for inst in leaving:
            if inst in self._leaving:  # else its cluster was removed, and it with it
                await self._stop_instance(inst)
                self._leaving.remove(inst)
        self._save()

    async def _stop_instance(self, inst: _Instance) -> None:
        inst.ready = False
        if inst.probe is not None:
            inst.probe.cancel()
        await stop_all([inst.app, inst.envoy])
        self._tokens.revoke(inst.sidecar.node_id, inst.envoy)
        if not any(i.sidecar.node_id == inst.sidecar.node_id for i in self._instances.values()):
            inst.admin_socket.unlink(missing_ok=True)  # no successor binds it: Envoy leaves the file behind
        self._save()
        for port in (inst.sidecar.inbound_port, inst.sidecar.outbound_port, inst.sidecar.app_port,
                     inst.stats_port, *(e[3] for e in inst.sidecar.tcp_outbound)):
            self._ports.discard(port)

    # --- what render and status read ------------------------------------------------------------------

    def topology(self, cluster: str) -> ClusterTopology:
        c = self._clusters.get(cluster)
        mine = [inst for inst in self._instances.values() if inst.cluster == cluster]
        return ClusterTopology(
            cluster=cluster,
            ingress=c.ingress if c else None,
            gateways=(c.eastwest,) if c else (),
            sidecars=tuple(sorted((inst.sidecar for inst in mine), key=lambda s: s.node_id)),
            ready=frozenset(inst.sidecar.node_id for inst in mine if inst.ready),
        )

    def status(self) -> RuntimeStatus:
        proxies: dict[str, ProxyProcess] = {}
        workloads = []
        for c in self._clusters.values():
            gateways = ((c.ingress, c.envoy, c.stats_port), (c.eastwest, c.eastwest_envoy, c.eastwest_stats))
            for gw, sup, stats in gateways:
                proxies[gw.node_id] = _proxy(sup, self._admin_socket(gw.node_id), f"{c.address}:{stats}")
        for inst in self._instances.values():
            sc = inst.sidecar
            proxies[sc.node_id] = _proxy(inst.envoy, inst.admin_socket, f"{sc.address}:{inst.stats_port}")
            workloads.append(WorkloadInstance(
                id=sc.node_id, cluster=inst.cluster, namespace=sc.namespace, service=sc.service,
                version=sc.version, workload=sc.workload, pid=inst.app.info.pid, state=inst.app.info.state,
                restarts=inst.app.info.restarts, ready=inst.ready, address=f"{sc.address}:{sc.app_port}",
                endpoint=f"{sc.address}:{sc.inbound_port}", http_proxy=f"http://{sc.address}:{sc.outbound_port}"))
        return RuntimeStatus(proxies=proxies, workloads=workloads)

    async def close(self) -> None:
        """Stop every process this runtime started: workloads first, then their sidecars, then gateways."""
        for task in list(self._drains):  # instances on their way out go now, with the rest
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        await stop_all([p for inst in self._leaving for p in (inst.app, inst.envoy)])
        self._leaving.clear()
        for inst in self._instances.values():
            if inst.probe is not None:
                inst.probe.cancel()
        await stop_all([inst.app for inst in self._instances.values()])
        await stop_all([inst.envoy for inst in self._instances.values()]
                       + [e for c in self._clusters.values() for e in (c.envoy, c.eastwest_envoy)])
        for c in self._clusters.values():
            await c.discovery.stop()
            if c.prometheus is not None:
                await c.prometheus.stop()
        # Nothing left running, so nothing to adopt; the ports stay as preferences (stable URLs next time).
        preferred = {c.name: {"xds_port": c.xds_port, "ingress_port": c.ingress.port,
                              "prometheus_port": c.prometheus.port if c.prometheus else None}
                     for c in self._clusters.values()}
        nodes = [inst.sidecar.node_id for inst in self._instances.values()]
        nodes += [g.node_id for c in self._clusters.values() for g in (c.ingress, c.eastwest)]
        for node_id in nodes:
            self._admin_socket(node_id).unlink(missing_ok=True)  # Envoy leaves its socket file behind
        self._instances.clear()
        self._clusters.clear()
        self._orphans_checked = True
        self._tokens.clear()
        if self.network is not None:
            # Everything in the namespaces has stopped: they go, with their links (and ports mean nothing there).
            await asyncio.to_thread(self.network.teardown)
            preferred = {}
        write_json(self.state_dir / PROCESSES_FILE, {"clusters": preferred, "instances": {}, "tokens": {}})


def tcp_env(sc: Sidecar) -> dict[str, str]:
    """Where the app reaches each TCP service port: `LOCKGATE_TCP_<SERVICE>_<NAMESPACE>_<PORT>=host:port`
    (upper case, `-` as `_`), its sidecar's listener for that destination."""
    host = sc.outbound_address or sc.address
    return {f"LOCKGATE_TCP_{svc}_{ns}_{port}".upper().replace("-", "_"): f"{host}:{local}"
            for ns, svc, port, local in sc.tcp_outbound}


def _proxy(envoy: Supervised, socket: Path, stats: str) -> ProxyProcess:
    return ProxyProcess(pid=envoy.info.pid, state=envoy.info.state, restarts=envoy.info.restarts,
                        admin=admin_address(socket), admin_socket=str(socket), stats=stats)
