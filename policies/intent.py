"""The security kinds of lockgate.io/v1alpha1: who may call whom, how peers authenticate, how fast.

Shapes follow Istio (PeerAuthentication, AuthorizationPolicy) so people who know Istio can read them;
RateLimit is lockgate's own: a token bucket per sidecar. Like every intent model they are frozen and
forbid unknown fields, with camelCase names on the wire.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mesh.intent import Model, Name, ResourceBase

Mode = Literal["STRICT", "PERMISSIVE"]
Method = str
"""Upper-case HTTP method (GET, POST, ...); checked by the validator so the error names the field."""


class ServiceSelector(Model):
    service: Name
    """A Service in the resource's namespace."""


# --- PeerAuthentication -------------------------------------------------------------------------------


class PeerMTLS(Model):
    mode: Mode
    """STRICT: the inbound side accepts only mTLS; PERMISSIVE: mTLS and plaintext."""


class PeerAuthenticationSpec(Model):
    selector: ServiceSelector | None = None
    """Without a selector the resource sets the mode of every service in its namespace."""
    mtls: PeerMTLS


class PeerAuthentication(ResourceBase):
    kind: Literal["PeerAuthentication"]
    spec: PeerAuthenticationSpec


# --- AuthorizationPolicy ------------------------------------------------------------------------------


class Source(Model):
    """All given fields must hold; within a field any value may match (Istio semantics)."""

    principals: list[str] = Field(default_factory=list)
    """`<trustDomain>/ns/<ns>/sa/<sa>`; `*` alone, or as a prefix or suffix wildcard."""
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces of the peer's identity; `*` as a prefix or suffix wildcard."""


class Operation(Model):
    """All given fields must hold; within a field any value may match."""

    methods: list[Method] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    """`/exact`, `/prefix/*`, `*suffix` or `*` (the query string is not part of the path)."""
    ports: list[int] = Field(default_factory=list)
    """Ports of the selected Service."""


class Rule(Model):
    """Matches when one of `from` and one of `to` match; a missing list matches everything."""

    from_: list[Source] = Field(default_factory=list, alias="from")
    to: list[Operation] = Field(default_factory=list)


class AuthorizationPolicySpec(Model):
    selector: ServiceSelector | None = None
    """Without a selector the policy applies to every service in its namespace."""
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: list[Rule] = Field(default_factory=list)
    """DENY policies are evaluated first; if a service has ALLOW policies, a request must match one.
    An ALLOW policy without rules matches nothing (it denies every request)."""


class AuthorizationPolicy(ResourceBase):
    kind: Literal["AuthorizationPolicy"]
    spec: AuthorizationPolicySpec


# --- RateLimit ----------------------------------------------------------------------------------------


class RateLimitSpec(Model):
    service: Name
    rule: Name | None = None
    """Name of a rule of the service's Route: limit only that rule (at the callers, where routes live)."""
    requests_per_unit: int = Field(ge=1, le=1_000_000_000)
    unit: Literal["second", "minute", "hour"]
    burst: int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Bucket size: how many requests may arrive at once; defaults to requestsPerUnit."""


class RateLimit(ResourceBase):
    kind: Literal["RateLimit"]
    spec: RateLimitSpec


KINDS: dict[str, type[ResourceBase]] = {
    "PeerAuthentication": PeerAuthentication,
    "AuthorizationPolicy": AuthorizationPolicy,
    "RateLimit": RateLimit,
}
