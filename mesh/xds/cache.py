"""SnapshotCache: the desired snapshot per proxy, the streams serving it, and what each proxy ACKed.

The cache is the only thing the ADS server knows (go-control-plane's cache.go is the model). Setting a
snapshot wakes only the streams of that node that have sent something different, and every ACK or
NACK is recorded so that "proxy P runs revision R" is a measured fact the runtime can report.

The cache is not thread-safe: it belongs to the event loop the ADS server runs on. Other threads call
`set_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh.xds.snapshot import Snapshot

log = logging.getLogger(__name__)


class Watch(Protocol):
    """One open stream of a node, as the cache sees it."""

    def wants(self, snapshot: Snapshot) -> bool:
        """True if this stream has sent (or will need to send) something `snapshot` changes."""
        ...

    def wake(self) -> None:
        """Ask the stream to compute and send its pending responses. Must not block."""
        ...


@dataclass(frozen=True)
class ProxyStatus:
    """What one proxy has accepted, as reported by its own ACKs and NACKs."""

    node_id: str
    connected: bool = False
    """At least one ADS stream from this node is open."""
    acked: dict[str, str] = field(default_factory=dict)
    """Type URL -> the version the proxy last ACKed (or reported holding when it reconnected)."""
    acked_version: str | None = None
    """`version_all` of the latest snapshot the proxy fully ACKed; kept until a newer one converges."""
    acked_revision: str | None = None
    """The Git revision of that converged snapshot."""
    nack: str | None = None
    """Envoy's error_detail message for the latest NACK of the current snapshot, until that type ACKs."""
    nack_type: str | None = None
    """The type URL the NACK was about."""
    nack_resources: tuple[str, ...] = ()
    """Resources of that type that differ from the last version this proxy accepted: Envoy's message
    rarely names the culprit, and it is among these."""


@dataclass
class _Node:
    node_id: str
    snapshot: Snapshot | None = None
    watches: list[Watch] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)
    acked_version: str | None = None
    acked_revision: str | None = None
    nack: str | None = None
    nack_type: str | None = None
    nack_version: str | None = None
    nack_resources: tuple[str, ...] = ()
    accepted: dict[str, Snapshot] = field(default_factory=dict)
    """Type URL -> the snapshot whose version of that type the proxy last ACKed (to tell what changed)."""

    def status(self) -> ProxyStatus:
        return ProxyStatus(
            node_id=self.node_id,
            connected=bool(self.watches),
            acked=dict(self.acked),
            acked_version=self.acked_version,
            acked_revision=self.acked_revision,
            nack=self.nack,
            nack_type=self.nack_type,
            nack_resources=self.nack_resources,
        )

    def stamp(self) -> tuple[object, ...]:
        """What `status()` reports, without building it: equal stamps, equal statuses (the cache compares
        them around every set and every ACK of every proxy)."""
        return (bool(self.watches), dict(self.acked), self.acked_version, self.acked_revision, self.nack,
                self.nack_type, self.nack_resources)

    def converge(self) -> None:
        """Adopt the current snapshot as converged once every non-empty type is ACKed at its version."""
        snap = self.snapshot
        if snap is None or (self.acked_version == snap.version_all and self.acked_revision == snap.revision):
            return
        acked = self.acked
        if all(acked.get(t) == v for t, v in snap.wanted):
            self.acked_version = snap.version_all
            self.acked_revision = snap.revision


StatusCallback = Callable[[ProxyStatus], None]


