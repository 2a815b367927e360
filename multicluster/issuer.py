"""Each cluster's control plane signs its proxies' workload certificates and re-issues them at half-life.

This is the edge where keys are made and the clock is read; what it hands render is plain data
(`IssuedCert` per node id and the trust bundle). Keys live in memory only: a restarted control plane
issues fresh certificates, which is cheaper than keeping workload keys on disk.

A cluster's intermediate can be replaced while the mesh runs (`replace_authority`): every certificate of
that cluster is re-issued at the next push. An intermediate under a root the proxies do not trust yet (a
root rotation) first only widens the trust bundle; it signs once that bundle has reached every proxy
(`bundle_delivered`), so no proxy is ever shown a chain it cannot verify.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from mesh.intent import Intent
from mesh.render import Proxy
from mesh.topology import ClusterTopology
from mesh.xds.cache import SnapshotCache
from mesh.xds.snapshot import SECRET
from multicluster.ca import CA, anchor_of, fingerprint, issue, pem, subject
from policies.identity import IssuedCert, identity_of
from policies.render import TRUST_BUNDLE


@dataclass(frozen=True)
class _Held:
    cluster: str
    cert: IssuedCert
    issued_at: float
    rotations: int = 0
    root: str = ""
    """SHA-256 of the root the certificate's chain leads to."""
    due: bool = False
    """Its intermediate was replaced: re-issued at the next push, whatever its age."""

    @property
    def rotate_at(self) -> float:
        """Half-way through the certificate's life: time enough to deliver the next one, twice over."""
        if self.due:
            return self.issued_at
        return self.issued_at + (self.cert.not_after - self.issued_at) / 2


