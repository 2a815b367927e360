"""The reconcile loop: watch the repo, apply every valid revision to every cluster, keep status.

"Detect, then act": a new head is loaded and validated as a whole; only a valid revision reaches the
runtime and the control planes. An invalid one is recorded with its errors and changes nothing that
serves traffic. The loop is typed against the `Runtime` protocol and the Git reader/writer protocols:
it never learns whether proxies are local processes or pods. The CLI picks the implementations.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mesh.intent import Intent
from mesh.names import kind_of
from mesh.render import RenderCache
from mesh.topology import ClusterTopology
from mesh.xds.cache import SnapshotCache
from mesh.xds.server import AdsServer, serialise_ahead
from mesh.xds.snapshot import SECRET
from multicluster.ca import CADirectoryWatch, CAError, ensure_hierarchy
from multicluster.eastwest import eastwest_gateway
from multicluster.issuer import WorkloadIssuer, bundle_acked
from policies import IssuedCert
from reconciler.isolate import load_isolated
from reconciler.pipeline import ClusterRender, render_mesh
from reconciler.rollout.controller import GitSource, RolloutController
from reconciler.runtime.base import Bind, ProxyProcess, Runtime, RuntimeStatus
from reconciler.source.base import DEFAULT_AUTHOR, GitError, StaleParent
from reconciler.source.base import trailers as commit_trailers
from reconciler.source.signatures import SignaturePolicy
from reconciler.source.worker import GitWorker
from reconciler.state import STATUS_FILE, SUSPENDED_FILE, read_json, write_json
from rollouts.writeback import TRAILER_DECISION

log = logging.getLogger("lockgate")


@dataclass(frozen=True)
class UpConfig:
    repo: str
    """A local path or a URL (file://, https://) of the intent repository."""
    state_dir: Path
    branch: str | None = None
    poll_interval: float = 5.0
    """Seconds between fetches of a remote repository (a local one is watched, not polled)."""
    fetch_timeout: float = 120.0
    """Seconds one fetch of a remote may take before the source is reported unreachable (it is retried)."""
    envoy_log_level: str = "warning"
    prometheus_url: str | None = None
    """An existing Prometheus that scrapes the discovery endpoints; None starts one per cluster."""
    cert_ttl: float = 86400.0
    """Seconds a workload certificate is valid (24 h, as Istio); each is re-issued at half its life, so
    lockgate may be down for half the TTL with no effect on traffic."""
    ca_dir: Path | None = None
    """The CA hierarchy (`root/`, `<cluster>/`); default STATE/ca, created on first use."""
    verify_signatures: Path | None = None
    """An SSH allowed-signers file: only heads signed by a key in it (for the committer's email) are applied."""
    verify_gpg_keyring: Path | None = None
    """A GPG keyring whose keys are trusted too (either file trusts a commit)."""
    signing_key: Path | None = None
    """The SSH private key lockgate signs its own write-back commits with."""
    isolate_clusters: bool = False
    """Local runtime: each cluster in a network namespace of its own, joined by a bridge (needs root)."""
    render_timeout: float = 120.0
    """Seconds one render (in a worker thread) may take before it is abandoned: the push fails, every proxy
    keeps what it has, and the next push starts afresh (1000 services render in ~0.5 s)."""


@dataclass
class _Plane:
    """One cluster's control plane: a snapshot cache served over ADS on the cluster's address."""

    name: str
    address: str
    cache: SnapshotCache
    server: AdsServer
    port: int
    applied: str | None = None
    render_cache: RenderCache = field(default_factory=RenderCache)
    """What the previous render of this cluster leaves for the next (a one-route commit re-renders little)."""


@dataclass
class Reconciler:
    config: UpConfig
    source: GitSource
    runtime: Runtime
    planes: dict[str, _Plane] = field(default_factory=dict)
    rollouts: RolloutController = field(init=False)
    issuer: WorkloadIssuer = field(init=False)
    _rotation: asyncio.TimerHandle | None = None
    intent: Intent | None = None
    head: str | None = None
    applied: str | None = None
    failed: str | None = None
    last_error: list[str] = field(default_factory=list)
    announced: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    """Milliseconds each step of the last applied revision took (read, load, apply, push: the push is the
    render and its landing in the caches, after any push in flight): the `applied` log line's breakdown,
    and what bench/scale.py --churn reports of a commit's cycle."""
    _push_pending: bool = False
    _asked: int = 0
    """Pushes asked for (`schedule_push`: a workload became ready, a weight, a rotation)."""
    _served: int = 0
    """`_asked` as it stood when the last push that landed began: below `_asked`, the caches hold an older
    render than the mesh wants, and no cluster is converged (the revision label alone cannot tell: a
    workload that became ready re-renders the same revision, and a proxy that ACKed the render before
    it still carries that label; `lockgate demo` counted a 503 on its first request in that window)."""
    _gc_handle: asyncio.TimerHandle | None = None
    _settle_gc: GcSettler = field(default_factory=lambda: GcSettler())  # defined below
    _status_handle: asyncio.TimerHandle | None = None
    trust: SignaturePolicy | None = None
    """Whose commits may be applied; None applies every valid commit, signed or not."""
    _final: RuntimeStatus | None = None
    """The runtime's last status before an explicit stop: status keeps every proxy's fields."""
    git: GitWorker = field(default_factory=GitWorker)
    """Every Git operation (reading trees here, commits and notes in the rollout controller), off the loop."""
    lag: LoopLag = field(default_factory=lambda: LoopLag())
    push_error: str | None = None
    """Why the last push did not happen (a render bug), or None."""
    extra_files: Callable[[], Mapping[str, bytes]] | None = None
    """Intent from elsewhere than the commit (on Kubernetes: lockgate resources applied with kubectl, as
    `@cluster/<Kind>/<namespace>/<name>.yaml`), validated with the commit's files as one revision."""
    _applying: asyncio.Lock = field(default_factory=asyncio.Lock)
    _rendering: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held from a push's render to its landing in the caches: one render at a time (a RenderCache is never
    used by two threads) and pushes land in the order they started."""
    _landing: _Rendered | None = None
    """The render `_push` sets into the caches (handed from the worker thread to the loop)."""
    _push_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    dashboard: str | None = None
    """The web view's address (`http://host:port/`), shown in status as `lockgate.dashboard`; None when off."""
    status_listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    """Called with each status as it is written (the web view's server-sent events): told, never polling."""

    def __post_init__(self) -> None:
        self.runtime.on_change(self.schedule_push)
        self.issuer = WorkloadIssuer(ttl=self.config.cert_ttl)
        self.rollouts = RolloutController(state_dir=self.config.state_dir, source=self.source, runtime=self.runtime,
                                          on_change=self.schedule_push, git=self.git, trust=self.trust)
        self.rollouts.suspended = (self.config.state_dir / SUSPENDED_FILE).is_file()  # survives a restart

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; an internal error is raised (the caller decides what stops with it)."""
        watcher = asyncio.create_task(self._watch())
        stopper = asyncio.create_task(stop.wait())
        rollouts = asyncio.create_task(self.rollouts.run(), name="rollout controller")
        watchdog = asyncio.create_task(self.lag.run(), name="event-loop watchdog")
        ca = asyncio.create_task(self._follow_ca(), name="CA directory")
        try:
            done, _ = await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                watcher.result()  # surface the error
        finally:
            for t in (watcher, stopper, rollouts, watchdog, ca):
                t.cancel()
            await asyncio.gather(watcher, stopper, rollouts, watchdog, ca, return_exceptions=True)

    async def _watch(self) -> None:
        """Apply each head the source reports. Commits that land during an apply are coalesced, with no
        debounce: the watch reads the head only when asked for the next one, so the next apply is of the
        newest commit and those in between are never loaded (a push starts at most one apply after the first
        pending commit; the latest intent wins). bench/scale.py --churn measures it: a commit every 100 ms at
        1000 services gave 300 commits -> 16-17 pushes. tests/unit/reconciler/test_coalesce.py holds it."""
        async for sha in self.source.watch(poll_interval=self.config.poll_interval):
            if self.suspended:  # `lockgate suspend`: noticed (revision.head), not applied
                await self._hold(sha)
                continue
            try:
                await self.apply_revision(sha)
            except Exception as exc:  # a bug of ours: this revision is refused, the mesh keeps what it has
                log.exception("applying %s failed", sha[:12])
                self._fail(sha, [f".:0: lockgate could not apply this revision (internal error: {exc!r}); "
                                 "still serving the last applied one"])

    def wake(self) -> None:
        """Fetch now (a verified Git webhook): the source's watch stops waiting for its next poll. A source
        without that seam goes on polling."""
        wake = getattr(self.source, "wake", None)
        if callable(wake):
            wake()

    async def apply_revision(self, sha: str) -> None:
        async with self._applying:  # a commit and a change of the extra files never interleave
            await self._apply_revision(sha)

    async def reapply(self) -> None:
        """The extra files changed: apply the current head again with them (nothing if there is none;
        while suspended, the applied revision)."""
        sha = self.applied if self.suspended else self.head
        if sha is not None:
            await self.apply_revision(sha)

    async def _apply_revision(self, sha: str) -> None:
        t0 = time.monotonic()
        self.head = sha
        if self.trust is not None:
            try:  # the signed bytes on the Git worker; ssh-keygen / gpg on a thread of their own
                signed = await self.git.call(self.source.commit_signature, sha, timeout=READ_TIMEOUT)
            except GitError as exc:
                self._fail(sha, [f".:0: {exc}"])
                return
            why = await asyncio.to_thread(self.trust.verify_signature, signed)
            if why is not None:
                self._fail(sha, [f".:0: commit {sha[:12]} is not trusted: {why}"])
                return
        stages: dict[str, float] = {}
        mark = time.monotonic()

        def lap(stage: str) -> None:
            nonlocal mark
            now = time.monotonic()
            stages[stage], mark = (now - mark) * 1000, now

        try:
            files = await self.git.call(self.source.read_tree, sha, timeout=READ_TIMEOUT)
        except GitError as exc:
            self._fail(sha, [f".:0: {exc}"])
            return
        if self.extra_files is not None:
            files = {**files, **self.extra_files()}
        lap("read")
        # In a worker process, bounded in time and memory: nothing a commit holds can freeze or bloat `up`.
        loaded = await asyncio.to_thread(load_isolated, files)
        lap("load")
        if not loaded.ok or loaded.intent is None:
            self._fail(sha, [str(p) for p in loaded.problems])
            return
        intent = loaded.intent
        for i, c in enumerate(intent.mesh.spec.clusters):
            if c.name not in self.planes and self.runtime.serves(c.name):
                try:
                    await self._add_plane(c.name, self.runtime.control_plane(c.name, index=i))
                except CAError as exc:  # no intermediate for a new cluster: the operator's move, not a bug
                    where = loaded.where(intent.mesh, ("spec", "clusters", i))
                    self._fail(sha, [f"{where[0]}:{where[1]}: cluster {c.name}: {exc}"])
                    return
        self.intent = intent
        self.applied, self.failed, self.last_error = sha, None, []
        await self.runtime.apply(intent)
        self.rollouts.on_revision(intent, sha)
        lap("apply")
        await self.push()  # under the apply lock: the next revision's render starts after this one landed
        lap("push")
        wanted = {c.name for c in intent.mesh.spec.clusters}
        for name in [n for n in self.planes if n not in wanted]:
            await self._remove_plane(name, revision=sha)
        self.rollouts.note_applied(sha, sorted(self.planes))
        self.stages = stages
        log.info("applied %s in %.1f ms (%s)", sha[:12], (time.monotonic() - t0) * 1000,
                 ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        self.write_status()
        if not self.announced:
            self.announced = True
            self._announce(intent)

    # --- suspend, resume, rollback (lockgate suspend|resume|rollback) ---------------------------------

    @property
    def suspended(self) -> bool:
        """New revisions are noticed (status: revision.head) but not applied, and rollouts in flight hold."""
        return self.rollouts.suspended

    def suspend(self) -> None:
        """Stop applying new revisions (as `flux suspend`); a file in the state dir keeps it across restarts."""
        write_json(self.config.state_dir / SUSPENDED_FILE, {"at": time.time(), "applied": self.applied})
        self.rollouts.suspended = True
        log.info("suspended: new revisions are noticed, not applied; rollouts hold (`lockgate resume` ends it)")
        self.write_status()

    async def resume(self) -> None:
        """Apply again: the head noticed while suspended at once, then every new one; rollouts go on."""
        (self.config.state_dir / SUSPENDED_FILE).unlink(missing_ok=True)
        self.rollouts.suspended = False
        log.info("resumed")
        self.write_status()
        head = self.head
        if head is not None and head not in (self.applied, self.failed):
            await self.apply_revision(head)

    async def _hold(self, sha: str) -> None:
        """A head while suspended. Started suspended, the mesh first gets what it served when suspended."""
        if self.applied is None:
            pinned = _read_json_or(self.config.state_dir / SUSPENDED_FILE, {}).get("applied") or sha
            await self.apply_revision(pinned)
            if self.applied is None and pinned != sha:  # gone from the repository: the head is all there is
                await self.apply_revision(sha)
        if sha != self.head:
            log.info("suspended: %s noticed, not applied (still serving %s)", sha[:12], (self.applied or "-")[:12])
        self.head = sha
        self.write_status()

    async def rollback(self, rev: str | None = None) -> dict[str, Any]:
        """`lockgate rollback [REV]`: a commit by lockgate that restores the files of the revision before the
        last applied human change (or of REV), pushed where there is a remote, then applied at once (even
        while suspended: it is an explicit act). What it did; RollbackRefused with the reason otherwise."""
        applied = self.applied
        if applied is None:
            raise RollbackRefused("nothing is applied yet: there is nothing to roll back")
        try:
            done = await self.git.call(self._rollback_commit, rev, applied, timeout=ROLLBACK_TIMEOUT)
        except GitError as exc:
            raise RollbackRefused(str(exc)) from None
        await self.apply_revision(done["sha"])
        if self.applied != done["sha"]:
            raise RollbackRefused(f"committed {done['sha'][:12]}, which was not applied: " + "; ".join(self.last_error))
        if self.suspended:  # a restart while suspended serves the rolled-back revision
            write_json(self.config.state_dir / SUSPENDED_FILE, {"at": time.time(), "applied": self.applied})
        log.info("rolled back to the files of %s in %s", done["to"][:12], done["sha"][:12])
        return done

    def _rollback_commit(self, rev: str | None, applied: str, *, attempts: int = 5) -> dict[str, Any]:
        """On the Git worker: find the target, commit its files onto the tip (retried if the tip moves)."""
        for _ in range(attempts):
            head = self.source.refresh()
            if head is None:
                raise RollbackRefused(f"branch {self.source.branch!r} has no commit")
            if self.trust is not None and (why := self.trust.verify(self.source, head)) is not None:
                raise RollbackRefused(f"not committing onto {head[:12]}, which is not trusted ({why})")
            target, undid = (self.source.resolve(rev), None) if rev is not None else self._before_human_change(applied)
            now, then = self.source.read_tree(head), self.source.read_tree(target)
            changes: dict[str, bytes | None] = {p: None for p in now if p not in then}
            changes |= {p: data for p, data in then.items() if now.get(p) != data}
            if not changes:
                raise RollbackRefused(f"the branch tip {head[:12]} already has the files of {target[:12]}: "
                                      "nothing to roll back")
            message = rollback_message(target=target, undid=undid, applied=applied,
                                       subject=self.source.log(undid, limit=1)[0].message if undid else None)
            try:
                sha = self.source.commit(files=changes, message=message, parent=head, author=DEFAULT_AUTHOR)
            except StaleParent:
                continue
            record = {"at": time.time(), "from": applied, "to": target, "undid": undid, "sha": sha}
            try:
                self.source.add_note(sha, message="rollback " + json.dumps(record))
            except (GitError, ValueError, KeyError) as exc:
                log.warning("could not note the rollback on %s: %s", sha[:12], exc)
            return record
        raise RollbackRefused(f"branch {self.source.branch!r} moved {attempts} times while rolling back: try again")

    def _before_human_change(self, applied: str) -> tuple[str, str]:
        """(the parent of the last human commit at or before `applied`, that commit). lockgate's own rollout
        write-backs are skipped; a rollback of lockgate's continues from where it went back to, so each
        `lockgate rollback` undoes one more human change."""
        sha = applied
        for _ in range(10_000):
            info = self.source.log(sha, limit=1)[0]
            trailers = commit_trailers(info.message)
            ours = info.author_email == DEFAULT_AUTHOR[1] and TRAILER_DECISION in trailers
            if ours and ROLLBACK_TO in trailers:
                sha = self.source.resolve(trailers[ROLLBACK_TO])
                continue
            try:
                parent = self.source.resolve(f"{sha}^")
            except GitError:
                what = "lockgate's" if ours else "the last human change"
                raise RollbackRefused(f"{sha[:12]} ({what}: {info.message.splitlines()[0] if info.message else ''})"
                                      " is the first commit: there is nothing before it to return to") from None
            if ours:
                sha = parent
                continue
            return parent, sha
        raise RollbackRefused(f"no human change found before {applied[:12]}")

    def _fail(self, sha: str, errors: list[str]) -> None:
        self.failed, self.last_error = sha, errors
        log.error("revision %s is invalid; still serving %s:\n  %s", sha[:12],
                  (self.applied or "nothing")[:12], "\n  ".join(errors))
        self.write_status()

    async def _add_plane(self, name: str, bind: Bind) -> None:
        # The cluster's intermediate first: a cluster that has none (and no root key to make one: it belongs
        # offline) is refused before anything listens for it. Only the default STATE/ca may get a new root.
        ca_dir = self.config.ca_dir or self.config.state_dir / "ca"
        authority = ensure_hierarchy(ca_dir, [name], now=datetime.now(UTC), create_root=self.config.ca_dir is None)
        cache = SnapshotCache()
        auth = self.runtime.authenticator(name)  # each stream bound to the one proxy its credential names
        server = AdsServer(cache, host=bind.address, port=bind.port, authenticator=auth)
        try:
            port = await server.start()
        except (OSError, RuntimeError):  # the old port is taken: proxies started here will use a new one
            server = AdsServer(cache, host=bind.address, port=0, authenticator=auth)
            port = await server.start()
        self.planes[name] = _Plane(name=name, address=bind.address, cache=cache, server=server, port=port)
        cache.subscribe(lambda _status: self.write_status())
        self.issuer.add_authority(name, authority[name])
        await self.runtime.add_cluster(name=name, xds=Bind(address=bind.address, port=port))

    async def _remove_plane(self, name: str, *, revision: str) -> None:
        """A cluster the Mesh dropped: once the other clusters' proxies hold this revision (no route of
        theirs leads through its east-west gateway any more), its gateways and control plane go. Bounded:
        a proxy that never ACKs does not keep a removed cluster running."""
        waits = [plane.cache.wait_converged(node, snap.version_all, timeout=REMOVE_CLUSTER_WAIT_S)
                 for other, plane in self.planes.items() if other != name
                 for node in plane.cache.nodes() if (snap := plane.cache.get(node)) is not None]
        if not all(await asyncio.gather(*waits)):
            log.warning("cluster %s left the Mesh; not every proxy of the others ACKed %s within %g s: removing "
                        "it anyway", name, revision[:12], REMOVE_CLUSTER_WAIT_S)
        plane = self.planes.pop(name)
        await self.runtime.remove_cluster(name)
        await plane.server.stop(0.2)
        log.info("cluster %s left the Mesh at %s: its gateways and control plane are stopped", name, revision[:12])

    # --- pushing -----------------------------------------------------------------------------------

    def schedule_push(self) -> None:
        """Coalesce bursts of topology and weight changes into one render: every request made before that
        render starts is served by it (one waits, at most, behind the render in flight)."""
        self._asked += 1
        if not self._push_pending:
            self._push_pending = True
            task = asyncio.get_running_loop().create_task(self._pending_push(), name="push")
            self._push_tasks.add(task)
            task.add_done_callback(self._push_tasks.discard)

    async def _pending_push(self) -> None:
        async with self._rendering:
            if self._push_pending:  # else a push that started since (a new revision's) rendered it all
                await self._push_locked()

    async def push(self) -> None:
        """Render every cluster through the one pipeline and set what rendered consistently; returns once it
        has landed in the caches (after any render in flight). A render that raises (a bug) or overruns
        `render_timeout` leaves every proxy with what it has and says so in status."""
        async with self._rendering:
            await self._push_locked()

    async def settled(self) -> None:
        """Until no push is pending or rendering (what a caller waits on after a change it scheduled)."""
        while self._push_tasks or self._rendering.locked():
            if self._push_tasks:
                await asyncio.gather(*self._push_tasks, return_exceptions=True)
            else:
                async with self._rendering:
                    pass

    async def _push_locked(self) -> None:
        self._push_pending = False
        if self.intent is None or self.applied is None:
            return
        revision, asked = self.applied, self._asked
        try:
            self._landing = await self._render()
            self._push()
            self._served = asked
            self.push_error = None
        except Exception as exc:
            log.exception("push of %s failed; every proxy keeps what it has", revision[:12])
            self.push_error = f"{exc!r}"
        finally:
            self._landing = None
        self._arm_rotation()
        self._schedule_gc()
        self.write_status()

    async def _render(self) -> _Rendered:
        """The pure pipeline for the current revision, in a worker thread: at 1000 services a render takes
        0.4-0.7 s, which on the loop would stall every ADS stream, webhook and status write as long.

        Its inputs are taken here, on the loop (topologies, a copy of the rollout states: the controller
        changes them while the thread runs); certificates are issued on the loop too, since the issuer is
        the loop's (status reads it). Only the RenderCaches go to the thread, and `_rendering` keeps
        them to one thread at a time; one abandoned at its timeout keeps the old caches, the planes get
        new ones."""
        assert self.intent is not None and self.applied is not None
        intent, revision, planes = self.intent, self.applied, dict(self.planes)
        call = functools.partial(
            render_mesh, intent=intent, states=dict(self.rollouts.states),
            topologies={name: self.runtime.topology(name) for name in planes},
            remote={c.name: self.runtime.topology(c.name) for c in intent.mesh.spec.clusters
                    if c.name not in planes and not self.runtime.serves(c.name)},
            certs=LoopCertificates(self.issuer, asyncio.get_running_loop(), timeout=self.config.render_timeout),
            now=time.time(), revision=revision, caches={name: plane.render_cache for name, plane in planes.items()})
        def render_and_serialise() -> Mapping[str, ClusterRender]:
            out = call()
            serialise_ahead(snap for result in out.values() for snap in result.snapshots.values())
            return out

        try:
            async with asyncio.timeout(self.config.render_timeout):
                rendered = await asyncio.to_thread(gc_paused, render_and_serialise)
        except TimeoutError:
            for plane in planes.values():
                plane.render_cache = RenderCache()
            raise RenderTimeout(f"rendering {revision[:12]} took longer than {self.config.render_timeout:g} s; "
                                "abandoned") from None
        return _Rendered(revision=revision, clusters=rendered)

    def _push(self) -> None:
        """Set the render in `_landing` into the caches, on the loop (ADS streams are woken from here)."""
        assert self._landing is not None
        landing = self._landing
        for plane in self.planes.values():
            result = landing.clusters.get(plane.name)
            if result is None:  # a cluster added while the render ran: the push that follows covers it
                continue
            if result.error is not None:
                # A render bug, not a user error: every proxy of the cluster keeps what it has.
                log.error("cluster %s: not pushing revision %s, its snapshot is inconsistent: %s",
                          plane.name, landing.revision[:12], result.error)
                continue
            for node_id, snap in result.snapshots.items():
                plane.cache.set(node_id, snap)
            for node_id in set(plane.cache.nodes()) - set(result.snapshots):
                plane.cache.clear(node_id)
            plane.applied = landing.revision

    def _schedule_gc(self) -> None:
        """Once a push has settled, collect garbage and freeze what is left (the applied configuration,
        long-lived). A big mesh holds a million objects; a full collection scanning them all costs ~0.1 s,
        and landing in the middle of the next commit's render it would triple that render's time. Done
        here, off the commit path, the next render's collections only scan what it allocates."""
        if self._gc_handle is not None:
            self._gc_handle.cancel()
        self._gc_handle = asyncio.get_running_loop().call_later(GC_SETTLE_S, self._settle_gc)

    def _arm_rotation(self) -> None:
        """Wake when the earliest certificate is half-way through its life; the push re-issues it, and
        only the SECRET type of the affected proxies changes, so only secrets are re-sent."""
        if self._rotation is not None:
            self._rotation.cancel()
        due = self.issuer.next_rotation()
        if due is not None:
            self._rotation = asyncio.get_running_loop().call_later(max(0.0, due - time.time()), self.schedule_push)

    async def _follow_ca(self, *, interval: float = 0.5) -> None:
        """Pick up what `lockgate ca rotate-cluster|rotate-root|finish-root-rotation` (or a copy by hand) wrote
        to the CA directory. Polled by stat, not told by a command file: the files are the truth, however they
        got there, and a directory that does not load (a copy half done) changes nothing until it does. A new
        intermediate re-issues every certificate of its cluster in one push (only secrets change); one under
        a root the proxies do not trust yet waits until every connected proxy has ACKed the bundle holding it."""
        watch = CADirectoryWatch(self.config.ca_dir or self.config.state_dir / "ca")
        while True:
            await asyncio.sleep(interval)
            try:
                changed = False
                for cluster, found in (await asyncio.to_thread(watch.changed, sorted(self.planes))).items():
                    if isinstance(found, CAError):
                        log.warning("cluster %s: the CA directory does not load, its intermediate stays as it is: %s",
                                    cluster, found)
                    elif self.issuer.replace_authority(cluster, found):
                        changed = True
                        log.info("cluster %s: CA directory changed (intermediate %s)%s", cluster, found.name,
                                 "; it signs once every proxy has the bundle with its root"
                                 if self.issuer.awaiting_bundle else "")
                bundle = self.issuer.trust_bundle
                if (not changed and self.issuer.awaiting_bundle and self.push_error is None
                        and all(bundle_acked(plane.cache, bundle) for plane in self.planes.values())):
                    changed = bool(self.issuer.bundle_delivered())
                if changed:
                    await self.push()
            except Exception:  # a bug of ours: the certificates in place keep serving
                log.exception("following the CA directory failed")

    def _certs_status(self) -> dict[str, Any]:
        """Identities, chains, expiry and rotation of every proxy's certificate, and whether the proxy
        has ACKed the secrets holding it. Never a key."""
        out = self.issuer.describe()
        now, warnings = time.time(), []
        for entry in out["proxies"]:
            plane = self.planes.get(entry["cluster"])
            snap = plane.cache.get(entry["proxy"]) if plane else None
            st = plane.cache.status().get(entry["proxy"]) if plane else None
            entry["delivered"] = bool(snap and st and st.acked.get(SECRET) == snap.version(SECRET))
            # Rotation runs at half the TTL: a certificate this close to its end was not renewed in time.
            entry["expiringSoon"] = entry["notAfter"] - now < self.issuer.ttl / 10
            if entry["expiringSoon"]:
                warnings.append(f"{entry['proxy']}: certificate expires in {max(0.0, entry['notAfter'] - now):.0f}s"
                                + ("" if entry["delivered"] else " and its renewal is not delivered yet"))
        out["warnings"] = warnings
        return out

    # --- status ------------------------------------------------------------------------------------

    def write_status(self) -> None:
        """Debounced: many ACKs in a burst give one write."""
        if self._status_handle is None:
            self._status_handle = asyncio.get_running_loop().call_later(0.05, self._write_status_now)

    def flush_status(self) -> None:
        """Write status now (a debounced write pending is written at once): for an answer that promises status
        already shows what it did (`lockgate rollback`, `suspend`, `resume`)."""
        if self._status_handle is not None:
            self._status_handle.cancel()
        self._write_status_now()

    def _write_status_now(self) -> None:
        self._status_handle = None
        status = self.status()
        write_json(self.config.state_dir / STATUS_FILE, status)
        for listener in list(self.status_listeners):
            try:
                listener(status)
            except Exception:  # a listener's bug must not stop status from being written
                log.exception("a status listener failed")

    def status(self) -> dict[str, Any]:
        """The `status --json` contract (README): fields are only ever added."""
        procs = self._final if self._final is not None else self.runtime.status()
        clusters = []
        for plane in self.planes.values():
            statuses = plane.cache.status()
            proxies = []
            for node_id, st in sorted(statuses.items()):
                where = procs.proxies.get(node_id, ProxyProcess())
                proxies.append({
                    "id": node_id,
                    "kind": kind_of(node_id),
                    "ackedVersion": st.acked_version,
                    "ackedRevision": st.acked_revision,
                    "nack": st.nack,
                    "nackType": st.nack_type.rsplit(".", 1)[-1] if st.nack_type else None,
                    "nackResources": list(st.nack_resources),
                    "connected": st.connected,
                    **where.to_json(),
                })
            # Proxies on their way out (cleared, still connected while they drain) do not hold convergence back.
            wanted = {p["id"]: snap for p in proxies if (snap := plane.cache.get(p["id"])) is not None}
            # Every proxy holds what the mesh wants now: the last render's snapshot (not only its revision),
            # and no render asked for since is still to land.
            converged = bool(wanted) and self._served == self._asked and all(
                p["ackedRevision"] == plane.applied and p["ackedVersion"] == wanted[p["id"]].version_all
                for p in proxies if p["id"] in wanted)
            topo = self.runtime.topology(plane.name)
            metrics = self.runtime.metrics(plane.name)
            clusters.append({
                "name": plane.name,
                "ingress": _address(topo.ingress) or "",
                "eastwest": _address(eastwest_gateway(topo)),
                "controlPlane": f"{plane.address}:{plane.port}",
                "appliedRevision": plane.applied,
                "convergedRevision": plane.applied if converged else None,
                "proxies": proxies,
                "prometheus": metrics.to_json() if metrics is not None else {},
            })
        return {
            "revision": {"head": self.head, "applied": self.applied, "failed": self.failed,
                         "lastError": self.last_error},
            "clusters": clusters,
            "workloads": [w.to_json() for w in procs.workloads],
            "certs": self._certs_status(),
            "rollouts": self.rollouts.describe(),
            "lockgate": {"pid": os.getpid(), "repo": self.config.repo, "branch": self.source.branch,
                         "stateDir": str(self.config.state_dir.resolve()), "updatedAt": time.time(),
                         "loopLagMs": round(self.lag.current * 1000, 1),
                         "loopLagMaxMs": round(self.lag.worst * 1000, 1), "pushError": self.push_error,
                         "dashboard": self.dashboard, "suspended": self.suspended,
                         "pushesPending": self._asked - self._served},
            "source": self.source.health().to_json(),
        }

    def ingress(self, cluster: str) -> str | None:
        """`host:port` of the cluster's ingress gateway."""
        return _address(self.runtime.topology(cluster).ingress)

    def _announce(self, intent: Intent) -> None:
        hosts = sorted({h for r in intent.routes.values() for h in r.spec.hosts})
        for name in self.planes:
            ingress = self.ingress(name)
            print(f"lockgate: cluster {name}: ingress http://{ingress}", flush=True)
            for host in hosts:
                print(f"  try: curl -H 'Host: {host}' http://{ingress}/", flush=True)
        print("lockgate: watching for commits; Ctrl-C stops every process lockgate started", flush=True)

    async def close(self) -> None:
        """An explicit stop: every process the runtime started goes, and status says so."""
        before = self.runtime.status()
        # The proxies as they were, now stopped: status keeps every field of each (the contract).
        self._final = RuntimeStatus(
            proxies={k: dataclasses.replace(p, pid=None, state="stopped") for k, p in before.proxies.items()},
            workloads=[dataclasses.replace(w, pid=None, state="stopped", ready=False) for w in before.workloads])
        await self._cancel_pushes()
        await self.rollouts.close()
        await self.runtime.close()
        for plane in self.planes.values():
            await plane.server.stop(0.2)
        for handle in (self._status_handle, self._rotation, self._gc_handle):
            if handle is not None:
                handle.cancel()
        self._status_handle = self._rotation = self._gc_handle = None
        status = self.status()
        status["lockgate"]["pid"] = None
        write_json(self.config.state_dir / STATUS_FILE, status)
        self.git.close()

    async def _cancel_pushes(self) -> None:
        """A push still waiting or rendering goes (its thread, if any, finishes unseen)."""
        for task in list(self._push_tasks):
            task.cancel()
        await asyncio.gather(*self._push_tasks, return_exceptions=True)

    async def detach(self) -> None:
        """After an internal error: lockgate goes, the data plane stays. Envoys keep their last configuration
        and the workloads keep running, to be adopted by the next `lockgate up` (only an explicit stop, Ctrl-C
        or SIGTERM, tears them down)."""
        for handle in (self._status_handle, self._rotation, self._gc_handle):
            if handle is not None:
                handle.cancel()
        self._status_handle = self._rotation = self._gc_handle = None
        await self._cancel_pushes()
        with contextlib.suppress(Exception):
            status = self.status()
            status["lockgate"]["pid"] = None
            write_json(self.config.state_dir / STATUS_FILE, status)
        for plane in self.planes.values():
            with contextlib.suppress(Exception):
                await plane.server.stop(0.2)
        self.git.close()


