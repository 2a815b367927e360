"""The ADS server: State-of-the-World and incremental (delta) xDS over one gRPC stream per proxy (grpc.aio).

`_StreamState` (SotW) and `_DeltaStreamState` (delta) hold the protocol (what to answer, what to ignore,
what to record); the servicer only moves requests in and responses out, so the protocol is testable
without gRPC. Delta follows go-control-plane's delta server: per-resource versions (the content digest),
subscribe/unsubscribe with wildcard for LDS/CDS, `removed_resources`, and a reconnecting proxy's
`initial_resource_versions` taken as what it holds, so only what differs is sent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from mesh.xds import wire as xds
from mesh.xds.cache import SnapshotCache
from mesh.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SCOPED_ROUTE,
    WILDCARD_TYPES,
    ResourceSet,
    Snapshot,
    part_diff,
)

log = logging.getLogger(__name__)

#: What an unknown node is answered with: every type empty, so Envoy finishes initialising at once
#: (otherwise it waits ~30 s for the initial fetch) and is pushed the real snapshot when it arrives.
EMPTY = Snapshot.of()

DiscoveryRequest = Any  # envoy.service.discovery.v3.DiscoveryRequest (the generated modules are untyped)
DiscoveryResponse = Any  # what tests and callers receive: our `Response`


ROUTING_TYPES = (LISTENER, SCOPED_ROUTE, ROUTE)
"""What refers to clusters. Make-before-break both ways, as the xDS protocol asks: these are sent only once
the proxy has ACKed the snapshot's clusters (Envoy ACKs CDS when the new clusters have warmed), and a
cluster the snapshot dropped is removed only once these are ACKed at the snapshot's version. Otherwise a
request between the two finds no cluster (Envoy's 503 `NC`): measured on a real Envoy, 12-19 of ~1100
requests over 12 route moves (tests/integration). A NACKed route update leaves the old routes, and so
their clusters, serving. A NACKed cluster update does not hold routes back: the proxy keeps its old
clusters, status names the NACK, and other services' route changes still reach it."""
HELD_TYPES = (CLUSTER, ENDPOINT)

TOKEN_METADATA = "x-lockgate-token"
"""The gRPC metadata key a proxy's credential travels in (Envoy: `grpc_services[].initial_metadata`)."""


class Authenticator(Protocol):
    """Who a stream's credential says the proxy is. Local runtime: a per-proxy token written beside its
    bootstrap; Kubernetes: a service-account token. None: not a credential of this control plane."""

    def node_for(self, token: str) -> str | Awaitable[str | None] | None:
        """The node id `token` names, or None. May be a coroutine: a service-account token is checked with
        the Kubernetes TokenReview API (a network call, once per stream, never on the event loop's time)."""


def _to_serve(cache: SnapshotCache, node_id: str, *, holding: bool) -> Snapshot | None:
    """What a stream of `node_id` is served (SotW and delta alike): its snapshot, or the empty one for a
    proxy nothing is rendered for yet. None: nothing now: a proxy that already serves a configuration
    (the control plane restarted under it) waits for its real snapshot, since an empty answer would wipe
    what it serves."""
    snapshot = cache.get(node_id)
    if snapshot is None:
        return None if holding else EMPTY
    return snapshot


class PermissionDenied(ValueError):
    """A stream asked to be a proxy its credential does not name."""


class ProtocolError(ValueError):
    """The proxy broke the protocol in a way that ends the stream."""


@dataclass(frozen=True)
class _Sent:
    """What the stream last sent for one type: the type's version and the names it answered for."""

    version: str
    names: frozenset[str]
    nonce: str
    seq: int
    """Position among this stream's responses (the nonce is its decimal form), to tell which came last."""


class _Bound:
    """What both protocols share: the stream is bound to one node id, its credential's if it has one."""

    def __init__(self, cache: SnapshotCache, *, wake: Callable[[], None] | None, allowed: str | None) -> None:
        self._cache = cache
        self._wake = wake
        self._allowed = allowed
        """The only node id this stream may be (its credential's); None: any (no authentication)."""
        self.node_id: str | None = None

    def _bind(self, request: Any) -> str:
        """The stream's node id: taken from its first request, checked against the credential and every
        later request that names one."""
        if self.node_id is None:
            node_id = str(request.node.id)
            if not node_id:
                raise ProtocolError("the first request of a stream must carry node.id")
            if self._allowed is not None and node_id != self._allowed:
                raise PermissionDenied(f"this credential is for {self._allowed}, not {node_id}")
            self.node_id = node_id
            self._cache.watch(node_id, self)  # type: ignore[arg-type]  # subclasses are Watches
        elif request.node.id and str(request.node.id) != self.node_id:
            raise PermissionDenied(f"a stream is bound to {self.node_id}; it cannot become {request.node.id}")
        return self.node_id

    def wake(self) -> None:
        if self._wake is not None:
            self._wake()

    def close(self) -> None:
        if self.node_id is not None:
            self._cache.unwatch(self.node_id, self)  # type: ignore[arg-type]


class _StreamState(_Bound):
    """SotW protocol state of one ADS stream.

    Feed it every request (`on_request`) and call `pending()` when the cache wakes it; both return the
    responses to send, in make-before-break order. It registers itself with the cache as a `Watch`.
    """

    def __init__(self, cache: SnapshotCache, *, wake: Callable[[], None] | None = None,
                 allowed: str | None = None) -> None:
        super().__init__(cache, wake=wake, allowed=allowed)
        self._names: dict[str, frozenset[str]] = {}
        """Subscribed types -> requested names (empty for wildcard types)."""
        self._sent: dict[str, _Sent] = {}
        self._owed: set[str] = set()
        """Types to answer although neither version nor names changed (EDS for clusters Envoy is warming)."""
        self._nonce = 0
        self._holding = False
        """The proxy reconnected holding a configuration (its first requests carried a version)."""
        self._acked: dict[str, str] = {}
        """Type -> the version this stream's proxy last ACKed."""
        self._answered: dict[str, str] = {}
        """Type -> the nonce of the last response the proxy ACKed or NACKed."""
        self._cds: tuple[tuple[ResourceSet, ...], dict[str, ResourceSet]] | None = None
        """The parts the last CDS response was built from, and the clusters it still carried from older
        parts (name -> that part) while the routes that dropped them were not yet ACKed (`ROUTING_TYPES`)."""

    # --- the cache's Watch protocol ---

    def wants(self, snapshot: Snapshot) -> bool:
        return any(
            t in self._owed or (sent := self._sent.get(t)) is None or sent.version != snapshot.version(t)
            for t in self._names
        )

    # --- the protocol ---

    def on_request(self, request: DiscoveryRequest) -> list[DiscoveryResponse]:
        """Record what `request` says (ACK, NACK, subscription) and return what must be answered."""
        node_id = self._bind(request)
        type_url = str(request.type_url)
        if type_url not in PUSH_ORDER:
            log.info("node %s asked for unsupported type %s; ignored", node_id, type_url)
            return []
        nonce = str(request.response_nonce)
        sent = self._sent.get(type_url)
        if nonce:
            if sent is None or nonce != sent.nonce:
                return []  # stale: answers a response we have since superseded; a newer request follows
            self._answered[type_url] = nonce
            if request.HasField("error_detail"):
                self._cache.rejected(
                    node_id, type_url, version=sent.version, message=str(request.error_detail.message)
                )
            else:
                self._cache.applied(node_id, type_url, str(request.version_info))
                self._acked[type_url] = str(request.version_info)
                if self._warming(type_url):
                    log.debug("node %s asks for EDS again after a CDS update: answering", node_id)
                    self._owed.add(type_url)
        else:
            # A new subscription. A proxy reconnecting after a control-plane restart says what it holds.
            self._cache.applied(node_id, type_url, str(request.version_info))
            self._sent.pop(type_url, None)
            if request.version_info:
                self._holding = True
        if type_url in WILDCARD_TYPES:
            self._names[type_url] = frozenset()
        elif request.resource_names:
            names = frozenset(request.resource_names)
            if names != self._names.get(type_url):  # every ACK repeats them: only a change is interned
                self._names[type_url] = frozenset(map(sys.intern, names))
        else:
            # Named types with no names: the proxy no longer wants any; there is nothing to answer.
            self._names.pop(type_url, None)
            self._sent.pop(type_url, None)
            self._owed.discard(type_url)
        return self.pending()

    def pending(self) -> list[DiscoveryResponse]:
        """Responses for every subscribed type whose version or requested names differ from what was sent,
        and for every type owed an answer (see `_warming`).

        A plain ACK or a NACK leaves both unchanged and owes nothing, so it is not answered; a NACKed version
        is not resent."""
        if self.node_id is None:
            return []
        snapshot = _to_serve(self._cache, self.node_id, holding=self._holding)
        if snapshot is None:
            return []
        out = []
        for type_url in PUSH_ORDER:
            names = self._names.get(type_url)
            if names is None:
                continue
            version = snapshot.version(type_url)
            sent = self._sent.get(type_url)
            if sent is not None and sent.version == version and sent.names == names and type_url not in self._owed:
                continue
            if type_url == CLUSTER and sent is not None and sent.version.startswith(f"{version}+") \
                    and sent.names == names and self._routing_unsettled(snapshot):
                continue  # sent, holding the dropped clusters: the final CDS follows the routes' ACK
            if type_url in ROUTING_TYPES and self._clusters_unsettled(snapshot):
                continue  # sent once the proxy has the clusters they name (its CDS ACK answers this)
            out.append(self._response(snapshot, type_url, names))
        return out

    def _warming(self, type_url: str) -> bool:
        """Whether an ACK-shaped request of `type_url` (current nonce, no error) is Envoy asking for EDS for
        the clusters it is warming, which must be answered although nothing changed.

        Envoy keeps an updated EDS cluster warming until a ClusterLoadAssignment response arrives for it,
        even if its endpoints are unchanged; after a CDS update it re-requests EDS with the names, version and
        nonce it already ACKed, and waits out `initial_fetch_timeout` (15 s) if nothing comes. That request
        is byte for byte an ACK, so the stream's history decides: it is answered iff a CDS response went out
        after the EDS response it acknowledges. The answer is then the newest response, so its own ACK (and
        any repeat of the request) is not answered: one extra EDS response per CDS response at most."""
        if type_url != ENDPOINT:
            return False
        eds, cds = self._sent.get(ENDPOINT), self._sent.get(CLUSTER)
        return eds is not None and cds is not None and cds.seq > eds.seq

    def _routing_unsettled(self, snapshot: Snapshot) -> bool:
        return any(t in self._names and self._acked.get(t) != snapshot.version(t) for t in ROUTING_TYPES)

    def _clusters_unsettled(self, snapshot: Snapshot) -> bool:
        """Whether the snapshot's clusters are still to be sent, or sent and not yet answered (a CDS still
        holding dropped ones is the snapshot's: it has every cluster the snapshot names). A NACK answers."""
        if CLUSTER not in self._names:
            return False
        sent, version = self._sent.get(CLUSTER), snapshot.version(CLUSTER)
        if sent is None or (sent.version != version and not sent.version.startswith(f"{version}+")):
            return True
        return self._answered.get(CLUSTER) != sent.nonce

    def _held_clusters(self, snapshot: Snapshot) -> dict[str, ResourceSet]:
        """Clusters the proxy holds that `snapshot` dropped, kept in this CDS response while the routes
        are not ACKed at the snapshot's version (name -> the older part holding it). Only replaced parts
        are looked into: a part still in the snapshot lost nothing."""
        parts = snapshot.parts[CLUSTER]
        prev = self._cds
        self._cds = (parts, {})
        if prev is None or not self._routing_unsettled(snapshot):
            return {}
        now, before = {id(p) for p in parts}, {id(q) for q in prev[0]}
        replaced = [p for p in parts if id(p) not in before]
        held: dict[str, ResourceSet] = {}
        for old in prev[0]:
            if id(old) in now:
                continue
            for name in old:
                if not any(name in p.digests for p in replaced):
                    held[name] = old
        for name, old in prev[1].items():
            if not any(name in p.digests for p in parts):
                held[name] = old
        self._cds = (parts, held)
        return held

    def _response(self, snapshot: Snapshot, type_url: str, names: frozenset[str]) -> DiscoveryResponse:
        self._nonce += 1
        nonce = str(self._nonce)
        version = snapshot.version(type_url)
        held = self._held_clusters(snapshot) if type_url == CLUSTER else {}
        if held:
            version = f"{version}+{len(held)}held"  # not the snapshot's: the proxy is not converged yet
        self._sent[type_url] = _Sent(version=version, names=names, nonce=nonce, seq=self._nonce)
        self._owed.discard(type_url)
        wildcard = type_url in WILDCARD_TYPES
        bodies = []
        for part in snapshot.parts[type_url]:
            if wildcard or part.digests.keys() <= names:
                # The whole part: serialised once per part, however many proxies share it.
                body = part.wire.get((type_url, None))
                if body is None:
                    body = part.wire[(type_url, None)] = _framed(type_url, part, list(part))
            else:
                body = _framed(type_url, part, sorted(names.intersection(part.digests)))
            bodies.append(body)
        by_part: dict[int, tuple[ResourceSet, list[str]]] = {}
        for name, old in held.items():
            by_part.setdefault(id(old), (old, []))[1].append(name)
        bodies.extend(_framed(type_url, old, sorted(kept)) for old, kept in by_part.values())
        return Response(type_url=type_url, version_info=version, nonce=nonce, body=tuple(bodies))


Pick = Collection[str] | None
"""The resources of one part a delta response carries: None for none; the part's own `digests` for all
of it (whose framed bytes are cached on the part); otherwise a collection of its names."""


@dataclass
class _DeltaType:
    """Delta protocol state of one type on one stream."""

    wildcard: bool = False
    """Subscribed to every resource of the type (LDS/CDS's legacy empty first request, or `*`)."""
    names: set[str] = field(default_factory=set)
    """Resources subscribed to by name."""
    known: dict[str, str] = field(default_factory=dict)
    """Name -> the version (content digest) the proxy holds, as far as this stream knows: what it reported
    on connecting, then what was sent to it. A NACKed resource stays here, so it is not resent until the
    snapshot changes it again."""
    synced: str | None = None
    """The snapshot version of this type `known` was last reconciled with; None: never (answer at once)."""
    nonce: str | None = None
    """The latest response not yet ACKed or NACKed."""
    carried: tuple[Collection[str], ...] = ()
    """Names that response carried (resources and removals): what a NACK is about. Kept as the collections
    the response was built from: a first fetch carries thousands, and a NACK is rare."""
    refused: set[str] = field(default_factory=set)
    """Names the proxy NACKed and has not since accepted in a newer response."""
    basis: tuple[ResourceSet, ...] | None = ()
    """The part objects `known` was last reconciled with (held, so that identity stays meaningful): `known`
    is exactly the digests of their wanted resources, except names in `touched`. So a part still in the
    snapshot holds nothing to send, and only replaced parts are compared (`part_diff`, shared by every
    stream). None: not so (a reconnect's reported versions, a new wildcard subscription): the next
    reconciliation compares every name once."""
    touched: set[str] = field(default_factory=set)
    """Names subscribed to since the last reconciliation: compared one by one then."""
    withheld: set[str] = field(default_factory=set)
    """Removals not yet sent (clusters and endpoints): the routes that dropped them are not ACKed yet
    (`ROUTING_TYPES`). No longer in `known`; sent as `removed_resources` once they are."""

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def reconcile(self, parts: tuple[ResourceSet, ...]) -> tuple[list[Pick], list[str]]:
        """What to send (one pick per part) and what to name as removed so that the proxy holds exactly
        the wanted resources of `parts`; `known` is updated to that and `parts` become the basis."""
        picks, removed = self._against_basis(parts) if self.basis is not None else self._against_all(parts)
        known = self.known
        for part, pick in zip(parts, picks, strict=True):
            if pick is part.digests:
                known.update(part.digests)
            elif pick:
                known.update(zip(pick, map(part.digests.__getitem__, pick), strict=True))
        for name in removed:
            known.pop(name, None)
        self.basis = parts
        self.touched.clear()
        return picks, sorted(removed)

    def _pick(self, part: ResourceSet, changed: Mapping[str, str] | Collection[str]) -> Pick:
        """The wanted ones among a part's `changed` names; the part's own digests when that is all of it."""
        if changed is part.digests and self.wildcard:
            return part.digests
        picked = changed if self.wildcard else self.names.intersection(changed)
        if not picked:
            return None
        return part.digests if len(picked) == len(part) else picked

    def _against_all(self, parts: tuple[ResourceSet, ...]) -> tuple[list[Pick], set[str]]:
        """Every wanted name compared with what the proxy reported holding (set operations on the parts'
        digest maps; the Python loops run over differences only)."""
        known = self.known
        picks: list[Pick] = []
        for part in parts:
            digests = part.digests
            if not known:
                picks.append(self._pick(part, digests))
                continue
            differ = {name for name, _ in digests.items() - known.items()}
            picks.append(self._pick(part, differ))
        removed: set[str] = set()
        if known:
            present = set().union(*(p.digests.keys() for p in parts))
            removed = {n for n in known.keys() - present if self.wants(n)}
            self.known = {n: v for n, v in known.items() if n in present and self.wants(n)}
        return picks, removed

    def _against_basis(self, parts: tuple[ResourceSet, ...]) -> tuple[list[Pick], set[str]]:
        """Only parts that are not the basis's objects are compared, each against the basis part it
        replaces (paired in order; a name that moved between parts is looked up in the others)."""
        basis = self.basis or ()
        kept = {id(p) for p in parts} & {id(p) for p in basis}
        gone = [p for p in basis if id(p) not in kept]
        came = [i for i, p in enumerate(parts) if id(p) not in kept]
        picks: list[Pick] = [None] * len(parts)
        removed: set[str] = set()
        for k, i in enumerate(came):
            part = parts[i]
            diff = part_diff(gone[k] if k < len(gone) else None, part)
            changed: Mapping[str, str] = diff.changed
            others = [p for j, p in enumerate(gone) if j != k]
            if others and diff.added:  # moved here from another replaced part, unchanged: already held
                same = {n for n in diff.added if any(o.digests.get(n) == part.digests[n] for o in others)}
                if same:
                    changed = {n: v for n, v in changed.items() if n not in same}
            picks[i] = self._pick(part, changed)
        for k, old in enumerate(gone):
            after = parts[came[k]] if k < len(came) else None
            dropped = part_diff(old, after).removed if after is not None else old.digests.keys()
            others = [parts[i] for j, i in enumerate(came) if j != k]
            removed.update(n for n in dropped
                           if n in self.known and not any(n in p.digests for p in others))
        if self.touched:
            self._touched(parts, picks, removed)
        return picks, removed

    def _touched(self, parts: tuple[ResourceSet, ...], picks: list[Pick], removed: set[str]) -> None:
        """Add to `picks` and `removed` what names subscribed since the basis need: each compared with what
        the proxy holds (a part already picked whole needs no look)."""
        known = self.known
        for i, part in enumerate(parts):
            pick = picks[i]
            if pick is part.digests:
                continue
            digests = part.digests
            more = {n for n in self.touched.intersection(digests) if known.get(n) != digests[n] and self.wants(n)}
            if more:
                picks[i] = self._pick(part, more.union(pick or ()))
        for name in self.touched.intersection(known):
            if self.wants(name) and not any(name in p.digests for p in parts):
                removed.add(name)


class _DeltaStreamState(_Bound):
    """Incremental (delta) xDS protocol state of one ADS stream.

    Same contract as `_StreamState`: feed it every DeltaDiscoveryRequest and call `pending()` when the
    cache wakes it. A response carries only resources whose content digest differs from what the proxy
    holds, plus `removed_resources` for names it holds that the snapshot no longer has. A type whose
    subscribed resources did not change is not answered; the cache is told the proxy holds the new version
    (it does: everything it asked for is unchanged), so convergence is measured the same way as in SotW.

    The cost of a push is what changed, not the mesh: each type remembers the part objects the proxy is
    synced with (`_DeltaType.basis`), and only parts render replaced are compared."""

    def __init__(self, cache: SnapshotCache, *, wake: Callable[[], None] | None = None,
                 allowed: str | None = None) -> None:
        super().__init__(cache, wake=wake, allowed=allowed)
        self._types: dict[str, _DeltaType] = {}
        self._nonce = 0
        self._holding = False

    def wants(self, snapshot: Snapshot) -> bool:
        return any(st.synced != snapshot.version(t) for t, st in self._types.items())

    def on_request(self, request: Any) -> list[DeltaResponse]:
        """Record what `request` says (ACK, NACK, subscription changes) and return what must be answered."""
        node_id = self._bind(request)
        type_url = str(request.type_url)
        if type_url not in PUSH_ORDER:
            log.info("node %s asked for unsupported type %s; ignored", node_id, type_url)
            return []
        st = self._types.get(type_url)
        initial = dict(request.initial_resource_versions)
        if st is None:
            st = self._types[type_url] = _DeltaType(known=initial, basis=None if initial else ())
            if initial:
                self._holding = True  # reconnected under a configuration: never wipe it with an empty answer
            if type_url in WILDCARD_TYPES and not request.resource_names_subscribe:
                st.wildcard = True
        nonce = str(request.response_nonce)
        if nonce and nonce == st.nonce:
            st.nonce = None
            if request.HasField("error_detail"):
                for names in st.carried:
                    st.refused.update(names)
                self._cache.rejected(node_id, type_url, version=st.synced or "",
                                     message=str(request.error_detail.message),
                                     resources=tuple(n for names in st.carried for n in names))
            else:
                if st.refused:
                    for names in st.carried:
                        st.refused.difference_update(names)
                if not st.refused and not st.withheld:
                    self._cache.applied(node_id, type_url, st.synced or "")
        # else: no nonce (a subscription change), or one we have since superseded: the newer one decides.
        # Thousands on a first EDS fetch: set operations. Interned, so that a hundred streams subscribed to
        # one name hold one string (measured at 1000 services x 100 proxies: ~3000 names per stream).
        subscribe = set(map(sys.intern, request.resource_names_subscribe))
        if "*" in subscribe:
            subscribe.discard("*")
            if not st.wildcard and st.basis:
                st.basis = None  # newly wanted: every held part's other resources
            st.wildcard = True
        if subscribe:
            st.names |= subscribe
            st.touched |= subscribe
            asked = subscribe.difference(initial)
            if asked:
                for name in asked.intersection(st.known):
                    del st.known[name]  # subscribing again to a held name asks for it again
                st.synced = None
        for name in request.resource_names_unsubscribe:
            if name == "*":
                st.wildcard = False
                st.known = {n: v for n, v in st.known.items() if n in st.names}
            else:
                st.names.discard(name)
                if not st.wildcard:
                    st.known.pop(name, None)
                    st.refused.discard(name)
        return self.pending()

    def _routing_unsettled(self, snapshot: Snapshot) -> bool:
        """Whether a routing type is not yet ACKed at the snapshot's version (sent and unanswered, NACKed,
        or still to be sent)."""
        for t in ROUTING_TYPES:
            st = self._types.get(t)
            if st is None:
                if t == LISTENER and self._holding:
                    return True  # reconnected under old listeners and routes it has not asked about yet
                continue
            if st.synced != snapshot.version(t) or st.nonce is not None or st.refused:
                return True
        return False

    def _clusters_unsettled(self, snapshot: Snapshot) -> bool:
        """Whether the snapshot's clusters are still to be reconciled, or sent and not yet answered (a NACK
        answers: the proxy keeps its old clusters, and other routes' changes must still reach it)."""
        st = self._types.get(CLUSTER)
        return st is not None and (st.synced != snapshot.version(CLUSTER) or st.nonce is not None)

    def _hold(self, st: _DeltaType, parts: tuple[ResourceSet, ...], removed: list[str],
              snapshot: Snapshot) -> list[str]:
        """The removals to send now: none while the routes are unsettled (they wait in `withheld`), else
        the withheld ones still wanted and absent, with `removed`."""
        if st.withheld:
            st.withheld = {n for n in st.withheld if st.wants(n) and not any(n in p.digests for p in parts)}
        if self._routing_unsettled(snapshot):
            st.withheld.update(removed)
            return []
        if not st.withheld:
            return removed
        out = sorted(st.withheld.union(removed))
        st.withheld.clear()
        return out

    def pending(self) -> list[DeltaResponse]:
        """One response per type whose subscribed resources differ from what the proxy holds, in
        make-before-break order; the first reconciliation of a type is always answered (Envoy waits out
        its initial fetch timeout otherwise)."""
        if self.node_id is None:
            return []
        snapshot = _to_serve(self._cache, self.node_id, holding=self._holding)
        if snapshot is None:
            return []
        out = []
        for type_url in PUSH_ORDER:
            st = self._types.get(type_url)
            if st is None:
                continue
            version = snapshot.version(type_url)
            parts = snapshot.parts[type_url]
            picks: list[Pick]
            removed: list[str]
            if type_url in ROUTING_TYPES and self._clusters_unsettled(snapshot):
                continue  # sent once the proxy has the clusters they name (its CDS ACK answers this)
            if st.synced == version:
                if st.basis is not None and not st.touched:
                    st.basis = parts  # the same content (equal versions): adopt the newer objects
                if not st.withheld or st.nonce is not None or self._routing_unsettled(snapshot):
                    continue
                first, picks, removed = False, [None] * len(parts), []  # only the withheld removals
            else:
                first = st.synced is None
                picks, removed = st.reconcile(parts)
                st.synced = version
            if type_url in HELD_TYPES:
                removed = self._hold(st, parts, removed, snapshot)
            if not removed and not any(picks) and not first:
                if st.nonce is None and not st.refused and not st.withheld:
                    self._cache.applied(self.node_id, type_url, version)
                continue
            self._nonce += 1
            st.nonce = str(self._nonce)
            st.carried = (*(p for p in picks if p), removed)
            out.append(DeltaResponse(type_url=type_url, system_version_info=version, nonce=st.nonce,
                                     body=_delta_body(type_url, parts, picks), removed=tuple(removed)))
        return out


def serialise_ahead(snapshots: Iterable[Snapshot]) -> int:
    """Serialise every resource of `snapshots` that is not serialised yet (`wire.to_any_bytes`, memoised
    by content digest and thread-safe); how many were new. Meant for the thread that rendered them: the
    first stream to need a resource otherwise serialises it on the event loop (measured at 1000 services
    x 100 proxies: one stream's first answer held the loop for 0.3-0.5 s). Parts shared by many snapshots
    are visited once."""
    seen: set[int] = set()
    made = 0
    epoch = str(xds.epoch()).encode()
    for snap in snapshots:
        for type_url, parts in snap.parts.items():
            if snap.marks.get(type_url) == epoch:  # these very parts, carried from the proxy's last snapshot
                continue
            for part in parts:
                if id(part) in seen or part.wire.get(_SERIALISED) == epoch:
                    continue
                seen.add(id(part))
                for name in part:
                    made += xds.serialise_once(type_url, part[name], part.digests[name])
                part.wire[_SERIALISED] = str(xds.epoch()).encode()
            if str(xds.epoch()).encode() == epoch:  # nothing was dropped from the cache meanwhile
                snap.marks[type_url] = epoch
    return made


_SERIALISED = ("serialised", None)
"""Marks a part `serialise_ahead` found all serialised, with the cache's epoch then: render carries
unchanged parts into the next snapshot, and walking their thousands of resources again found nothing to
do (~10 ms per one-route commit). A resource dropped from the cache since changes the epoch."""


def _delta_body(type_url: str, parts: tuple[ResourceSet, ...], picks: list[Pick]) -> tuple[bytes, ...]:
    """The picked resources framed for a DeltaDiscoveryResponse, as chunks (one per part): the response
    joins them once with its own fields, so a first fetch's ~2.5 MB per proxy is copied once, not twice. A
    part sent whole (three thousand clusters shared by a hundred proxies) is joined once and reused."""
    bodies = []
    for part, pick in zip(parts, picks, strict=True):
        if not pick:
            continue
        if pick is part.digests:
            key = (f"delta:{type_url}", None)
            body = part.wire.get(key)
            if body is None:
                body = part.wire[key] = b"".join(
                    _delta_resource(type_url, n, part[n], part.digests[n]) for n in part)
        else:
            body = b"".join(_delta_resource(type_url, n, part[n], part.digests[n]) for n in sorted(pick))
        bodies.append(body)
    return tuple(bodies)


_delta_framed: dict[tuple[str, str, str], bytes] = {}


def forget_serialised() -> None:
    """Drop every memoised serialisation and framing (wire.forget): a bench point then starts cold."""
    xds.forget()
    _delta_framed.clear()


def _delta_resource(type_url: str, name: str, resource: Any, content_digest: str) -> bytes:
    """One DeltaDiscoveryResponse.resources entry (field 2): Resource{name = 3, version = 1, resource = 2},
    memoised by (type, name, digest), so a resource shared by a hundred proxies is framed once."""
    key = (type_url, name, content_digest)
    found = _delta_framed.get(key)
    if found is None:
        if len(_delta_framed) >= 200_000:
            _delta_framed.clear()
        packed = xds.to_any_bytes(type_url, resource, content_digest=content_digest)
        found = _delta_framed[key] = xds.field_bytes(2, b"".join([
            xds.field_bytes(3, name.encode()), xds.field_bytes(1, content_digest.encode()),
            xds.field_bytes(2, packed)]))
    return found


@dataclass(frozen=True)
class DeltaResponse:
    """A DeltaDiscoveryResponse assembled from cached bytes (system_version_info = 1, resources = 2,
    type_url = 4, nonce = 5, removed_resources = 6)."""

    type_url: str
    system_version_info: str
    nonce: str
    body: tuple[bytes, ...]
    """The changed resources, already framed as field 2 entries (chunks, joined once when sent)."""
    removed: tuple[str, ...] = ()

    def SerializeToString(self) -> bytes:  # the protobuf spelling, so gRPC can treat it alike
        return b"".join([xds.field_bytes(1, self.system_version_info.encode()), *self.body,
                         xds.field_bytes(4, self.type_url.encode()), xds.field_bytes(5, self.nonce.encode()),
                         *(xds.field_bytes(6, n.encode()) for n in self.removed)])

    @property
    def resources(self) -> list[Any]:
        """The resources as `Resource` messages (for tests and logs; the wire path never builds these)."""
        return list(discovery_pb2.DeltaDiscoveryResponse.FromString(b"".join(self.body)).resources)

    @property
    def removed_resources(self) -> list[str]:
        return list(self.removed)


def _framed(type_url: str, part: ResourceSet, names: list[str]) -> bytes:
    """Resources as repeated DiscoveryResponse.resources fields (field 2), ready to concatenate."""
    return b"".join(xds.field_bytes(2, xds.to_any_bytes(type_url, part[n], content_digest=part.digests[n]))
                    for n in names)


@dataclass(frozen=True)
class Response:
    """A DiscoveryResponse whose resources are already serialised `Any`s.

    Serialising is a byte join of cached pieces (DiscoveryResponse: version_info = 1, resources = 2,
    type_url = 4, nonce = 5), so sending one big configuration to a hundred proxies costs a hundred
    memcpys rather than a hundred proto builds."""

    type_url: str
    version_info: str
    nonce: str
    body: tuple[bytes, ...]
    """The resources, already framed as DiscoveryResponse field 2 entries (chunks, joined once when sent)."""

    def SerializeToString(self) -> bytes:  # the protobuf spelling, so gRPC can treat it alike
        return b"".join([xds.field_bytes(1, self.version_info.encode()), *self.body,
                         xds.field_bytes(4, self.type_url.encode()), xds.field_bytes(5, self.nonce.encode())])

    @property
    def resources(self) -> list[Any]:
        """The resources as `Any` messages (for tests and logs; the wire path never builds these)."""
        return list(discovery_pb2.DiscoveryResponse.FromString(b"".join(self.body)).resources)


_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _serialize(response: Any) -> bytes:
    return bytes(response.SerializeToString())


_WAKE = object()
_EOF = object()


class _AdsServicer:
    """gRPC glue: the credential checked, then requests and cache wake-ups in, responses out."""

    def __init__(self, cache: SnapshotCache, authenticator: Authenticator | None) -> None:
        self._cache = cache
        self._authenticator = authenticator

    async def _identify(self, context: Any) -> str | None:
        """The node id the stream's credential names; raises PermissionDenied without a valid one."""
        if self._authenticator is None:
            return None
        token = next((str(v) for k, v in context.invocation_metadata() or () if k == TOKEN_METADATA), None)
        found = self._authenticator.node_for(token) if token else None
        node = await found if inspect.isawaitable(found) else found
        if node is None:
            raise PermissionDenied("no valid credential")
        return node

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        try:
            allowed = await self._identify(context)
        except PermissionDenied as exc:
            log.warning("refused an ADS stream from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"lockgate: {exc}")
            return
        queue: asyncio.Queue[object] = asyncio.Queue()
        state = _StreamState(self._cache, wake=lambda: queue.put_nowait(_WAKE), allowed=allowed)
        await self._serve(state, queue, request_iterator, context)

    async def DeltaAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        try:
            allowed = await self._identify(context)
        except PermissionDenied as exc:
            log.warning("refused a delta ADS stream from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"lockgate: {exc}")
            return
        queue: asyncio.Queue[object] = asyncio.Queue()
        state = _DeltaStreamState(self._cache, wake=lambda: queue.put_nowait(_WAKE), allowed=allowed)
        await self._serve(state, queue, request_iterator, context)

    async def _serve(self, state: _StreamState | _DeltaStreamState, queue: asyncio.Queue[object],
                     request_iterator: Any, context: Any) -> None:
        """Requests and cache wake-ups in, the protocol's answers out, until the peer goes away."""

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            except Exception as exc:  # the peer went away mid-read; the stream ends either way
                log.debug("ADS stream read ended: %r", exc)
            finally:
                queue.put_nowait(_EOF)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    break
                try:
                    responses: list[Any] = state.pending() if item is _WAKE else state.on_request(item)
                except PermissionDenied as exc:
                    log.warning("refused an ADS stream from %s: %s", context.peer(), exc)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"lockgate: {exc}")
                    return
                except ProtocolError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                except ValueError as exc:  # a resource that does not pack: validation should have caught it
                    log.error("cannot serve node %s: %s", state.node_id, exc)
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"lockgate cannot serve this snapshot: {exc}"
                    )
                    return
                for response in responses:
                    await context.write(response)
        finally:
            reader.cancel()
            state.close()


class AdsServer:
    """An ADS gRPC server over a SnapshotCache, bound to one address (plaintext: loopback only).

    With an `authenticator`, every stream must carry a credential (`TOKEN_METADATA`) and is bound to the
    one node id it names: a stream claiming another proxy, or carrying no valid credential, is refused
    before it can read a secret or record an ACK. Without one (tests of the protocol), anyone is served."""

    def __init__(self, cache: SnapshotCache, *, host: str, port: int = 0,
                 authenticator: Authenticator | None = None) -> None:
        self._cache = cache
        self._authenticator = authenticator
        self._host = host
        self._port = port
        self._server: Any = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and serve; return the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("AdsServer already started")
        self._cache.bind(asyncio.get_running_loop())
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ]
        )
        servicer = _AdsServicer(self._cache, self._authenticator)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                servicer.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                servicer.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize),
        }),))
        host = f"[{self._host}]" if ":" in self._host else self._host
        port = int(server.add_insecure_port(f"{host}:{self._port}"))
        if port == 0:
            raise OSError(f"cannot bind the ADS server to {self._host}:{self._port}")
        await server.start()
        self._server, self.port = server, port
        return port

    async def stop(self, grace: float = 0.5) -> None:
        """Stop accepting streams and end open ones after `grace` seconds."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
