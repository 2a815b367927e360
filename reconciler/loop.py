"""`lockgate up`: watch the repo, apply every valid revision to every cluster, supervise the processes.

The loop is "detect, then act": a new head is loaded and validated as a whole; only a valid revision
reaches the runtime and the control planes. An invalid one is recorded with its errors and changes
nothing that serves traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh.intent import Intent
from mesh.render import RenderCache, render
from mesh.topology import remote_view
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import AdsServer
from mesh.xds.snapshot import SECRET, InconsistentSnapshot
from multicluster.ca import ensure_hierarchy
from multicluster.issuer import WorkloadIssuer
from policies import SecurityExtension
from reconciler.load import load
from reconciler.rollout.controller import RolloutController
from reconciler.runtime.local.prometheus import prometheus_binary
from reconciler.runtime.local.runtime import LocalRuntime, cluster_address
from reconciler.source.git import GitError, Pygit2Source
from reconciler.state import STATUS_FILE, read_json, write_json

log = logging.getLogger("lockgate")


@dataclass(frozen=True)
class UpConfig:
    repo: str
    """A local path or a URL (file://, https://) of the intent repository."""
    state_dir: Path
    branch: str | None = None
    poll_interval: float = 5.0
    """Seconds between fetches of a remote repository (a local one is watched, not polled)."""
    envoy_log_level: str = "warning"
    prometheus_url: str | None = None
    """An existing Prometheus that scrapes the discovery endpoints; None starts one per cluster."""
    cert_ttl: float = 3600.0
    """Seconds a workload certificate is valid; each is re-issued at half its life."""
    ca_dir: Path | None = None
    """The CA hierarchy (`root/`, `<cluster>/`); default STATE/ca, created on first use."""


@dataclass
class _Plane:
    """One cluster's control plane: a snapshot cache served over ADS on the cluster's address."""

    name: str
    address: str
    cache: SnapshotCache
    server: AdsServer
    port: int
    ingress: str = ""
    applied: str | None = None
    render_cache: RenderCache = field(default_factory=RenderCache)
    """What the previous render of this cluster leaves for the next (a one-route commit re-renders little)."""


@dataclass
class Reconciler:
    config: UpConfig
    source: Pygit2Source
    planes: dict[str, _Plane] = field(default_factory=dict)
    runtime: LocalRuntime = field(init=False)
    rollouts: RolloutController = field(init=False)
    issuer: WorkloadIssuer = field(init=False)
    _rotation: asyncio.TimerHandle | None = None
    intent: Intent | None = None
    head: str | None = None
    applied: str | None = None
    failed: str | None = None
    last_error: list[str] = field(default_factory=list)
    announced: bool = False
    _push_pending: bool = False
    _gc_handle: asyncio.TimerHandle | None = None
    _status_handle: asyncio.TimerHandle | None = None
    _previous: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.runtime = LocalRuntime(state_dir=self.config.state_dir, on_change=self.schedule_push,
                                    envoy_log_level=self.config.envoy_log_level)
        self.issuer = WorkloadIssuer(ttl=self.config.cert_ttl)
        self.rollouts = RolloutController(state_dir=self.config.state_dir, source=self.source, runtime=self.runtime,
                                          on_change=self.schedule_push, prometheus_url=self.config.prometheus_url)
        with contextlib.suppress(OSError, ValueError):
            self._previous = read_json(self.config.state_dir / STATUS_FILE)

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        watcher = asyncio.create_task(self._watch())
        stopper = asyncio.create_task(stop.wait())
        rollouts = asyncio.create_task(self.rollouts.run(), name="rollout controller")
        try:
            done, _ = await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                watcher.result()  # surface the error
        finally:
            for t in (watcher, stopper, rollouts):
                t.cancel()
            await asyncio.gather(watcher, stopper, rollouts, return_exceptions=True)

    async def _watch(self) -> None:
        async for sha in self.source.watch(poll_interval=self.config.poll_interval):
            await self.apply_revision(sha)

    async def apply_revision(self, sha: str) -> None:
        t0 = time.monotonic()
        self.head = sha
        try:
            files = self.source.read_tree(sha)
        except GitError as exc:
            self._fail(sha, [f".:0: {exc}"])
            return
        loaded = load(files)
        if not loaded.ok or loaded.intent is None:
            self._fail(sha, [str(p) for p in loaded.problems])
            return
        intent = loaded.intent
        for i, c in enumerate(intent.mesh.spec.clusters):
            if c.name not in self.planes:
                await self._add_plane(c.name, cluster_address(i))
        self.intent = intent
        self.applied, self.failed, self.last_error = sha, None, []
        await self.runtime.apply(intent)
        self.runtime.stop_orphans()  # what an earlier lockgate left and this revision does not want
        self.rollouts.on_revision(intent, sha)
        self.push()
        self.rollouts.note_applied(sha, sorted(self.planes))
        log.info("applied %s in %.1f ms", sha[:12], (time.monotonic() - t0) * 1000)
        self.write_status()
        if not self.announced:
            self.announced = True
            self._announce(intent)

    def _fail(self, sha: str, errors: list[str]) -> None:
        self.failed, self.last_error = sha, errors
        log.error("revision %s is invalid; still serving %s:\n  %s", sha[:12],
                  (self.applied or "nothing")[:12], "\n  ".join(errors))
        self.write_status()

    async def _add_plane(self, name: str, address: str) -> None:
        cache = SnapshotCache()
        server = AdsServer(cache, host=address, port=self.runtime.previous_xds_port(name) or 0)
        try:
            port = await server.start()
        except (OSError, RuntimeError):  # the old port is taken: proxies started here will use a new one
            server = AdsServer(cache, host=address, port=0)
            port = await server.start()
        plane = _Plane(name=name, address=address, cache=cache, server=server, port=port)
        self.planes[name] = plane
        cache.subscribe(lambda _status: self.write_status())
        ca_dir = self.config.ca_dir or self.config.state_dir / "ca"
        self.issuer.add_authority(name, ensure_hierarchy(ca_dir, [name], now=datetime.now(UTC))[name])
        old = {c["name"]: c for c in self._previous.get("clusters", [])}.get(name, {})
        old_port = int(old["ingress"].rsplit(":", 1)[1]) if old.get("ingress") else None
        gw = await self.runtime.add_cluster(name=name, address=address, xds_port=port, ingress_port=old_port)
        plane.ingress = f"{gw.address}:{gw.port}"
        await self.rollouts.add_cluster(name=name, address=address, previous=old)

    # --- pushing -----------------------------------------------------------------------------------

    def schedule_push(self) -> None:
        """Coalesce bursts of topology changes into one render."""
        if not self._push_pending:
            self._push_pending = True
            asyncio.get_running_loop().call_soon(self.push)

    def push(self) -> None:
        self._push_pending = False
        if self.intent is None or self.applied is None:
            return
        shaped = self.rollouts.overlay(self.intent)  # rollout weights, canary match rules, mirroring
        local = {name: self.runtime.topology(name) for name in self.planes}
        views = {name: remote_view(topo) for name, topo in local.items()}
        for plane in self.planes.values():
            # Each cluster also sees the others, through their east-west gateways, for failover.
            remotes = tuple(v for name, v in sorted(views.items()) if name != plane.name and v is not None)
            topo = dataclasses.replace(local[plane.name], remotes=remotes)
            # Issuing is the edge (keys, clock); render gets the certificates as plain input.
            certs = self.issuer.certs_for(shaped.intent, topo, now=time.time())
            security = SecurityExtension(intent=shaped.intent, certs=certs, trust_bundle=self.issuer.trust_bundle)
            snapshots = render(intent=shaped.intent, topology=topo, revision=self.applied, weights=shaped.weights,
                               extensions=[*shaped.extensions, security], cache=plane.render_cache)
            try:
                for snap in snapshots.values():
                    snap.consistent()  # RDS/EDS/SDS names all present: Envoy would otherwise wait on them silently
            except InconsistentSnapshot as exc:
                # A render bug, not a user error: every proxy of the cluster keeps what it has.
                log.error("cluster %s: not pushing revision %s, its snapshot is inconsistent: %s",
                          plane.name, self.applied[:12], exc)
                continue
            for node_id, snap in snapshots.items():
                plane.cache.set(node_id, snap)
            for node_id in set(plane.cache.nodes()) - set(snapshots):
                plane.cache.clear(node_id)
            plane.applied = self.applied
        self._arm_rotation()
        self._schedule_gc()
        self.write_status()

    def _schedule_gc(self) -> None:
        """Once a push has settled, collect garbage and freeze what is left (the applied configuration,
        long-lived). A big mesh holds a million objects; a full collection scanning them all costs ~0.1 s,
        and landing in the middle of the next commit's render it would triple that render's time. Done
        here, off the commit path, the next render's collections only scan what it allocates."""
        if self._gc_handle is not None:
            self._gc_handle.cancel()
        self._gc_handle = asyncio.get_running_loop().call_later(GC_SETTLE_S, settle_gc)

    def _arm_rotation(self) -> None:
        """Wake when the earliest certificate is half-way through its life; the push re-issues it, and
        only the SECRET type of the affected proxies changes, so only secrets are re-sent."""
        if self._rotation is not None:
            self._rotation.cancel()
        due = self.issuer.next_rotation()
        if due is not None:
            self._rotation = asyncio.get_running_loop().call_later(max(0.0, due - time.time()), self.push)

    def _certs_status(self) -> dict[str, Any]:
        """Identities, chains, expiry and rotation of every proxy's certificate, and whether the proxy
        has ACKed the secrets holding it. Never a key."""
        out = self.issuer.describe()
        for entry in out["proxies"]:
            plane = self.planes.get(entry["cluster"])
            snap = plane.cache.get(entry["proxy"]) if plane else None
            st = plane.cache.status().get(entry["proxy"]) if plane else None
            entry["delivered"] = bool(snap and st and st.acked.get(SECRET) == snap.version(SECRET))
        return out

    # --- status ------------------------------------------------------------------------------------

    def write_status(self) -> None:
        """Debounced: many ACKs in a burst give one write."""
        if self._status_handle is None:
            self._status_handle = asyncio.get_running_loop().call_later(0.05, self._write_status_now)

    def _write_status_now(self) -> None:
        self._status_handle = None
        write_json(self.config.state_dir / STATUS_FILE, self.status())

    def status(self) -> dict[str, Any]:
        procs = self.runtime.describe()
        clusters = []
        for plane in self.planes.values():
            statuses = plane.cache.status()
            proxies = []
            for node_id, st in sorted(statuses.items()):
                extra = procs["proxies"].get(node_id, {})
                proxies.append({
                    "id": node_id,
                    "kind": node_id.rsplit("/", 1)[1] if node_id.endswith(("/ingress", "/eastwest")) else "sidecar",
                    "ackedVersion": st.acked_version,
                    "ackedRevision": st.acked_revision,
                    "nack": st.nack,
                    "nackType": st.nack_type.rsplit(".", 1)[-1] if st.nack_type else None,
                    "nackResources": list(st.nack_resources),
                    "connected": st.connected,
                    **extra,
                })
            # Proxies on their way out (cleared, still connected while they drain) do not hold convergence back.
            desired = [p for p in proxies if plane.cache.get(p["id"]) is not None]
            converged = bool(desired) and all(p["ackedRevision"] == plane.applied for p in desired)
            clusters.append({
                "name": plane.name,
                "ingress": plane.ingress,
                "eastwest": _address(self.runtime.topology(plane.name).eastwest),
                "controlPlane": f"{plane.address}:{plane.port}",
                "appliedRevision": plane.applied,
                "convergedRevision": plane.applied if converged else None,
                "proxies": proxies,
                "prometheus": self.rollouts.describe_cluster(plane.name),
            })
        return {
            "revision": {"head": self.head, "applied": self.applied, "failed": self.failed,
                         "lastError": self.last_error},
            "clusters": clusters,
            "workloads": procs["workloads"],
            "certs": self._certs_status(),
            "rollouts": self.rollouts.describe(),
            "lockgate": {"pid": os.getpid(), "repo": self.config.repo, "branch": self.source.branch,
                         "stateDir": str(self.config.state_dir.resolve()), "updatedAt": time.time()},
        }

    def _announce(self, intent: Intent) -> None:
        hosts = sorted({h for r in intent.routes.values() for h in r.spec.hosts})
        for plane in self.planes.values():
            print(f"lockgate: cluster {plane.name}: ingress http://{plane.ingress}", flush=True)
            for host in hosts:
                print(f"  try: curl -H 'Host: {host}' http://{plane.ingress}/", flush=True)
        print("lockgate: watching for commits; Ctrl-C stops every process lockgate started", flush=True)

    async def close(self) -> None:
        await self.rollouts.close()
        await self.runtime.close()
        for plane in self.planes.values():
            await plane.server.stop(0.2)
        if self._status_handle is not None:
            self._status_handle.cancel()
            self._status_handle = None
        if self._rotation is not None:
            self._rotation.cancel()
            self._rotation = None
        if self._gc_handle is not None:
            self._gc_handle.cancel()
            self._gc_handle = None
        status = self.status()
        status["lockgate"]["pid"] = None
        write_json(self.config.state_dir / STATUS_FILE, status)


GC_SETTLE_S = 2.0
"""Seconds without a push before the garbage collector is run and the survivors frozen."""


def settle_gc() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _address(gw: Any) -> str | None:
    return f"{gw.address}:{gw.port}" if gw is not None else None


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGINT (Ctrl-C) and SIGTERM end the run gracefully: every child is stopped before we exit."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def run_up(config: UpConfig) -> int:
    """Foreground: returns when SIGINT/SIGTERM arrives, after stopping every process it started."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if config.prometheus_url is None:
        prometheus_binary()  # PrometheusMissing names the install command before anything starts
    source = Pygit2Source.open(config.repo, branch=config.branch, cache_dir=config.state_dir / "git")
    stop = asyncio.Event()
    install_stop_signals(stop)
    rec = Reconciler(config=config, source=source)
    try:
        await rec.run(stop)
    finally:
        await rec.close()
        log.info("stopped every process lockgate started")
    return 0