ROLLBACK_TIMEOUT = 120.0
"""Seconds a rollback's commit (and its push to a remote) may take."""
ROLLBACK_TO = "Lockgate-Rollback-To"
"""The trailer of a rollback commit naming the revision whose files it restored."""


class RollbackRefused(Exception):
    """`lockgate rollback` cannot do what was asked; the message says why (nothing applied, unknown REV, …)."""


def rollback_message(*, target: str, undid: str | None, applied: str, subject: str | None) -> str:
    """The rollback commit's message: what it returns to and why; trailers `history` and the next rollback
    read."""
    first = (subject or "").splitlines()[0] if subject else ""
    head = (f"rollback: undo {undid[:10]} ({first}), back to {target[:10]}" if undid
            else f"rollback: back to {target[:10]}")
    lines = [head, "", f"Restores the files of {target} (was applied: {applied}); requested with `lockgate rollback`."]
    lines += ["", f"{TRAILER_DECISION}: rollback", f"{ROLLBACK_TO}: {target}"]
    if undid:
        lines.append(f"Lockgate-Rolled-Back: {undid}")
    return "\n".join(lines) + "\n"


def _read_json_or(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return default
    return value if isinstance(value, dict) else default


@dataclass(frozen=True)
class _Rendered:
    """One push's render, from the worker thread: the revision it was made of and each cluster's result."""

    revision: str
    clusters: Mapping[str, ClusterRender]


class RenderTimeout(Exception):
    """A render overran `UpConfig.render_timeout`: the push is refused (a bug of ours, or a mesh too big)."""


class LoopCertificates:
    """The issuer as the render's worker thread sees it: each `certs_for` runs on the event loop that owns
    the issuer (status and the CA watch read and change it there) and the thread waits for the answer. Keys
    are made there too, ~0.2 ms each, only when a certificate is new or due."""

    def __init__(self, issuer: WorkloadIssuer, loop: asyncio.AbstractEventLoop, *, timeout: float) -> None:
        self._issuer, self._loop, self._timeout = issuer, loop, timeout
        self._bundle = issuer.trust_bundle

    def certs_for(self, intent: Intent, topology: ClusterTopology, *, now: float) -> dict[str, IssuedCert]:
        async def issue() -> tuple[dict[str, IssuedCert], list[str]]:
            return self._issuer.certs_for(intent, topology, now=now), self._issuer.trust_bundle

        certs, self._bundle = asyncio.run_coroutine_threadsafe(issue(), self._loop).result(self._timeout)
        return certs

    @property
    def trust_bundle(self) -> list[str]:
        """The bundle as it was when the last certificates were issued (the two always agree)."""
        return self._bundle


READ_TIMEOUT = 30.0
"""Seconds reading a revision's tree may take before the revision is refused (and retried on the next head)."""


@dataclass
class LoopLag:
    """How late the event loop runs: a timer that should fire every `interval` measures how much later it
    does. The loop serves the control planes and rotates certificates: lag there is lag everywhere."""

    interval: float = 0.1
    current: float = 0.0
    worst: float = 0.0
    """The largest lag since start (seconds)."""
    warn_at: float = 0.5

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.current = max(0.0, loop.time() - due)
            if self.current > self.worst:
                self.worst = self.current
            if self.current >= self.warn_at:
                log.warning("the event loop ran %.0f ms late: something blocked it", self.current * 1000)


REMOVE_CLUSTER_WAIT_S = 10.0
"""How long a cluster that left the Mesh keeps its gateways for the other clusters' proxies to ACK the
revision that routes around it."""

GC_SETTLE_S = 2.0
"""Seconds without a push before the garbage collector is run and the survivors frozen."""


GC_FULL_EVERY_S = 600.0
"""How often, at most, a settle scans the whole heap: see GcSettler."""


def settle_gc() -> None:
    """Collect the whole heap and freeze what is left (the applied configuration, long-lived), then give
    the C heap's free pages back to the system (`release_free_memory`)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None  # not glibc: nothing to call
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc's `malloc_trim`); whether it could. A first push
    builds ~2 MB of response per proxy, for a hundred proxies at once, and glibc keeps what they free as
    holes in its heap: measured at 1000 services x 100 proxies, 40 MB of a 269 MB RSS after the push. Once
    pushes settle, they are given back (a few ms). Pinning glibc's mmap threshold instead (every such block
    mapped and unmapped) returned them too, but its page faults cost the push 0.25 CPU s."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class GcSettler:
    """What runs once pushes settle: a full `settle_gc` at most every GC_FULL_EVERY_S, otherwise a
    collection of what was allocated since the last freeze, which is then frozen too. Both give the C
    heap's free pages back (`release_free_memory`).

    The full pass scans every object the process holds: ~0.2 s on the event loop at 1000 services, after
    every commit. The light pass scans only the young objects (one render's survivors, the streams'
    bookkeeping) and costs what they cost. What it leaves is garbage cycles among frozen objects: render's
    dropped snapshots hold none (reference counting frees them), so that is a stream's or a task's
    bookkeeping, and the next full pass collects it."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last_full: float | None = None

    def __call__(self) -> bool:
        """Settle; whether this was the full pass."""
        now = self._clock()
        if self._last_full is None or now - self._last_full >= GC_FULL_EVERY_S:
            settle_gc()
            self._last_full = now
            return True
        gc.collect()
        gc.freeze()
        release_free_memory()
        return False


T = TypeVar("T")


def gc_paused(fn: Callable[[], T]) -> T:
    """`fn()` with the cyclic garbage collector paused (reference counting still frees as it goes).

    A render allocates hundreds of thousands of dicts and lists, which set off full collections over
    every object the process holds: measured at 1000 services x 100 proxies, one took 155 ms of a 500 ms
    render. What a render drops holds no cycles, so nothing waits for the collector; the pause ends with
    the call, and `settle_gc` runs once pushes settle. The collector is process-wide: only one render runs
    at a time (`Reconciler._rendering`), and nothing else here turns it off."""
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def _address(gw: Any) -> str | None:
    return f"{gw.address}:{gw.port}" if gw is not None else None


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGINT (Ctrl-C) and SIGTERM end the run gracefully: every child is stopped before we exit."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
