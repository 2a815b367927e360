"""LocalRuntime: every cluster's gateway, sidecars and workloads as processes on this machine.

Each cluster lives on its own loopback address (127.0.K.1). An instance is ready for traffic only when
its app accepts connections and its sidecar has taken its configuration, so render never sends traffic
to something that would refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.envoy import bootstrap, envoy_argv, wait_ready
from mesh.intent import Intent, Workload
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import digest
from reconciler.runtime.local.supervisor import Supervised, child_env, stop_all, stop_orphan
from reconciler.state import read_json, write_json

log = logging.getLogger(__name__)
READY_TIMEOUT = 60.0
PROCESSES_FILE = "processes.json"
DRAIN_S = 2.0
"""Seconds a removed instance keeps running after it left the endpoints: callers' Envoys close their
pooled connections to a removed host, so none is reused against a process that is gone (a 502)."""


def cluster_address(index: int) -> str:
    """The loopback address of the index-th cluster (0-based): 127.0.1.1, 127.0.2.1, ..."""
    return f"127.0.{index + 1}.1"


def free_port(address: str, taken: set[int] | None = None) -> int:
    """A port nobody listens on at `address` now (and not handed out by us before)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port
    raise RuntimeError(f"no free port on {address}")


def port_is_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


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
    admin_port: int
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
    admin_port: int
    envoy: Supervised
    eastwest: Gateway
    eastwest_admin: int
    eastwest_envoy: Supervised


