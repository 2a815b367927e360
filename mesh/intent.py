"""The intent API, lockgate.io/v1alpha1: what teams commit to Git.

Every model is frozen and forbids unknown fields, so a typo is an error with a line number rather than
a silently ignored setting. Field names are camelCase on the wire (YAML, Kubernetes CRDs) and
snake_case in Python.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
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


MAX_DURATION_MS = 86_400_000
"""A day: longer is a typo (`2h` for `2s`) rather than an intent, and nothing here needs it."""


def _check_duration(text: str) -> str:
    if parse_duration_ms(text) > MAX_DURATION_MS:
        raise ValueError(f"duration {text!r} is out of range: at most 24h")
    return text


def _check_positive(text: str) -> str:
    if parse_duration_ms(text) < 1:
        raise ValueError(f"duration {text!r} is out of range: at least 1ms (Envoy rejects zero here)")
    return text


Duration = Annotated[str, AfterValidator(_check_duration)]
"""0 to 24h."""
PositiveDuration = Annotated[str, AfterValidator(_check_duration), AfterValidator(_check_positive)]
"""1ms to 24h."""
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


INTENT_SUFFIXES = (".yaml", ".yml")


def is_intent_file(path: str) -> bool:
    """Whether a repository path (`/`-separated) holds intent: *.yaml / *.yml, nothing hidden on the way.

    The one definition, so the loader and the rollout write-back never disagree about which files count
    (a `.github/ci.yaml` is not intent)."""
    return path.endswith(INTENT_SUFFIXES) and not any(part.startswith(".") for part in path.split("/"))


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
    locality: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,2}$")
    """`region/zone/subzone` (zone and subzone optional): when a service fails over to other clusters,
    nearer ones are tried first (same zone, then same region, then the rest)."""


class MeshMTLS(Model):
    mode: Literal["STRICT", "PERMISSIVE"] = "PERMISSIVE"
    """Mesh-wide default for what sidecars accept; sidecars always originate mTLS to each other."""


class NotificationSpec(Model):
    """Where every decision of a rollout is sent: a generic JSON webhook or a Slack-compatible one.

    Defined here, not in rollouts, because the Mesh has sinks too (for every rollout of the mesh) and
    mesh imports nothing of ours; rollouts.intent re-exports it."""

    name: Name
    type: Literal["webhook", "slack"] = "webhook"
    url: str
    timeout: Duration = "2s"
    """Per delivery; a sink slower than this (or down) counts a failure and never holds the rollout."""

    @property
    def timeout_s(self) -> float:
        return parse_duration_ms(self.timeout) / 1000.0


class OutboundTrafficPolicy(Model):
    mode: Literal["REGISTRY_ONLY", "ALLOW_ANY"] = "REGISTRY_ONLY"
    """What a sidecar does with a host nobody declared (neither a Service nor an ExternalService):
    REGISTRY_ONLY refuses it (502, the body naming this policy); ALLOW_ANY forwards it, resolving the host
    by DNS. Istio's default is ALLOW_ANY; lockgate's stays REGISTRY_ONLY, what it always did (secure by
    default, and existing meshes keep their behaviour)."""


class MeshSpec(Model):
    trust_domain: str = Field(pattern=r"^[a-z0-9.-]+$")
    """SPIFFE trust domain shared by every cluster (spiffe://<trustDomain>/ns/..)."""
    clusters: list[MeshCluster] = Field(min_length=1)
    mtls: MeshMTLS = Field(default_factory=MeshMTLS)
    notifications: list[NotificationSpec] = Field(default_factory=list)
    """Sinks that get the decisions of every Rollout in the mesh (besides each Rollout's own)."""
    outbound_traffic_policy: OutboundTrafficPolicy = Field(default_factory=OutboundTrafficPolicy)


# --- Service ----------------------------------------------------------------------------------------


Protocol = Literal["HTTP", "HTTP2", "GRPC", "TCP", "TLS"]
PROTOCOLS: tuple[Protocol, ...] = ("HTTP", "HTTP2", "GRPC", "TCP", "TLS")
APP_PROTOCOLS: dict[str, Protocol] = {"http": "HTTP", "http2": "HTTP2", "h2c": "HTTP2", "h2": "HTTP2",
                                      "grpc": "GRPC", "grpc-web": "HTTP", "tcp": "TCP", "tls": "TLS",
                                      "https": "TLS", "mongo": "TCP", "mysql": "TCP", "redis": "TCP"}
"""Istio's names for a port's protocol (in `appProtocol`, or as a port name's prefix before `-`)."""
H2_PROTOCOLS = frozenset({"HTTP2", "GRPC"})
"""Protocols spoken as HTTP/2 to the app."""
L4_PROTOCOLS = frozenset({"TCP", "TLS"})
"""Protocols the proxies carry as opaque connections (no HTTP routing)."""


class ServicePort(Model):
    name: Name
    port: int = Field(ge=1, le=65535)
    protocol: str | None = None
    """HTTP, HTTP2, GRPC, TCP or TLS. Left out: `appProtocol`, else the name as Istio reads it (`grpc`,
    `grpc-api`, `http2`, `h2`, `tcp-db`, `tls`..), else HTTP."""
    app_protocol: str | None = None
    """Kubernetes' appProtocol (`http`, `http2`, `h2c`, `grpc`, `tcp`, `tls`, `https`)."""

    @property
    def effective_protocol(self) -> Protocol:
        """What the proxies speak on this port: `protocol`, else `appProtocol`, else the name, else HTTP.
        Values validation rejects (unknown words) read as HTTP here; validation reports them."""
        if self.protocol is not None:
            upper = self.protocol.upper()
            return next((p for p in PROTOCOLS if p == upper), "HTTP")
        if self.app_protocol is not None:
            return APP_PROTOCOLS.get(self.app_protocol.lower(), "HTTP")
        name = self.name.lower()
        if name == "grpc-web" or name.startswith("grpc-web-"):
            return "HTTP"
        return APP_PROTOCOLS.get(name.split("-", 1)[0], "HTTP")


class ServiceSpec(Model):
    ports: list[ServicePort] = Field(min_length=1)
    versions: list[Name] = Field(min_length=1)

    @property
    def protocol(self) -> Protocol:
        """The service's protocol: its first port's (validation requires every port to agree, since a
        sidecar forwards to one app port)."""
        return self.ports[0].effective_protocol


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
    egress: list[str] | None = None
    """Services and ExternalServices this workload calls (`name` in its namespace, or `name.ns`); its sidecar
    gets only their routes and clusters. Absent: every one."""


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


class PresenceMatch(Model):
    """A header or query parameter condition: a StringMatch, or `present: true` (any value, even empty)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one_of(self) -> PresenceMatch:
        given = [k for k in ("exact", "prefix", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of exact, prefix, regex, present (got {', '.join(given) or 'none'})")
        if self.present is False:
            raise ValueError("present: false is not supported; write `present: true`, or leave the condition out")
        return self


Method = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"]


class HTTPMatch(Model):
    """All conditions of one match must hold."""

    uri: StringMatch | None = None
    headers: dict[str, PresenceMatch] = Field(default_factory=dict)
    """Header name -> condition; names are case-insensitive."""
    query_params: dict[str, PresenceMatch] = Field(default_factory=dict)
    """Query parameter name -> condition (on the decoded value)."""
    method: Method | None = None


def _unwrap(key: str) -> Callable[[Any], Any]:
    """Accept Istio's wrapped form too (`percentage: {value: 10}`, `body: {string: ..}`)."""

    def unwrap(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {key}:
            return value[key]
        return value

    return unwrap


def _check_percentage(value: float) -> float:
    if not 0.0 <= value <= 100.0:  # also rejects NaN
        raise ValueError(f"percentage must be between 0 and 100, got {value:g}")
    return value


Percentage = Annotated[float, BeforeValidator(_unwrap("value")), AfterValidator(_check_percentage)]
"""0-100, as a number or Istio's `{value: N}`; fractions are kept to 1/10000 of a percent."""


class HeaderOperations(Model):
    set: dict[str, str] = Field(default_factory=dict)
    """Overwrite (or add) these headers."""
    add: dict[str, str] = Field(default_factory=dict)
    """Append a value, keeping any existing one."""
    remove: list[str] = Field(default_factory=list)


class Headers(Model):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class Destination(Model):
    version: Name
    weight: int = Field(default=100, ge=0, le=100)
    headers: Headers | None = None
    """Header edits for the requests sent to this destination and its responses only (Istio's
    HTTPRouteDestination.headers), applied before the rule's own `headers`."""


class RetryBackoff(Model):
    base_interval: PositiveDuration
    """First retry waits a random time up to this, doubling per retry (Envoy's exponential backoff)."""
    max_interval: PositiveDuration | None = None
    """Cap on the wait; at least baseInterval (Envoy's default: 10 x baseInterval)."""


class Retries(Model):
    attempts: int = Field(ge=0, le=10)
    """Retries after the first try (Envoy's num_retries); 0 turns retries off, the mesh's default too."""
    per_try_timeout: Duration | None = None
    retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,5xx"
    """Comma-separated Envoy retry conditions; a bare status code (`503`) retries on that status."""
    backoff: RetryBackoff | None = None


class FaultDelay(Model):
    percentage: Percentage
    """Required: Istio reads a missing percentage as 0 (never), which is rarely what was meant."""
    fixed_delay: PositiveDuration


GRPC_STATUS: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16}
"""gRPC status names -> codes (what Envoy's fault filter sends in grpc-status)."""


def _grpc_status(value: Any) -> Any:
    """`UNAVAILABLE` (Istio's form) or the code (14) -> the code; anything else is left to be refused."""
    if isinstance(value, str):
        if value.upper() in GRPC_STATUS:
            return GRPC_STATUS[value.upper()]
        close = difflib.get_close_matches(value.upper(), GRPC_STATUS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"unknown gRPC status {value!r}{hint}")
    return value


class FaultAbort(Model):
    percentage: Percentage
    http_status: int | None = Field(default=None, ge=200, le=599)
    grpc_status: Annotated[int | None, BeforeValidator(_grpc_status), Field(ge=1, le=16)] = None
    """A gRPC status name (`UNAVAILABLE`) or code (14), for gRPC callers: instead of httpStatus."""

    @model_validator(mode="after")
    def _one_of(self) -> FaultAbort:
        if (self.http_status is None) == (self.grpc_status is None):
            raise ValueError("give exactly one of httpStatus, grpcStatus")
        return self


class Fault(Model):
    """Injected by the proxy that routes the request, before it reaches any destination."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _some(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("give delay, abort or both")
        return self


class Mirror(Model):
    """Copies of the requests go to this version too; its answers are dropped."""

    version: Name
    percentage: Percentage = 100.0


class Rewrite(Model):
    uri: str | None = None
    """Replaces the matched path prefix (the whole path for exact and regex matches)."""
    authority: str | None = None
    """Replaces the Host header."""

    @model_validator(mode="after")
    def _some(self) -> Rewrite:
        if self.uri is None and self.authority is None:
            raise ValueError("give uri, authority or both")
        return self


REDIRECT_CODES = {301: "MOVED_PERMANENTLY", 302: "FOUND", 303: "SEE_OTHER", 307: "TEMPORARY_REDIRECT",
                  308: "PERMANENT_REDIRECT"}


class Redirect(Model):
    uri: str | None = None
    """Replaces the path (the query is kept unless this one has its own)."""
    authority: str | None = None
    redirect_code: int = Field(default=301, validation_alias=AliasChoices("redirectCode", "responseCode"))
    """Istio's name; `responseCode` is accepted too."""

    @field_validator("redirect_code")
    @classmethod
    def _code(cls, code: int) -> int:
        if code not in REDIRECT_CODES:
            raise ValueError(f"must be one of {', '.join(map(str, REDIRECT_CODES))}, got {code}")
        return code

    @model_validator(mode="after")
    def _some(self) -> Redirect:
        if self.uri is None and self.authority is None:
            raise ValueError("give uri, authority or both")
        return self


class DirectResponse(Model):
    status: int = Field(ge=200, le=599)
    body: Annotated[str | None, BeforeValidator(_unwrap("string"))] = None
    """Inline text, or Istio's `{string: ..}`."""


class HTTPRule(Model):
    name: Name | None = None
    match: list[HTTPMatch] = Field(default_factory=list)
    """Any match selects the rule; no match list means every request."""
    route: list[Destination] = Field(default_factory=list)
    """Weighted destinations; may be left out only in the default rule of a service a Rollout governs."""
    redirect: Redirect | None = None
    """Answer with a redirect instead of routing (instead of `route`)."""
    direct_response: DirectResponse | None = None
    """Answer directly instead of routing (instead of `route`)."""
    timeout: Duration | None = None
    """Whole request, retries included; 0s disables, and so does leaving it out (as in Istio)."""
    retries: Retries | None = None
    """Replaces the mesh's default (2 retries on connect-failure, refused-stream, unavailable, cancelled
    and 503, each to an instance not tried yet); `attempts: 0` leaves the rule without any."""
    fault: Fault | None = None
    mirror: Mirror | None = None
    rewrite: Rewrite | None = None
    headers: Headers | None = None


class RouteSpec(Model):
    service: Name
    hosts: list[str] = Field(default_factory=list)
    """Host names exposed at each cluster's ingress gateway."""
    http: list[HTTPRule] = Field(min_length=1)
    """Rules in order: the first rule whose match holds wins."""


# --- TrafficPolicy ----------------------------------------------------------------------------------


class HTTPCookie(Model):
    name: str = Field(min_length=1)
    ttl: Duration | None = None
    """When set, the proxy sets the cookie if the request lacks it (0s: a session cookie)."""
    path: str | None = None


class ConsistentHash(Model):
    """Exactly one hash key; requests with the same key go to the same instance (ring hash)."""

    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    http_query_parameter_name: str | None = None
    use_source_ip: bool | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ConsistentHash:
        keys = ("http_header_name", "http_cookie", "http_query_parameter_name", "use_source_ip")
        given = [to_camel(k) for k in keys if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of httpHeaderName, httpCookie, httpQueryParameterName, "
                             f"useSourceIp (got {', '.join(given) or 'none'})")
        return self


class LocalityDistribute(Model):
    """Where the callers in `from` send their requests: a share per locality (Istio's Distribute)."""

    from_: str = Field(alias="from", min_length=1)
    """The callers this rule is for: a locality (`region/zone/subzone`, `*` as the last part matches
    anything there) or a cluster of the Mesh."""
    to: dict[str, Annotated[int, Field(ge=0, le=100)]] = Field(min_length=1)
    """Locality (or cluster) -> percentage of the requests, summing to 100. Instances in no listed
    locality get none; a pattern matching several localities splits its share by their instances."""


class LocalityFailover(Model):
    """Where callers in `from` go when their own region has no healthy instance (Istio's Failover)."""

    from_: str = Field(alias="from", min_length=1)
    """A region, or a cluster of the Mesh."""
    to: str = Field(min_length=1)
    """A region, or a cluster of the Mesh: tried before every other region. Several rules with the
    same `from` are tried in order."""


FAILOVER_LABELS = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone",
                   "topology.istio.io/cluster")