class SnapshotCache:
    """Snapshots keyed by node id, open streams per node, and per-node ACK/NACK status."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        self._subscribers: list[StatusCallback] = []
        self._changed: dict[str, list[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- desired state -------------------------------------------------------------------------------

    def set(self, node_id: str, snapshot: Snapshot) -> None:
        """Store `snapshot` for `node_id` and wake the streams of that node that have sent something else."""
        node = self._node(node_id)
        before = node.stamp()
        node.snapshot = snapshot
        if node.nack_type is not None and snapshot.version(node.nack_type) != node.nack_version:
            node.nack = node.nack_type = node.nack_version = None
            node.nack_resources = ()
        node.converge()
        for watch in list(node.watches):
            if watch.wants(snapshot):
                watch.wake()
        self._changed_if(node, before)

    def set_threadsafe(self, node_id: str, snapshot: Snapshot) -> concurrent.futures.Future[None]:
        """`set` from another thread; the future completes once the cache has taken the snapshot."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("SnapshotCache is not bound to an event loop yet (start the AdsServer first)")

        async def _set() -> None:
            self.set(node_id, snapshot)

        return asyncio.run_coroutine_threadsafe(_set(), loop)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Name the loop the cache lives on (the ADS server does this when it starts)."""
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("SnapshotCache is already bound to another event loop")
        self._loop = loop

    def get(self, node_id: str) -> Snapshot | None:
        node = self._nodes.get(node_id)
        return node.snapshot if node else None

    def clear(self, node_id: str) -> None:
        """Forget the node's snapshot and status. Open streams stay open and keep what they were sent."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        if not node.watches:
            del self._nodes[node_id]
            return
        before = node.stamp()
        self._nodes[node_id] = fresh = _Node(node_id, watches=node.watches)
        self._changed_if(fresh, before)

    def nodes(self) -> list[str]:
        """Ids of every node that has a snapshot or an open stream, sorted."""
        return sorted(self._nodes)

    # --- observed state ------------------------------------------------------------------------------

    def status(self) -> dict[str, ProxyStatus]:
        return {node_id: node.status() for node_id, node in sorted(self._nodes.items())}

    def subscribe(self, callback: StatusCallback) -> Callable[[], None]:
        """Call `callback(status)` on the loop whenever a node's status changes. Returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def wait_converged(self, node_id: str, version_all: str, *, timeout: float) -> bool:
        """Wait until `node_id` has ACKed every type of the snapshot whose `version_all` is given."""
        self.bind(asyncio.get_running_loop())
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            node = self._nodes.get(node_id)
            if node is not None and node.acked_version == version_all:
                return True
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            event = asyncio.Event()
            waiters = self._changed.setdefault(node_id, [])
            waiters.append(event)
            try:
                async with asyncio.timeout(remaining):  # not wait_for: it can swallow a cancellation on 3.11
                    await event.wait()
            except TimeoutError:
                pass
            finally:
                waiters.remove(event)

    # --- the stream side (used by mesh.xds.server) -------------------------------------------------------

    def watch(self, node_id: str, watch: Watch) -> None:
        """Register an open stream of `node_id`; it is woken by `set` when it `wants` the new snapshot."""
        node = self._node(node_id)
        before = node.stamp()
        node.watches.append(watch)
        self._changed_if(node, before)

    def unwatch(self, node_id: str, watch: Watch) -> None:
        node = self._nodes.get(node_id)
        if node is None or watch not in node.watches:
            return
        before = node.stamp()
        node.watches.remove(watch)
        if not node.watches and node.snapshot is None:
            del self._nodes[node_id]  # cleared earlier, and now gone: nothing left to report
        self._changed_if(node, before)

    def applied(self, node_id: str, type_url: str, version: str) -> None:
        """The proxy holds `version` of `type_url`: an ACK, or the version a reconnecting proxy reports."""
        node = self._node(node_id)
        before = node.stamp()
        if version:
            node.acked[type_url] = version
        else:
            node.acked.pop(type_url, None)
        snap = node.snapshot
        if snap is not None and version == snap.version(type_url):
            node.accepted[type_url] = snap
        if node.nack_type == type_url and snap is not None and version == snap.version(type_url):
            node.nack = node.nack_type = node.nack_version = None
            node.nack_resources = ()
        node.converge()
        self._changed_if(node, before)

    def rejected(self, node_id: str, type_url: str, *, version: str, message: str,
                 resources: tuple[str, ...] | None = None) -> None:
        """The proxy NACKed `version` of `type_url`. Recorded only if that is the current snapshot's.

        `resources`: the names the rejected response carried (delta xDS sends only changed resources, so
        the culprit is among them); without it, those that differ from what the proxy last accepted."""
        node = self._node(node_id)
        log.warning("node %s rejected %s version %s: %s", node_id, type_url, version, message)
        snap = node.snapshot
        if snap is None or snap.version(type_url) != version:
            return
        before = node.stamp()
        node.nack, node.nack_type, node.nack_version = message, type_url, version
        node.nack_resources = (tuple(sorted(resources)) if resources is not None
                               else _changed(node.accepted.get(type_url), snap, type_url))
        self._changed_if(node, before)

    # --- internals -----------------------------------------------------------------------------------

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(node_id)
        return node

    def _changed_if(self, node: _Node, before: tuple[object, ...]) -> None:
        """Tell waiters and subscribers if the node's status is no longer what `before` (its stamp) was."""
        if node.stamp() == before:
            return
        for event in self._changed.get(node.node_id, ()):
            event.set()
        if not self._subscribers:
            return
        after = node.status()
        for callback in list(self._subscribers):
            try:
                callback(after)
            except Exception:
                log.exception("status subscriber %r failed", callback)


def _changed(before: Snapshot | None, after: Snapshot, type_url: str) -> tuple[str, ...]:
    """Names of `type_url` resources in `after` that are new or different since `before`.

    Only parts that are not the very objects of `before` are compared (a name in a shared part cannot be
    in another part of either snapshot), with set operations: a NACK at 1000 services costs what changed."""
    new = after.parts[type_url]
    if before is None:
        return tuple(sorted(n for p in new for n in p))
    kept = {id(p) for p in new} & {id(p) for p in before.parts[type_url]}
    old: dict[str, str] = {}
    for part in before.parts[type_url]:
        if id(part) not in kept:
            old.update(part.digests)
    return tuple(sorted(n for part in new if id(part) not in kept for n, _ in part.digests.items() - old.items()))
