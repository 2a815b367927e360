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


def every_service_identity(intent: Intent) -> dict[tuple[str, str, str | None], list[str]]:
    """`service_identities` of every service and each of its versions (version None: any), from one pass
    over the Workloads: asking per service and version scanned every Workload each time, quadratic in
    the mesh (1000 services of 2 versions and 2000 Workloads: 6 million looks per render)."""
    td = intent.mesh.spec.trust_domain
    accounts: dict[tuple[str, str, str | None], set[str]] = {}
    for (ns, _), w in intent.workloads.items():
        sa = w.spec.service_account or w.spec.service
        accounts.setdefault((ns, w.spec.service, None), set()).add(sa)
        accounts.setdefault((ns, w.spec.service, w.spec.version), set()).add(sa)
    out: dict[tuple[str, str, str | None], list[str]] = {}
    for (ns, svc), service in intent.services.items():
        for version in (None, *service.spec.versions):
            names = accounts.get((ns, svc, version)) or {svc}
            out[(ns, svc, version)] = [spiffe_id(td, ns, sa) for sa in sorted(names)]
    return out


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