"""The labels `failoverPriority` may name: the parts of a cluster's locality, and the cluster itself."""


class LocalityLbSetting(Model):
    """Locality-aware load balancing across the Mesh's clusters (Istio's LocalityLoadBalancerSetting).

    Without it, a cluster's own instances come first and other clusters follow by distance (same zone,
    same region, anywhere), each only while the nearer ones have no healthy instance."""

    enabled: bool | None = None
    """false: no locality preference at all, every instance of every cluster shares the load."""
    distribute: list[LocalityDistribute] = Field(default_factory=list)
    """Weighted shares per locality instead of failover by priority (not both)."""
    failover: list[LocalityFailover] = Field(default_factory=list)
    """Which region (or cluster) comes next when the nearer ones fail; needs outlierDetection to react
    to instances that answer errors (without it, only instances that go away move traffic)."""
    failover_priority: list[str] = Field(default_factory=list)
    """Labels in order of importance: clusters matching the caller on more of them come first
    (one of: topology.kubernetes.io/region, topology.kubernetes.io/zone, topology.istio.io/subzone,
    topology.istio.io/cluster)."""


class LoadBalancer(Model):
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] | None = None
    consistent_hash: ConsistentHash | None = None
    locality_lb_setting: LocalityLbSetting | None = None

    @model_validator(mode="after")
    def _one_of(self) -> LoadBalancer:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("give exactly one of simple, consistentHash (not both)")
        if self.simple is None and self.consistent_hash is None and self.locality_lb_setting is None:
            raise ValueError("give simple, consistentHash or localityLbSetting")
        return self