class WorkloadIssuer:
    """Workload certificates of every proxy, per cluster, signed with that cluster's intermediate."""

    def __init__(self, *, ttl: float) -> None:
        if ttl < 2:
            raise ValueError(f"certificate TTL must be at least 2s, got {ttl:g}s")
        self.ttl = ttl
        self._authorities: dict[str, CA] = {}
        self._anchors: dict[str, str] = {}
        """Cluster -> SHA-256 of the root its intermediate chains to."""
        self._pending: dict[str, CA] = {}
        """Intermediates waiting for the bundle that holds their root to reach every proxy."""
        self._trusted: set[str] = set()
        """Roots every proxy is known to have in its bundle (SHA-256)."""
        self._roots: list[x509.Certificate] = []
        self._bundle: list[str] = []
        self._held: dict[str, _Held] = {}
        self._anchor_of: dict[x509.Certificate, str] = {}

    def _anchor(self, ca: CA) -> str:
        """SHA-256 of the root `ca` chains to (a signature check: remembered per intermediate)."""
        if ca.cert not in self._anchor_of:
            self._anchor_of[ca.cert] = fingerprint(anchor_of(ca))
        return self._anchor_of[ca.cert]

    def add_authority(self, cluster: str, ca: CA) -> None:
        """A cluster's intermediate from the start: its roots are served from the first snapshot on."""
        self._authorities[cluster] = ca
        self._anchors[cluster] = self._anchor(ca)
        self._trusted |= {fingerprint(r) for r in ca.roots}
        self._refresh_bundle()

    def replace_authority(self, cluster: str, ca: CA) -> bool:
        """`ca` signs for `cluster` from now on: every certificate held for that cluster is due at once (the
        old ones stay valid until they expire, under a root still trusted). If `ca` chains to a root not yet
        known to be in every proxy's bundle, only the bundle grows now and `ca` waits for `bundle_delivered`.
        The same intermediate with other roots changes just the bundle. Returns whether anything proxies get
        changed (then push)."""
        current = self._authorities.get(cluster)
        if current is None:
            self.add_authority(cluster, ca)
            return True
        dropped = self._pending.pop(cluster, None) is not None
        if ca.cert == current.cert:
            self._authorities[cluster] = ca
            changed = ca.roots != current.roots
        elif self._anchor(ca) in self._trusted:
            self._activate(cluster, ca)
            changed = True
        else:
            self._pending[cluster] = ca
            changed = True
        self._refresh_bundle()
        return changed or dropped

    @property
    def awaiting_bundle(self) -> bool:
        """Whether an intermediate waits for the current bundle to reach every proxy."""
        return bool(self._pending)

    def bundle_delivered(self) -> list[str]:
        """Every proxy has the current bundle: the intermediates waiting for it sign from now on (their
        clusters' certificates are due). Returns those clusters."""
        self._trusted = {fingerprint(r) for r in self._roots}
        ready = [c for c, ca in sorted(self._pending.items()) if self._anchor(ca) in self._trusted]
        for cluster in ready:
            self._activate(cluster, self._pending.pop(cluster))
        self._refresh_bundle()
        return ready

    def _activate(self, cluster: str, ca: CA) -> None:
        self._authorities[cluster] = ca
        self._anchors[cluster] = self._anchor(ca)
        for node_id, held in list(self._held.items()):
            if held.cluster == cluster:
                self._held[node_id] = dataclasses.replace(held, due=True)

    def _refresh_bundle(self) -> None:
        seen: dict[str, x509.Certificate] = {}
        for cluster in sorted(self._authorities):
            for ca in (self._authorities[cluster], self._pending.get(cluster)):
                for root in ca.roots if ca is not None else ():
                    seen.setdefault(fingerprint(root), root)
        self._roots = list(seen.values())
        self._bundle = [pem(r) for r in self._roots]
        self._trusted &= set(seen)  # a root dropped from the bundle must be delivered again to count

    @property
    def trust_bundle(self) -> list[str]:
        """Every root any cluster trusts (PEM), so calls between clusters verify too; during a root rotation
        the old roots and the new one."""
        return self._bundle

    def certs_for(self, intent: Intent, topology: ClusterTopology, *, now: float) -> dict[str, IssuedCert]:
        """A valid certificate for every proxy of the cluster: kept if its identity is right and it is not
        yet due, else issued anew. Proxies gone from the topology are forgotten."""
        ca = self._authorities[topology.cluster]
        root = self._anchors[topology.cluster]
        proxies: list[Proxy] = [*([topology.ingress] if topology.ingress else []), *topology.sidecars]
        # Rotations due within a moment are done together: one push instead of a burst of them.
        slack = min(1.0, self.ttl / 20)
        out: dict[str, IssuedCert] = {}
        for proxy in proxies:
            want = identity_of(intent, proxy)
            held = self._held.get(proxy.node_id)
            if held is None or held.cert.spiffe_id != want or now + slack >= held.rotate_at:
                cert = issue(ca, spiffe_id=want, now=dt.datetime.fromtimestamp(now, dt.UTC),
                             ttl=dt.timedelta(seconds=self.ttl))
                rotations = held.rotations + 1 if held is not None and held.cert.spiffe_id == want else 0
                held = self._held[proxy.node_id] = _Held(topology.cluster, cert, now, rotations, root)
            out[proxy.node_id] = held.cert
        for node_id in [n for n, h in self._held.items() if h.cluster == topology.cluster and n not in out]:
            del self._held[node_id]
        return out

    def next_rotation(self) -> float | None:
        """When the earliest certificate is due (Unix time), or None with nothing issued."""
        return min((h.rotate_at for h in self._held.values()), default=None)

    def describe(self) -> dict[str, Any]:
        """For the status file: identities, chains, validity and rotation times, the bundle and each cluster's
        intermediate (and one waiting for the bundle). Never a key."""
        roots = [{"subject": subject(r), "sha256": fingerprint(r), "notAfter": r.not_valid_after_utc.timestamp()}
                 for r in self._roots]
        authorities = []
        for cluster in sorted(self._authorities):
            for ca, pending in ((self._authorities[cluster], False), (self._pending.get(cluster), True)):
                if ca is not None:
                    authorities.append({
                        "cluster": cluster, "subject": ca.name, "sha256": fingerprint(ca.cert),
                        "notAfter": ca.cert.not_valid_after_utc.timestamp(),
                        "rootSha256": self._anchor(ca), "pending": pending})
        proxies = [{
            "proxy": node_id, "cluster": h.cluster, "spiffeId": h.cert.spiffe_id, "serial": h.cert.serial,
            "issuer": list(h.cert.issuer_chain), "rootSha256": h.root, "notBefore": h.cert.not_before,
            "notAfter": h.cert.not_after, "issuedAt": h.issued_at, "rotateAt": h.rotate_at,
            "rotations": h.rotations,
        } for node_id, h in sorted(self._held.items())]
        return {"ttl": self.ttl, "trustBundle": roots, "authorities": authorities, "proxies": proxies}


def bundle_acked(cache: SnapshotCache, bundle: Sequence[str]) -> bool:
    """Whether every connected proxy of a control plane has ACKed secrets whose trust bundle holds every root
    of `bundle`. A proxy that is not connected gets its whole snapshot, bundle included, when it reconnects;
    one that holds no trust bundle (an east-west gateway passes TLS through) has nothing to verify."""
    for node_id, st in cache.status().items():
        snap = cache.get(node_id)
        if snap is None or not st.connected:
            continue
        secrets: Mapping[str, Any] = snap.items(SECRET)
        if TRUST_BUNDLE not in secrets:
            continue
        if st.acked.get(SECRET) != snap.version(SECRET):
            return False
        held = str(secrets[TRUST_BUNDLE].get("validation_context", {}).get("trusted_ca", {}).get("inline_string", ""))
        if not all(root.strip() in held for root in bundle):
            return False
    return True