@dataclass
class LocalRuntime:
    state_dir: Path
    on_change: Callable[[], None]
    """Called whenever the topology changes (an instance became ready or stopped being ready)."""
    envoy_log_level: str = "warning"
    _clusters: dict[str, _Cluster] = field(default_factory=dict)
    _instances: dict[tuple[str, str, str, int], _Instance] = field(default_factory=dict)
    _ports: set[int] = field(default_factory=set)
    _drains: set[asyncio.Task[None]] = field(default_factory=set)
    """Instances removed from the endpoints, stopped after DRAIN_S (see `apply`)."""
    _leaving: list[_Instance] = field(default_factory=list)
    _records: dict[str, Any] = field(default_factory=dict)
    """What an earlier `lockgate up` on this state dir left running (PIDs, ports), for adoption."""
    _orphans_checked: bool = False

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._records = read_json(self.state_dir / PROCESSES_FILE)
        self._records.setdefault("clusters", {})
        self._records.setdefault("instances", {})

    def _save(self) -> None:
        """Record every process and its ports, so a lockgate restarted after a crash can adopt them."""
        clusters = {c.name: {"xds_port": c.xds_port, "ingress_port": c.ingress.port, "ingress_admin": c.admin_port,
                             "ingress_pid": c.envoy.pid, "eastwest_port": c.eastwest.port,
                             "eastwest_admin": c.eastwest_admin, "eastwest_pid": c.eastwest_envoy.pid}
                    for c in self._clusters.values()}
        instances = {inst.sidecar.node_id: {  # leaving ones too: a crash before they stop must not orphan them
            "fingerprint": inst.fingerprint, "inbound": inst.sidecar.inbound_port,
            "outbound": inst.sidecar.outbound_port, "app_port": inst.sidecar.app_port, "admin": inst.admin_port,
            "app_pid": inst.app.pid, "envoy_pid": inst.envoy.pid, "xds_port": self._clusters[inst.cluster].xds_port,
            "argv": list(inst.app.argv),
        } for inst in [*self._leaving, *self._instances.values()]}
        # Records of processes not (yet) taken over stay until the orphan check has dealt with them.
        if not self._orphans_checked:
            clusters = {**self._records["clusters"], **clusters}
            instances = {**self._records["instances"], **instances}
        write_json(self.state_dir / PROCESSES_FILE, {"clusters": clusters, "instances": instances})

    def previous_xds_port(self, cluster: str) -> int | None:
        """The control-plane port an earlier lockgate used for this cluster: binding it again lets the
        gateways and sidecars it left running reconnect (their bootstrap names it)."""
        port = self._records["clusters"].get(cluster, {}).get("xds_port")
        return int(port) if port else None

    def stop_orphans(self) -> None:
        """After the first apply: processes an earlier lockgate left that were not adopted are stopped
        (only if each PID still runs the command line recorded for it)."""
        if self._orphans_checked:
            return
        self._orphans_checked = True
        mine = {pid for c in self._clusters.values() for pid in (c.envoy.pid, c.eastwest_envoy.pid)}
        mine |= {pid for inst in self._instances.values() for pid in (inst.app.pid, inst.envoy.pid)}
        for name, rec in self._records["clusters"].items():
            for kind in ("ingress", "eastwest"):
                pid = rec.get(f"{kind}_pid")
                if pid and pid not in mine:
                    stop_orphan(pid, self._envoy_argv(f"{name}/{kind}"))
        for node_id, rec in self._records["instances"].items():
            if rec.get("envoy_pid") and rec["envoy_pid"] not in mine:
                stop_orphan(rec["envoy_pid"], self._envoy_argv(node_id))
            if rec.get("app_pid") and rec["app_pid"] not in mine and rec.get("argv"):
                stop_orphan(rec["app_pid"], rec["argv"])
        self._save()

    # --- clusters -------------------------------------------------------------------------------------

    async def add_cluster(self, *, name: str, address: str, xds_port: int, ingress_port: int | None) -> Gateway:
        """Start the cluster's ingress and east-west gateways. `ingress_port` is reused if still free
        (stable URLs)."""
        if name in self._clusters:
            return self._clusters[name].ingress
        rec = self._records["clusters"].get(name)
        if rec is not None and rec.get("xds_port") == xds_port:
            # An earlier lockgate's gateways, still serving: keep their ports and take them over.
            ingress_port, admin = rec["ingress_port"], rec["ingress_admin"]
            ew_port, ew_admin = rec["eastwest_port"], rec["eastwest_admin"]
        else:
            if ingress_port is None or not port_is_free(address, ingress_port):
                ingress_port = free_port(address, self._ports)
            admin, ew_admin, ew_port = (free_port(address, self._ports) for _ in range(3))
            rec = None
        self._ports |= {ingress_port, admin, ew_admin, ew_port}
        node_id = f"{name}/ingress"
        envoy = self._envoy(node_id=node_id, cluster=name, address=address, xds_port=xds_port, admin_port=admin)
        gw = Gateway(node_id=node_id, address=address, port=ingress_port)
        ew = Gateway(node_id=f"{name}/eastwest", address=address, port=ew_port)
        ew_envoy = self._envoy(node_id=ew.node_id, cluster=name, address=address, xds_port=xds_port,
                               admin_port=ew_admin)
        self._clusters[name] = _Cluster(name, address, xds_port, gw, admin, envoy, ew, ew_admin, ew_envoy)
        for sup, kind in ((envoy, "ingress"), (ew_envoy, "eastwest")):
            sup.on_start = lambda _s: self._save()
            pid = rec.get(f"{kind}_pid") if rec else None
            if not (pid and sup.adopt(pid)):
                await sup.start()
        self._save()
        return gw

    def _envoy(self, *, node_id: str, cluster: str, address: str, xds_port: int, admin_port: int) -> Supervised:
        slug = node_id.replace("/", "_")
        cfg = self.state_dir / "envoy" / f"{slug}.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(bootstrap(node_id=node_id, cluster=cluster, xds_host=address,
                                            xds_port=xds_port, admin_host=address, admin_port=admin_port),
                                  indent=1))
        return Supervised(name=f"envoy {node_id}", argv=self._envoy_argv(node_id), env=child_env({}),
                          log_path=self.state_dir / "logs" / f"envoy-{slug}.log")

    def _envoy_argv(self, node_id: str) -> list[str]:
        cfg = self.state_dir / "envoy" / f"{node_id.replace('/', '_')}.json"
        return envoy_argv(config_path=cfg, log_level=self.envoy_log_level)

    # --- workloads ------------------------------------------------------------------------------------

    async def apply(self, intent: Intent) -> None:
        """Make the running instances match the intent's Workloads: start new ones, stop removed ones."""
        desired: dict[tuple[str, str, str, int], tuple[Workload, str]] = {}
        for (ns, name), w in sorted(intent.workloads.items()):
            fp = digest(w.spec.model_dump(mode="json"))
            for cluster in w.spec.clusters:
                if cluster not in self._clusters:
                    continue
                for i in range(w.spec.replicas):
                    desired[(cluster, ns, name, i)] = (w, fp)
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
            self.on_change()
        started = [self._start_instance(key, w, fp) for key, (w, fp) in desired.items() if key not in self._instances]
        await asyncio.gather(*started)
        self._save()

    async def _start_instance(self, key: tuple[str, str, str, int], w: Workload, fp: str) -> None:
        cluster, ns, name, i = key
        c = self._clusters[cluster]
        node_id = f"{cluster}/{ns}/{name}-{i}"
        rec = self._records["instances"].get(node_id)
        argv = resolve_command(list(w.spec.command))
        adoptable = (rec is not None and rec.get("fingerprint") == fp and rec.get("xds_port") == c.xds_port
                     and rec.get("argv") == argv)
        if rec is not None and adoptable:
            ports = (rec["inbound"], rec["outbound"], rec["app_port"], rec["admin"])
        else:
            ports = tuple(free_port(c.address, self._ports) for _ in range(4))  # type: ignore[assignment]
        self._ports |= set(ports)
        sc = Sidecar(
            node_id=node_id, namespace=ns, service=w.spec.service, version=w.spec.version, workload=name,
            address=c.address, inbound_port=ports[0], outbound_port=ports[1], app_port=ports[2],
        )
        admin = ports[3]
        env = child_env({
            **w.spec.env,
            "HOST": sc.address, "PORT": str(sc.app_port),
            "LOCKGATE_SERVICE": sc.service, "LOCKGATE_VERSION": sc.version, "LOCKGATE_CLUSTER": cluster,
            "LOCKGATE_NAMESPACE": ns, "LOCKGATE_INSTANCE": f"{name}-{i}",
            "HTTP_PROXY": f"http://{sc.address}:{sc.outbound_port}",
            "http_proxy": f"http://{sc.address}:{sc.outbound_port}",
        })
        slug = node_id.replace("/", "_")
        app = Supervised(name=f"workload {node_id}", argv=argv, env=env,
                         log_path=self.state_dir / "logs" / f"app-{slug}.log")
        envoy = self._envoy(node_id=node_id, cluster=cluster, address=c.address, xds_port=c.xds_port,
                            admin_port=admin)
        inst = _Instance(fingerprint=fp, sidecar=sc, cluster=cluster, admin_port=admin, app=app, envoy=envoy)
        app.on_exit = envoy.on_exit = lambda _s: self._unready(inst)
        app.on_start = envoy.on_start = lambda _s: self._started(inst)
        self._instances[key] = inst
        if rec is not None and adoptable and envoy.adopt(rec["envoy_pid"]) and app.adopt(rec["app_pid"]):
            return  # both still serving: taken over as they are
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
            self.on_change()

    def _probe(self, inst: _Instance) -> None:
        if inst.probe is not None and not inst.probe.done():
            return  # the running probe waits for both the app and its sidecar anyway
        inst.probe = asyncio.create_task(self._wait_ready(inst), name=f"probe {inst.sidecar.node_id}")

    async def _wait_ready(self, inst: _Instance) -> None:
        sc = inst.sidecar
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await _wait_tcp(sc.address, sc.app_port)
                await wait_ready(sc.address, inst.admin_port, timeout=READY_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            log.warning("%s is not ready after %.0fs: %s (logs in %s)", sc.node_id, READY_TIMEOUT, exc,
                        self.state_dir / "logs")
            return
        if inst.app.pid is not None and inst.envoy.pid is not None and not inst.ready:
            inst.ready = True
            self.on_change()

    async def _drain(self, leaving: list[_Instance]) -> None:
        await asyncio.sleep(DRAIN_S)
        for inst in leaving:
            await self._stop_instance(inst)
            self._leaving.remove(inst)
        self._save()

    async def _stop_instance(self, inst: _Instance) -> None:
        inst.ready = False
        if inst.probe is not None:
            inst.probe.cancel()
        await stop_all([inst.app, inst.envoy])
        self._save()
        for port in (inst.sidecar.inbound_port, inst.sidecar.outbound_port, inst.sidecar.app_port,
                     inst.admin_port):
            self._ports.discard(port)

    # --- what render and status read ------------------------------------------------------------------

    def topology(self, cluster: str) -> ClusterTopology:
        c = self._clusters.get(cluster)
        mine = [inst for inst in self._instances.values() if inst.cluster == cluster]
        return ClusterTopology(
            cluster=cluster,
            ingress=c.ingress if c else None,
            eastwest=c.eastwest if c else None,
            sidecars=tuple(sorted((inst.sidecar for inst in mine), key=lambda s: s.node_id)),
            ready=frozenset(inst.sidecar.node_id for inst in mine if inst.ready),
        )

    def describe(self) -> dict[str, Any]:
        """Processes, for the status file."""
        proxies: dict[str, dict[str, Any]] = {}
        workloads = []
        for c in self._clusters.values():
            gateways = ((c.ingress, c.envoy, c.admin_port), (c.eastwest, c.eastwest_envoy, c.eastwest_admin))
            for gw, sup, admin in gateways:
                proxies[gw.node_id] = {"pid": sup.info.pid, "state": sup.info.state, "restarts": sup.info.restarts,
                                       "admin": f"{c.address}:{admin}"}
        for inst in self._instances.values():
            sc = inst.sidecar
            proxies[sc.node_id] = {"pid": inst.envoy.info.pid, "state": inst.envoy.info.state,
                                   "restarts": inst.envoy.info.restarts,
                                   "admin": f"{sc.address}:{inst.admin_port}"}
            workloads.append({
                "id": sc.node_id, "cluster": inst.cluster, "namespace": sc.namespace, "service": sc.service,
                "version": sc.version, "workload": sc.workload, "pid": inst.app.info.pid,
                "state": inst.app.info.state, "restarts": inst.app.info.restarts, "ready": inst.ready,
                "address": f"{sc.address}:{sc.app_port}", "endpoint": f"{sc.address}:{sc.inbound_port}",
                "httpProxy": f"http://{sc.address}:{sc.outbound_port}",
            })
        return {"proxies": proxies, "workloads": workloads}

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
        self._instances.clear()
        self._clusters.clear()
        self._orphans_checked = True
        self._save()  # nothing left running: nothing to adopt


async def _wait_tcp(address: str, port: int, interval: float = 0.025) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection(address, port)
        except OSError:
            await asyncio.sleep(interval)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