class TCPSettings(Model):
    max_connections: int | None = Field(default=None, ge=1)
    connect_timeout: PositiveDuration | None = None


class HTTPSettings(Model):
    http1_max_pending_requests: int | None = Field(default=None, ge=1)
    """Requests waiting for a connection; beyond it the proxy answers 503 (x-envoy-overloaded)."""
    http2_max_requests: int | None = Field(default=None, ge=1)
    """Requests in flight to the destination (any protocol)."""
    max_requests_per_connection: int | None = Field(default=None, ge=1)
    max_retries: int | None = Field(default=None, ge=0)
    """Retries in flight to the destination at once."""


class ConnectionPool(Model):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(Model):
    consecutive_5xx_errors: int | None = Field(default=None, ge=0, alias="consecutive5xxErrors")
    """Eject an instance after this many 5xx answers in a row (0 disables)."""
    interval: PositiveDuration | None = None
    """Time between ejection sweeps."""
    base_ejection_time: PositiveDuration | None = None
    """An ejection lasts this times the number of times the instance was ejected."""
    max_ejection_percent: int | None = Field(default=None, ge=0, le=100)


class PolicySettings(Model):
    """What a DestinationRule's trafficPolicy holds; a version's settings replace the service's per field."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None


class VersionPolicy(PolicySettings):
    version: Name


class TrafficPolicySpec(PolicySettings):
    service: Name
    versions: list[VersionPolicy] = Field(default_factory=list)

    def settings(self, version: str | None) -> PolicySettings:
        """The service's settings with one version's overrides (each of the three fields replaced whole)."""
        base = PolicySettings(load_balancer=self.load_balancer, connection_pool=self.connection_pool,
                              outlier_detection=self.outlier_detection)
        over = next((v for v in self.versions if v.version == version), None)
        if over is None:
            return base
        changes = {k: getattr(over, k) for k in PolicySettings.model_fields if getattr(over, k) is not None}
        return base.model_copy(update=changes)


# --- ExternalService --------------------------------------------------------------------------------


EXTERNAL_PROTOCOLS = ("HTTP", "HTTPS", "TLS", "TCP")
"""How an external port is spoken: HTTP (routed by Host), HTTPS (HTTP inside TLS), TLS or TCP (opaque)."""
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
"""Where the proxies' host keeps its trusted roots (Debian's bundle): the default for TLS origination."""


class ExternalPort(Model):
    name: Name
    number: int = Field(ge=1, le=65535)
    """The port the app asks for (`http://host:number/`, `CONNECT host:number`) and, unless an endpoint says
    otherwise, the port connected to."""
    protocol: str = "HTTP"
    """HTTP, HTTPS, TLS or TCP."""


class ExternalEndpoint(Model):
    address: str = Field(min_length=1)
    """An IP address or a DNS name (resolved by the proxy)."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """Where to connect instead of the port's number (a test server on 127.0.0.1:PORT, say)."""


