"""Each cluster's control plane signs its proxies' workload certificates and re-issues them at half-life.

This is the edge where keys are made and the clock is read; what it hands render is plain data
(`IssuedCert` per node id and the trust bundle). Keys live in memory only: a restarted control plane
issues fresh certificates, which is cheaper than keeping workload keys on disk.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from mesh.intent import Intent
from mesh.render import Proxy
from mesh.topology import ClusterTopology
from multicluster.ca import CA, fingerprint, issue, subject, trust_bundle
from policies.identity import IssuedCert, identity_of


@dataclass(frozen=True)
class _Held:
    cluster: str
    cert: IssuedCert
    issued_at: float
    rotations: int = 0

    @property
    def rotate_at(self) -> float:
        """Half-way through the certificate's life: time enough to deliver the next one, twice over."""
        return self.issued_at + (self.cert.not_after - self.issued_at) / 2


class WorkloadIssuer:
    """Workload certificates of every proxy, per cluster, signed with that cluster's intermediate."""

    def __init__(self, *, ttl: float) -> None:
        if ttl < 2:
            raise ValueError(f"certificate TTL must be at least 2s, got {ttl:g}s")
        self.ttl = ttl
        self._authorities: dict[str, CA] = {}
        self._held: dict[str, _Held] = {}

    def add_authority(self, cluster: str, ca: CA) -> None:
        self._authorities[cluster] = ca

    @property
    def trust_bundle(self) -> list[str]:
        """Every root any cluster trusts (PEM), so calls between clusters verify too."""
        return trust_bundle(self._authorities[c] for c in sorted(self._authorities))

    def certs_for(self, intent: Intent, topology: ClusterTopology, *, now: float) -> dict[str, IssuedCert]:
        """A valid certificate for every proxy of the cluster: kept if its identity is right and it is not
        yet due, else issued anew. Proxies gone from the topology are forgotten."""
        ca = self._authorities[topology.cluster]
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
                held = self._held[proxy.node_id] = _Held(topology.cluster, cert, now, rotations)
            out[proxy.node_id] = held.cert
        for node_id in [n for n, h in self._held.items() if h.cluster == topology.cluster and n not in out]:
            del self._held[node_id]
        return out

    def next_rotation(self) -> float | None:
        """When the earliest certificate is due (Unix time), or None with nothing issued."""
        return min((h.rotate_at for h in self._held.values()), default=None)

    def describe(self) -> dict[str, Any]:
        """For the status file: identities, chains, validity and rotation times. Never a key."""
        roots = []
        for ca in self._authorities.values():
            for root in ca.roots:
                entry = {"subject": subject(root), "sha256": fingerprint(root),
                         "notAfter": root.not_valid_after_utc.timestamp()}
                if entry not in roots:
                    roots.append(entry)
        proxies = [{
            "proxy": node_id, "cluster": h.cluster, "spiffeId": h.cert.spiffe_id, "serial": h.cert.serial,
            "issuer": list(h.cert.issuer_chain), "notBefore": h.cert.not_before, "notAfter": h.cert.not_after,
            "issuedAt": h.issued_at, "rotateAt": h.rotate_at, "rotations": h.rotations,
        } for node_id, h in sorted(self._held.items())]
        return {"ttl": self.ttl, "trustBundle": roots, "proxies": proxies}
