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
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.envoy import bootstrap, envoy_argv, wait_ready
from mesh.intent import Intent, Workload
from mesh.names import NodeId
from mesh.probe import wait_tcp
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.server import Authenticator
from mesh.xds.snapshot import digest
from multicluster.eastwest import EASTWEST
from reconciler.runtime.base import Bind, Metrics, ProxyProcess, RuntimeStatus, WorkloadInstance
from reconciler.runtime.local.ports import cluster_address, free_port, preferred_port
from reconciler.runtime.local.prometheus import DiscoveryServer, LocalPrometheus, scrape_targets
from reconciler.runtime.local.supervisor import Supervised, child_env, stop_all, stop_orphan
from reconciler.state import read_json, write_json

log = logging.getLogger(__name__)
READY_TIMEOUT = 60.0
PROCESSES_FILE = "processes.json"
DRAIN_S = 2.0
"""Seconds a removed instance keeps running after it left the endpoints: callers' Envoys close their
pooled connections to a removed host, so none is reused against a process that is gone (a 502)."""


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
    discovery: DiscoveryServer
    prometheus: LocalPrometheus | None
    metrics: Metrics


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

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._records = read_json(self.state_dir / PROCESSES_FILE)
        self._records.setdefault("clusters", {})
        self._records.setdefault("instances", {})

    def on_change(self, callback: Callable[[], None]) -> None:
        self._notify = callback

    def _changed(self) -> None:
        self._notify()

    def _save(self) -> None:
        """Record every process and its ports, so a lockgate restarted after a crash can adopt them."""
        clusters = {c.name: {"xds_port": c.xds_port, "ingress_port": c.ingress.port, "ingress_admin": c.admin_port,
                             "ingress_pid": c.envoy.pid, "ingress_started": c.envoy.started,
                             "eastwest_port": c.eastwest.port, "eastwest_admin": c.eastwest_admin,
                             "eastwest_pid": c.eastwest_envoy.pid, "eastwest_started": c.eastwest_envoy.started,
                             "prometheus_port": c.prometheus.port if c.prometheus else None}
                    for c in self._clusters.values()}
        instances = {inst.sidecar.node_id: {  # leaving ones too: a crash before they stop must not orphan them
            "fingerprint": inst.fingerprint, "inbound": inst.sidecar.inbound_port,
            "outbound": inst.sidecar.outbound_port, "app_port": inst.sidecar.app_port, "admin": inst.admin_port,
            "app_pid": inst.app.pid, "envoy_pid": inst.envoy.pid, "xds_port": self._clusters[inst.cluster].xds_port,
            "app_started": inst.app.started, "envoy_started": inst.envoy.started,
            "argv": list(inst.app.argv),
        } for inst in [*self._leaving, *self._instances.values()]}
        # Records of processes not (yet) taken over stay until the orphan check has dealt with them.
        if not self._orphans_checked:
            clusters = {**self._records["clusters"], **clusters}
            instances = {**self._records["instances"], **instances}
        write_json(self.state_dir / PROCESSES_FILE, {"clusters": clusters, "instances": instances})

    def authenticator(self, cluster: str) -> Authenticator | None:
        """Not yet: proxies carry no credential (issue: an authenticated control plane)."""
        return None

    def control_plane(self, cluster: str, *, index: int) -> Bind:
        """The cluster's loopback address, and the control-plane port an earlier lockgate used for it:
        binding it again lets the gateways and sidecars it left running reconnect (their bootstrap names it)."""
        port = self._records["clusters"].get(cluster, {}).get("xds_port")
        return Bind(address=cluster_address(index), port=int(port) if port else 0)

    def _stop_orphans(self) -> None:
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
        rec = self._records["clusters"].get(name) or {}
        adopting = rec.get("xds_port") == xds_port and bool(rec.get("ingress_pid") or rec.get("eastwest_pid"))
        if adopting:
            # An earlier lockgate's gateways, still serving: keep their ports and take them over.
            ingress_port, admin = rec["ingress_port"], rec["ingress_admin"]
            ew_port, ew_admin = rec["eastwest_port"], rec["eastwest_admin"]
            self._ports |= {ingress_port, admin, ew_admin, ew_port}
        else:
            ingress_port = preferred_port(address, rec.get("ingress_port"), self._ports)
            admin, ew_admin, ew_port = (free_port(address, self._ports) for _ in range(3))
        ingress_id = str(NodeId.gateway(cluster=name, kind="ingress"))
        envoy = self._envoy(node_id=ingress_id, cluster=name, address=address, xds_port=xds_port, admin_port=admin)
        gw = Gateway(node_id=ingress_id, address=address, port=ingress_port)
        ew = Gateway(node_id=str(NodeId.gateway(cluster=name, kind=EASTWEST)), address=address, port=ew_port,
                     kind=EASTWEST)
        ew_envoy = self._envoy(node_id=ew.node_id, cluster=name, address=address, xds_port=xds_port,
                               admin_port=ew_admin)
        sd = DiscoveryServer(address=address, targets=lambda: scrape_targets(self.status(), name))
        await sd.start()
        local: LocalPrometheus | None = None
        if self.prometheus_url is None:
            local = LocalPrometheus(cluster=name, address=address, sd_url=sd.url, state_dir=self.state_dir,
                                    port=preferred_port(address, rec.get("prometheus_port"), self._ports))
            await local.start()
        metrics = Metrics(url=local.url if local else str(self.prometheus_url), discovery=sd.url,
                          local=local is not None)
        self._clusters[name] = _Cluster(name, address, xds_port, gw, admin, envoy, ew, ew_admin, ew_envoy,
                                        discovery=sd, prometheus=local, metrics=metrics)
        for sup, kind in ((envoy, "ingress"), (ew_envoy, "eastwest")):
            sup.on_start = lambda _s: self._save()
            pid = rec.get(f"{kind}_pid") if adopting else None
            if not (pid and sup.adopt(pid, started=rec.get(f"{kind}_started"))):
                await sup.start()
        self._save()

    def metrics(self, cluster: str) -> Metrics | None:
        c = self._clusters.get(cluster)
        if c is None:
            return None
        pid = c.prometheus.process.info.pid if c.prometheus else None
        return Metrics(url=c.metrics.url, discovery=c.metrics.discovery, local=c.metrics.local, pid=pid)

    def _envoy(self, *, node_id: str, cluster: str, address: str, xds_port: int, admin_port: int) -> Supervised:
        slug = NodeId.parse(node_id).slug
        cfg = self.state_dir / "envoy" / f"{slug}.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(bootstrap(node_id=node_id, cluster=cluster, xds_host=address,
                                            xds_port=xds_port, admin_host=address, admin_port=admin_port),
                                  indent=1))
        return Supervised(name=f"envoy {node_id}", argv=self._envoy_argv(node_id), env=child_env({}),
                          log_path=self.state_dir / "logs" / f"envoy-{slug}.log")

    def _envoy_argv(self, node_id: str) -> list[str]:
        cfg = self.state_dir / "envoy" / f"{NodeId.parse(node_id).slug}.json"
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
            self._changed()
        started = [self._start_instance(key, w, fp) for key, (w, fp) in desired.items() if key not in self._instances]
        await asyncio.gather(*started)
        self._save()
        self._stop_orphans()  # what an earlier lockgate left and this revision does not want

    async def _start_instance(self, key: tuple[str, str, str, int], w: Workload, fp: str) -> None:
        cluster, ns, name, i = key
        c = self._clusters[cluster]
        node_id = str(NodeId.sidecar(cluster=cluster, namespace=ns, workload=name, index=i))
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
        slug = NodeId.parse(node_id).slug
        app = Supervised(name=f"workload {node_id}", argv=argv, env=env,
                         log_path=self.state_dir / "logs" / f"app-{slug}.log")
        envoy = self._envoy(node_id=node_id, cluster=cluster, address=c.address, xds_port=c.xds_port,
                            admin_port=admin)
        inst = _Instance(fingerprint=fp, sidecar=sc, cluster=cluster, admin_port=admin, app=app, envoy=envoy)
        app.on_exit = envoy.on_exit = lambda _s: self._unready(inst)
        app.on_start = envoy.on_start = lambda _s: self._started(inst)
        self._instances[key] = inst
        if rec is not None and adoptable and envoy.adopt(rec["envoy_pid"], started=rec.get("envoy_started")) \
                and app.adopt(rec["app_pid"], started=rec.get("app_started")):
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
            await wait_tcp(sc.address, sc.app_port, timeout=READY_TIMEOUT,
                           name=f"{sc.node_id}'s app at {sc.address}:{sc.app_port}")
            await wait_ready(sc.address, inst.admin_port, timeout=max(deadline - loop.time(), 0.0))
        except (TimeoutError, OSError) as exc:
            log.warning("%s is not ready: %s (logs in %s)", sc.node_id, exc, self.state_dir / "logs")
            return
        if inst.app.pid is not None and inst.envoy.pid is not None and not inst.ready:
            inst.ready = True
            self._changed()

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
            gateways=(c.eastwest,) if c else (),
            sidecars=tuple(sorted((inst.sidecar for inst in mine), key=lambda s: s.node_id)),
            ready=frozenset(inst.sidecar.node_id for inst in mine if inst.ready),
        )

    def status(self) -> RuntimeStatus:
        proxies: dict[str, ProxyProcess] = {}
        workloads = []
        for c in self._clusters.values():
            gateways = ((c.ingress, c.envoy, c.admin_port), (c.eastwest, c.eastwest_envoy, c.eastwest_admin))
            for gw, sup, admin in gateways:
                proxies[gw.node_id] = ProxyProcess(pid=sup.info.pid, state=sup.info.state,
                                                   restarts=sup.info.restarts, admin=f"{c.address}:{admin}")
        for inst in self._instances.values():
            sc = inst.sidecar
            proxies[sc.node_id] = ProxyProcess(pid=inst.envoy.info.pid, state=inst.envoy.info.state,
                                               restarts=inst.envoy.info.restarts,
                                               admin=f"{sc.address}:{inst.admin_port}")
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
        self._instances.clear()
        self._clusters.clear()
        self._orphans_checked = True
        write_json(self.state_dir / PROCESSES_FILE, {"clusters": preferred, "instances": {}})