class ExternalTLS(Model):
    mode: Literal["originate", "passthrough"]
    """originate: the app speaks plain HTTP to its sidecar, which speaks TLS to the service (HTTP and
    HTTPS ports). passthrough: the app's own TLS goes through untouched, tunnelled by `CONNECT host:port`
    (HTTPS and TLS ports; what the app does without `tls` on such ports too)."""
    sni: str | None = None
    """originate: the server name sent (default: the host asked for)."""
    ca_certificates: str | None = None
    """originate: PEM roots the server's certificate must chain to (default: the system bundle)."""
    subject_alt_names: list[str] = Field(default_factory=list)
    """originate: DNS names the server's certificate must hold one of (default: the host asked for)."""


class ExternalServiceSpec(Model):
    """A service outside the mesh the workloads may call (Istio's ServiceEntry)."""

    hosts: list[str] = Field(min_length=1)
    """DNS names the apps use for it (no wildcards); unique across ExternalServices and mesh Services."""
    ports: list[ExternalPort] = Field(min_length=1)
    endpoints: list[ExternalEndpoint] = Field(default_factory=list)
    """Where it is; none: the proxy resolves the host by DNS."""
    tls: ExternalTLS | None = None
    timeout: Duration | None = None
    """Whole HTTP request, retries included (HTTP routed ports); left out: none, as for mesh routes."""
    retries: Retries | None = None
    """Replaces the mesh's default retries (HTTP routed ports); `attempts: 0` turns them off."""
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None


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


