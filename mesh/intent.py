"""The intent API, lockgate.io/v1alpha1: what teams commit to Git.

Every model is frozen and forbids unknown fields, so a typo is an error with a line number rather than
a silently ignored setting. Field names are camelCase on the wire (YAML, Kubernetes CRDs) and
snake_case in Python.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_VERSION = "lockgate.io/v1alpha1"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_duration_ms(text: str) -> int:
    """`250ms`, `2s`, `1.5s`, `1m`, `1h` -> milliseconds. Raises ValueError with the accepted forms."""
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, e.g. 250ms, 2s, 1m, 1h")
    return round(float(m.group(1)) * _UNIT_MS[m.group(2)])


def _check_duration(text: str) -> str:
    parse_duration_ms(text)
    return text


Duration = Annotated[str, AfterValidator(_check_duration)]
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


class Model(BaseModel):
    """Base for every intent model: frozen, no unknown fields, camelCase aliases."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )


class Metadata(Model):
    name: Name
    namespace: Name = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# --- Mesh -------------------------------------------------------------------------------------------


class MeshCluster(Model):
    name: Name
    network: str | None = None
    """Network name; clusters on different networks reach each other through east-west gateways."""
    locality: str | None = None
    """region/zone/subzone, for locality-aware routing."""


class MeshMTLS(Model):
    mode: Literal["STRICT", "PERMISSIVE"] = "PERMISSIVE"
    """Mesh-wide default for what sidecars accept; sidecars always originate mTLS to each other."""


class MeshSpec(Model):
    trust_domain: str = Field(pattern=r"^[a-z0-9.-]+$")
    """SPIFFE trust domain shared by every cluster (spiffe://<trustDomain>/ns/..)."""
    clusters: list[MeshCluster] = Field(min_length=1)
    mtls: MeshMTLS = Field(default_factory=MeshMTLS)


# --- Service ----------------------------------------------------------------------------------------


class ServicePort(Model):
    name: Name
    port: int = Field(ge=1, le=65535)
    protocol: Literal["HTTP"] = "HTTP"


class ServiceSpec(Model):
    ports: list[ServicePort] = Field(min_length=1)
    versions: list[Name] = Field(min_length=1)


# --- Workload ---------------------------------------------------------------------------------------


class WorkloadSpec(Model):
    service: Name
    version: Name
    replicas: int = Field(default=1, ge=0, le=64)
    clusters: list[Name] = Field(min_length=1)
    """Names of Mesh clusters this workload runs in."""
    command: list[str] = Field(min_length=1)
    """argv of one instance; the local runtime passes HOST and PORT to listen on."""
    env: dict[str, str] = Field(default_factory=dict)
    service_account: Name | None = None
    """Identity in the SPIFFE id (spiffe://<td>/ns/<ns>/sa/<serviceAccount>); defaults to the service name."""


# --- Route ------------------------------------------------------------------------------------------


class StringMatch(Model):
    """Exactly one of exact, prefix, regex (RE2 syntax, as Envoy evaluates it)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of exact, prefix, regex (got {', '.join(given) or 'none'})")
        return self


class HTTPMatch(Model):
    """All conditions of one match must hold."""

    uri: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    method: Literal["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"] | None = (
        None
    )


class Destination(Model):
    version: Name
    weight: int = Field(default=100, ge=0, le=100)


class Retries(Model):
    attempts: int = Field(ge=0, le=10)
    per_try_timeout: Duration | None = None
    retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,5xx"


class HTTPRule(Model):
    name: Name | None = None
    match: list[HTTPMatch] = Field(default_factory=list)
    """Any match selects the rule; no match list means every request."""
    route: list[Destination] = Field(default_factory=list)
    """Weighted destinations; may be left out only in the default rule of a service a Rollout governs."""
    timeout: Duration | None = None
    retries: Retries | None = None


class RouteSpec(Model):
    service: Name
    hosts: list[str] = Field(default_factory=list)
    """Host names exposed at each cluster's ingress gateway."""
    http: list[HTTPRule] = Field(min_length=1)
    """Rules in order: the first rule whose match holds wins."""


# --- Envelopes --------------------------------------------------------------------------------------


class ResourceBase(Model):
    """The envelope every kind shares; kinds of higher layers (policies, rollouts) subclass it too."""

    api_version: Literal["lockgate.io/v1alpha1"]
    metadata: Metadata

    def governs(self) -> tuple[str, str] | None:
        """(namespace, service) whose default-rule weights this resource owns (a Rollout does)."""
        return None

    @property
    def key(self) -> tuple[str, str, str]:
        kind: str = getattr(self, "kind")  # noqa: B009 - defined by each subclass
        return (kind, self.metadata.namespace, self.metadata.name)


class Mesh(ResourceBase):
    kind: Literal["Mesh"]
    spec: MeshSpec


class Service(ResourceBase):
    kind: Literal["Service"]
    spec: ServiceSpec


class Workload(ResourceBase):
    kind: Literal["Workload"]
    spec: WorkloadSpec


class Route(ResourceBase):
    kind: Literal["Route"]
    spec: RouteSpec


Resource = Mesh | Service | Workload | Route
KINDS: dict[str, type[ResourceBase]] = {
    "Mesh": Mesh,
    "Service": Service,
    "Workload": Workload,
    "Route": Route,
}


R = TypeVar("R", bound=ResourceBase)


class Intent(BaseModel):
    """Every valid resource of one revision, indexed for render. Built only after validation passed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mesh: Mesh
    services: dict[tuple[str, str], Service]
    """(namespace, name) -> Service"""
    workloads: dict[tuple[str, str], Workload]
    routes: dict[tuple[str, str], Route]
    """(namespace, service) -> the one Route governing that service."""
    resources: tuple[Any, ...] = ()
    """Every valid resource of the revision, including kinds of higher layers, in file order."""

    def of_kind(self, cls: type[R]) -> list[R]:
        """All resources of one kind (e.g. a policy kind this package does not know)."""
        return [r for r in self.resources if isinstance(r, cls)]

    @staticmethod
    def from_resources(resources: list[Any]) -> Intent:
        mesh = next(r for r in resources if isinstance(r, Mesh))
        return Intent(
            resources=tuple(resources),
            mesh=mesh,
            services={(r.metadata.namespace, r.metadata.name): r for r in resources if isinstance(r, Service)},
            workloads={
                (r.metadata.namespace, r.metadata.name): r for r in resources if isinstance(r, Workload)
            },
            routes={(r.metadata.namespace, r.spec.service): r for r in resources if isinstance(r, Route)},
        )
