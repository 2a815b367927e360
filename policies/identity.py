"""Who each proxy is: SPIFFE ids from intent, and the issued certificate render takes as input.

Issuance (keys, clock) happens at the edge; render only sees `IssuedCert` values, so it stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.intent import Intent
from mesh.topology import Gateway, Sidecar

GATEWAY_NAMESPACE = "lockgate-system"
GATEWAY_SERVICE_ACCOUNT = "ingress-gateway"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def identity_of(intent: Intent, proxy: Sidecar | Gateway) -> str:
    """The SPIFFE id a proxy presents: its Workload's serviceAccount (default: the service name);
    every ingress gateway shares one identity in the lockgate-system namespace."""
    td = intent.mesh.spec.trust_domain
    if isinstance(proxy, Gateway):
        return spiffe_id(td, GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
    if proxy.service_account is not None:  # the runtime knows (a pod's service account): it is who this is
        return spiffe_id(td, proxy.namespace, proxy.service_account)
    w = intent.workloads.get((proxy.namespace, proxy.workload))
    sa = (w.spec.service_account if w else None) or proxy.service
    return spiffe_id(td, proxy.namespace, sa)


def service_identities(intent: Intent, namespace: str, service: str, version: str | None = None) -> list[str]:
    """The SPIFFE ids a caller accepts from instances of a service (or of one version): one per
    service account its Workloads use, the service name when no Workload says otherwise."""
    td = intent.mesh.spec.trust_domain
    sas = {
        w.spec.service_account or service
        for (ns, _), w in intent.workloads.items()
        if ns == namespace and w.spec.service == service and (version is None or w.spec.version == version)
    }
    return [spiffe_id(td, namespace, sa) for sa in sorted(sas or {service})]


@dataclass(frozen=True)
class IssuedCert:
    """A workload certificate as render needs it. Never logged, never written to disk."""

    spiffe_id: str
    cert_chain_pem: str
    """Leaf then intermediate."""
    private_key_pem: str = field(repr=False)
    not_before: float = 0.0
    """Unix time."""
    not_after: float = 0.0
    serial: str = ""
    """Hex, as Envoy's admin /certs shows it."""
    issuer_chain: tuple[str, ...] = ()
    """Subjects from the issuing intermediate up to the root."""