class TrafficPolicy(ResourceBase):
    kind: Literal["TrafficPolicy"]
    spec: TrafficPolicySpec


class ExternalService(ResourceBase):
    kind: Literal["ExternalService"]
    spec: ExternalServiceSpec


Resource = Mesh | Service | Workload | Route | TrafficPolicy | ExternalService
KINDS: dict[str, type[ResourceBase]] = {
    "Mesh": Mesh,
    "Service": Service,
    "Workload": Workload,
    "Route": Route,
    "TrafficPolicy": TrafficPolicy,
    "ExternalService": ExternalService,
}


R = TypeVar("R", bound=ResourceBase)


_KINDS: dict[int, tuple[tuple[Any, ...], dict[type, tuple[Any, ...]]]] = {}
"""Intent.of_kind's memo: id of a resources tuple -> (the tuple, kind -> its resources)."""


class Intent(BaseModel):
    """Every valid resource of one revision, indexed for render. Built only after validation passed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mesh: Mesh
    services: dict[tuple[str, str], Service]
    """(namespace, name) -> Service"""
    workloads: dict[tuple[str, str], Workload]
    routes: dict[tuple[str, str], Route]
    """(namespace, service) -> the one Route governing that service."""
    traffic_policies: dict[tuple[str, str], TrafficPolicy] = Field(default_factory=dict)
    """(namespace, service) -> the one TrafficPolicy of that service."""
    resources: tuple[Any, ...] = ()
    """Every valid resource of the revision, including kinds of higher layers, in file order."""

    def of_kind(self, cls: type[R]) -> list[R]:
        """All resources of one kind (e.g. a policy kind this package does not know). Memoised on the
        `resources` tuple (immutable, and shared by the copies the rollout overlay makes): render asks
        per sidecar, and scanning 2000 resources each time was ~5 ms of every 1000-service render."""
        entry = _KINDS.get(id(self.resources))
        if entry is None or entry[0] is not self.resources:
            if len(_KINDS) >= 16:
                _KINDS.clear()
            entry = _KINDS[id(self.resources)] = (self.resources, {})
        found = entry[1].get(cls)
        if found is None:
            found = entry[1][cls] = tuple(r for r in self.resources if isinstance(r, cls))
        return list(found)

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
            traffic_policies={
                (r.metadata.namespace, r.spec.service): r for r in resources if isinstance(r, TrafficPolicy)
            },
        )
