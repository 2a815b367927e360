"""Semantic checks across resources: references, weights, conflicts, regexes Envoy would reject.

Pure: takes parsed resources, returns findings that point at a resource and a field path. The caller
(the reconciler's loader) turns each path into `file:line`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import re2
from cryptography import x509
from pydantic.alias_generators import to_camel

from mesh.intent import (
    APP_PROTOCOLS,
    DNS_LABEL,
    EXTERNAL_PROTOCOLS,
    FAILOVER_LABELS,
    L4_PROTOCOLS,
    PROTOCOLS,
    ExternalService,
    HeaderOperations,
    HTTPRule,
    LocalityLbSetting,
    Mesh,
    MeshCluster,
    PolicySettings,
    PresenceMatch,
    ResourceBase,
    Retries,
    Route,
    Service,
    ServicePort,
    StringMatch,
    TrafficPolicy,
    Workload,
    parse_duration_ms,
)

Loc = tuple[str | int, ...]
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_EGRESS = re.compile(DNS_LABEL[:-1] + r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
RE2_MAX_PROGRAM_SIZE = 100
"""Envoy refuses a regex whose compiled RE2 program is larger (its default error-level threshold)."""
RETRY_ON = ("5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
            "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
            "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
            "unavailable")
"""Envoy's HTTP and gRPC retry conditions; it silently ignores any other word, so a typo never retries."""
_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)(:\d{1,5})?$")


@dataclass(frozen=True)
class Finding:
    index: int
    """Position of the resource in the list given to `validate`."""
    loc: Loc
    """Field path inside the resource, as in the YAML (camelCase names, list indexes)."""
    message: str
    warning: bool = False
    """A warning is reported but does not make the revision invalid."""


def validate(resources: Sequence[ResourceBase]) -> list[Finding]:
    """Every cross-resource problem of the mesh kinds at once, in resource order. Other kinds are
    only checked for duplicate names here; their own layer validates the rest."""
    out: list[Finding] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, r in enumerate(resources):
        if r.key in seen:
            out.append(Finding(i, ("metadata", "name"),
                               f"duplicate {r.key[0]} {r.metadata.namespace}/{r.metadata.name} "
                               f"(first defined as resource #{seen[r.key] + 1}); rename or remove one"))
        else:
            seen[r.key] = i

    meshes = [i for i, r in enumerate(resources) if isinstance(r, Mesh)]
    if not meshes:
        out.append(Finding(-1, (), "no Mesh resource: add one (kind: Mesh) naming the trust domain and clusters"))
    for i in meshes[1:]:
        out.append(Finding(i, ("kind",), "only one Mesh resource is allowed; merge it with the first one"))
    cluster_names: set[str] = set()
    mesh_clusters: list[MeshCluster] = []
    if meshes:
        mesh = resources[meshes[0]]
        assert isinstance(mesh, Mesh)
        mesh_clusters = list(mesh.spec.clusters)
        for j, c in enumerate(mesh.spec.clusters):
            if c.name in cluster_names:
                out.append(Finding(meshes[0], ("spec", "clusters", j, "name"), f"duplicate cluster {c.name!r}"))
            cluster_names.add(c.name)

    services = {(r.metadata.namespace, r.metadata.name): r for r in resources if isinstance(r, Service)}
    externals = {(r.metadata.namespace, r.metadata.name) for r in resources if isinstance(r, ExternalService)}
    governed = {key for r in resources if (key := r.governs()) is not None}
    own = _OwnChecks()
    for i, r in enumerate(resources):
        if isinstance(r, Service):
            out += own.get(i, (r,), lambda at: _check_service(at, r))  # noqa: B023 (called at once)
        elif isinstance(r, Workload):
            out += _check_workload(i, r, services, cluster_names, bool(meshes), externals=externals)
        elif isinstance(r, Route):
            is_governed = (r.metadata.namespace, r.spec.service) in governed
            svc = services.get((r.metadata.namespace, r.spec.service))
            if svc is None:  # the message suggests names from every service: not kept
                out += _check_route(i, r, services, governed=is_governed)
            else:
                out += own.get(i, (r, svc, is_governed),
                               lambda at: _check_route(at, r, services, governed=is_governed))  # noqa: B023
        elif isinstance(r, TrafficPolicy):
            out += _check_traffic_policy(i, r, services, mesh_clusters)
        elif isinstance(r, ExternalService):
            out += _check_external(i, r)
    out += _check_route_conflicts(resources)
    out += _check_policy_conflicts(resources)
    out += _check_external_conflicts(resources)
    own.done()
    return out


class _OwnChecks:
    """The findings of checks that read only the objects they are keyed by (a Service's own, a Route's with
    its Service), kept from the last `validate` while those are the same objects: models are frozen, and the
    loader hands an unchanged document's model back as the same object, so a one-file commit to a mesh of
    1000 services re-checks one Service and one Route instead of all (profiled: validate 68 -> 38 ms of
    that load; the load, unprofiled, 54 -> 39-50 ms).
    Holds what the last call used only, so it is bounded by one revision; a call replaces it whole."""

    last: dict[tuple[int, ...], tuple[tuple[object, ...], int, tuple[Finding, ...]]] = {}

    def __init__(self) -> None:
        self.now: dict[tuple[int, ...], tuple[tuple[object, ...], int, tuple[Finding, ...]]] = {}

    def done(self) -> None:
        _OwnChecks.last = self.now

    def get(self, i: int, key: tuple[object, ...], check: Callable[[int], list[Finding]]) -> list[Finding]:
        ids = tuple(map(id, key))
        hit = _OwnChecks.last.get(ids) or self.now.get(ids)
        if hit is not None and all(a is b for a, b in zip(hit[0], key, strict=True)):
            at, found = hit[1], hit[2]
            self.now[ids] = hit
            return [f if at == i else replace(f, index=i) for f in found]
        made = check(i)
        if all(f.index == i for f in made):
            self.now[ids] = (key, i, tuple(made))
        return made


def _dupes(values: Sequence[object]) -> list[int]:
    seen: set[object] = set()
    dup = []
    for j, v in enumerate(values):
        if v in seen:
            dup.append(j)
        seen.add(v)
    return dup


def _check_service(i: int, s: Service) -> list[Finding]:
    out = [Finding(i, ("spec", "versions", j), f"duplicate version {s.spec.versions[j]!r}")
           for j in _dupes(s.spec.versions)]
    out += [Finding(i, ("spec", "ports", j, "name"), f"duplicate port name {s.spec.ports[j].name!r}")
            for j in _dupes([p.name for p in s.spec.ports])]
    out += [Finding(i, ("spec", "ports", j, "port"), f"duplicate port {s.spec.ports[j].port}")
            for j in _dupes([p.port for p in s.spec.ports])]
    found = [f for j, port in enumerate(s.spec.ports) for f in _check_protocol(i, j, port)]
    out += found
    if any("unknown" in f.message for f in found):
        return out  # an unknown word reads as HTTP: comparing it with the other ports would only add noise
    first = s.spec.ports[0].effective_protocol
    out += [Finding(i, ("spec", "ports", j), f"port {p.name!r} speaks {p.effective_protocol} but port "
                    f"{s.spec.ports[0].name!r} speaks {first}: a service has one protocol (its sidecar "
                    "forwards to one app port); split it into two services")
            for j, p in enumerate(s.spec.ports) if p.effective_protocol != first]
    return out


def _did_you_mean(value: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
    return f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"


def _check_protocol(i: int, j: int, port: ServicePort) -> list[Finding]:
    """Unknown protocol words are errors: read as HTTP they would route a database port as web traffic."""
    out: list[Finding] = []
    if port.protocol is not None and port.protocol.upper() not in PROTOCOLS:
        out.append(Finding(i, ("spec", "ports", j, "protocol"), f"unknown protocol {port.protocol!r} "
                           f"({_did_you_mean(port.protocol.upper(), PROTOCOLS)})"))
    if port.app_protocol is not None and port.app_protocol.lower() not in APP_PROTOCOLS:
        out.append(Finding(i, ("spec", "ports", j, "appProtocol"), f"unknown appProtocol {port.app_protocol!r} "
                           f"({_did_you_mean(port.app_protocol.lower(), sorted(APP_PROTOCOLS))})"))
    if port.protocol is not None and port.app_protocol is not None and not out \
            and port.protocol.upper() != APP_PROTOCOLS[port.app_protocol.lower()]:
        out.append(Finding(i, ("spec", "ports", j, "appProtocol"), f"appProtocol {port.app_protocol!r} "
                           f"contradicts protocol {port.protocol!r}; give one of them"))
    return out


def _unknown_service(ns: str, name: str, services: dict[tuple[str, str], Service]) -> str:
    known = sorted(n for (sns, n) in services if sns == ns)
    hint = f"services in namespace {ns!r}: {', '.join(known)}" if known else f"no Service in namespace {ns!r}"
    return f"unknown service {name!r} ({hint})"


def _check_workload(
    i: int, w: Workload, services: dict[tuple[str, str], Service], clusters: set[str], have_mesh: bool, *,
    externals: set[tuple[str, str]] | None = None,
) -> list[Finding]:
    out = []
    ns = w.metadata.namespace
    svc = services.get((ns, w.spec.service))
    if svc is None:
        out.append(Finding(i, ("spec", "service"), _unknown_service(ns, w.spec.service, services)))
    elif w.spec.version not in svc.spec.versions:
        out.append(Finding(i, ("spec", "version"),
                           f"service {w.spec.service!r} has no version {w.spec.version!r} "
                           f"(declared: {', '.join(svc.spec.versions)})"))
    if have_mesh:
        for j, c in enumerate(w.spec.clusters):
            if c not in clusters:
                out.append(Finding(i, ("spec", "clusters", j),
                                   f"unknown cluster {c!r} (Mesh clusters: {', '.join(sorted(clusters))})"))
    egress = w.spec.egress or []
    for j, name in enumerate(egress):
        loc: Loc = ("spec", "egress", j)
        if not _EGRESS.match(name):
            out.append(Finding(i, loc, f"invalid egress {name!r}: write a service name (in namespace {ns!r}) "
                                       "or service.namespace"))
            continue
        svc_name, _, svc_ns = name.partition(".")
        if (svc_ns or ns, svc_name) not in services and (svc_ns or ns, svc_name) not in (externals or set()):
            out.append(Finding(i, loc, _unknown_service(svc_ns or ns, svc_name, services)))
    for j in _dupes([n if "." in n else f"{n}.{ns}" for n in egress]):
        out.append(Finding(i, ("spec", "egress", j), f"service {egress[j]!r} listed twice"))
    return out


def _check_regex(pattern: str) -> str | None:
    options = re2.Options()
    options.log_errors = False  # the error comes back in the exception; RE2's own stderr log is noise
    try:
        compiled = re2.compile(pattern, options)
    except Exception as exc:  # re2.error carries RE2's own message, sometimes as bytes
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        return f"invalid regex {pattern!r} (RE2 syntax, as Envoy uses): {reason}"
    if compiled.programsize > RE2_MAX_PROGRAM_SIZE:
        return (f"regex {pattern!r} is too complex for Envoy: RE2 program size {compiled.programsize} > "
                f"{RE2_MAX_PROGRAM_SIZE}; simplify it (e.g. bound repetitions less)")
    return None


def _check_string_match(m: StringMatch | PresenceMatch, loc: Loc, i: int) -> list[Finding]:
    if m.regex is not None and (msg := _check_regex(m.regex)):
        return [Finding(i, (*loc, "regex"), msg)]
    return []


def _check_header_name(name: str, loc: Loc, i: int) -> list[Finding]:
    if not _HEADER_NAME.match(name):
        return [Finding(i, loc, f"invalid header name {name!r}")]
    return []


def _check_header_operations(ops: HeaderOperations, loc: Loc, i: int, *, request: bool) -> list[Finding]:
    """Names must be tokens; Envoy refuses to touch pseudo-headers and Host (on either side)."""
    out: list[Finding] = []
    named: list[tuple[Loc, str]] = [((*loc, op, k), k) for op in ("set", "add") for k in getattr(ops, op)]
    named += [((*loc, "remove", j), k) for j, k in enumerate(ops.remove)]
    for where, name in named:
        if name.lower() == "host":
            hint = "; use rewrite.authority" if request else ""
            out.append(Finding(i, where, f"Envoy refuses to set or remove the Host header here{hint}"))
        else:
            out += _check_header_name(name, where, i)
    for op in ("set", "add"):
        for k, v in getattr(ops, op).items():
            if any(c in v for c in "\r\n\0"):
                out.append(Finding(i, (*loc, op, k), f"header value of {k!r} contains a line break or NUL"))
    return out


def _check_retries(r: Retries, timeout: str | None, loc: Loc, i: int) -> list[Finding]:
    out: list[Finding] = []
    tokens = [t.strip() for t in r.retry_on.split(",")]
    if not any(tokens):
        out.append(Finding(i, (*loc, "retryOn"), "retryOn is empty: nothing would ever be retried"))
    for t in tokens:
        if t.isdigit():
            if not 100 <= int(t) <= 599:
                out.append(Finding(i, (*loc, "retryOn"), f"{t} is not an HTTP status code"))
        elif t not in RETRY_ON:
            close = difflib.get_close_matches(t, RETRY_ON, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(RETRY_ON)}, or a status code"
            out.append(Finding(i, (*loc, "retryOn"), f"unknown retry condition {t!r} ({hint})"))
    b = r.backoff
    if b is not None and b.max_interval is not None \
            and parse_duration_ms(b.max_interval) < parse_duration_ms(b.base_interval):
        out.append(Finding(i, (*loc, "backoff", "maxInterval"),
                           f"maxInterval {b.max_interval} is shorter than baseInterval {b.base_interval}"))
    if r.per_try_timeout is not None and timeout is not None and parse_duration_ms(timeout) > 0 \
            and parse_duration_ms(r.per_try_timeout) > parse_duration_ms(timeout):
        out.append(Finding(i, (*loc, "perTryTimeout"),
                           f"perTryTimeout {r.per_try_timeout} exceeds the rule's timeout {timeout}: "
                           "no retry can happen", warning=True))
    return out


def _check_rule(i: int, rule: HTTPRule, base: Loc, svc: Service | None, *, governed_default: bool) -> list[Finding]:
    """One rule on its own: its kind of answer, what goes with it, and what Envoy would refuse."""
    out: list[Finding] = []
    answers = [k for k in ("route", "redirect", "direct_response")
               if (rule.route if k == "route" else getattr(rule, k) is not None)]
    if governed_default and answers and answers != ["route"]:
        out.append(Finding(i, (*base, to_camel(answers[-1])),
                           "a Rollout owns this rule's destinations: it must route, not redirect or answer"))
    elif len(answers) > 1:
        out.append(Finding(i, (*base, to_camel(answers[1])),
                           f"a rule has exactly one of route, redirect, directResponse (got "
                           f"{', '.join(map(to_camel, answers))})"))
    if (rule.redirect is not None or rule.direct_response is not None) and not governed_default:
        for field in ("timeout", "retries", "mirror", "rewrite"):
            if getattr(rule, field) is not None:
                out.append(Finding(i, (*base, field), f"{field} applies only to a rule that routes (has `route`)"))
    if rule.redirect is not None:
        if rule.redirect.uri is not None and not rule.redirect.uri.startswith("/"):
            out.append(Finding(i, (*base, "redirect", "uri"), "redirect uri must start with '/'"))
        if rule.redirect.authority is not None and not _HOST.match(rule.redirect.authority):
            out.append(Finding(i, (*base, "redirect", "authority"),
                               f"invalid authority {rule.redirect.authority!r}: use a host name, optionally :port"))
    if rule.rewrite is not None:
        if rule.rewrite.uri is not None and not rule.rewrite.uri.startswith("/"):
            out.append(Finding(i, (*base, "rewrite", "uri"), "rewrite uri must start with '/'"))
        if rule.rewrite.authority is not None and not _HOST.match(rule.rewrite.authority):
            out.append(Finding(i, (*base, "rewrite", "authority"),
                               f"invalid authority {rule.rewrite.authority!r}: use a host name, optionally :port"))
    if rule.retries is not None:
        out += _check_retries(rule.retries, rule.timeout, (*base, "retries"), i)
    if rule.mirror is not None and svc is not None and rule.mirror.version not in svc.spec.versions:
        out.append(Finding(i, (*base, "mirror", "version"),
                           f"service {svc.metadata.name!r} has no version {rule.mirror.version!r} "
                           f"(declared: {', '.join(svc.spec.versions)})"))
    edits = [((*base, "headers"), rule.headers)] + [((*base, "route", j, "headers"), d.headers)
                                                    for j, d in enumerate(rule.route)]
    for at, headers in edits:
        for side in ("request", "response"):
            if headers is not None and (ops := getattr(headers, side)) is not None:
                out += _check_header_operations(ops, (*at, side), i, request=side == "request")
    for j, m in enumerate(rule.match):
        if m.uri is not None:
            out += _check_string_match(m.uri, (*base, "match", j, "uri"), i)
            for kind in ("exact", "prefix"):
                value = getattr(m.uri, kind)
                if value is not None and not value.startswith("/"):
                    out.append(Finding(i, (*base, "match", j, "uri", kind),
                                       f"uri {kind} {value!r} never matches: paths start with '/'"))
        for name, hm in m.headers.items():
            out += _check_header_name(name, (*base, "match", j, "headers", name), i)
            out += _check_string_match(hm, (*base, "match", j, "headers", name), i)
        for name, qm in m.query_params.items():
            if not name:
                out.append(Finding(i, (*base, "match", j, "queryParams"), "empty query parameter name"))
            out += _check_string_match(qm, (*base, "match", j, "queryParams", name), i)
    return out


def _check_route(i: int, r: Route, services: dict[tuple[str, str], Service], *, governed: bool) -> list[Finding]:
    out: list[Finding] = []
    ns = r.metadata.namespace
    svc = services.get((ns, r.spec.service))
    if svc is None:
        out.append(Finding(i, ("spec", "service"), _unknown_service(ns, r.spec.service, services)))
    for j, host in enumerate(r.spec.hosts):
        if not _HOST.match(host):
            out.append(Finding(i, ("spec", "hosts", j),
                               f"invalid host {host!r}: use a DNS name, optionally *.prefixed or :port"))
    for j in _dupes([rule.name for rule in r.spec.http if rule.name is not None]):
        named = [k for k, rule in enumerate(r.spec.http) if rule.name is not None]
        out.append(Finding(i, ("spec", "http", named[j], "name"), "duplicate rule name"))
    default = next((k for k, rule in enumerate(r.spec.http) if not rule.match), None)
    for k, rule in enumerate(r.spec.http):
        base: Loc = ("spec", "http", k)
        total = sum(d.weight for d in rule.route)
        if governed and k == default:
            if rule.route:
                out.append(Finding(i, (*base, "route"), "a Rollout owns this rule's weights; the weights "
                                   "written here are ignored (leave `route` out)", warning=True))
        elif rule.redirect is not None or rule.direct_response is not None:
            pass  # checked with the rest of the rule
        elif not rule.route:
            out.append(Finding(i, (*base, "route"), "at least one destination is required (only the default "
                               "rule of a service governed by a Rollout may leave `route` out; or answer with "
                               "redirect or directResponse)"))
        elif total != 100:
            weights = " + ".join(str(d.weight) for d in rule.route)
            out.append(Finding(i, (*base, "route"), f"weights must sum to 100, got {weights} = {total}"))
        for j in _dupes([d.version for d in rule.route]):
            out.append(Finding(i, (*base, "route", j, "version"), "version listed twice in one rule"))
        if svc is not None:
            for j, d in enumerate(rule.route):
                if d.version not in svc.spec.versions:
                    out.append(Finding(i, (*base, "route", j, "version"),
                                       f"service {r.spec.service!r} has no version {d.version!r} "
                                       f"(declared: {', '.join(svc.spec.versions)})"))
        out += _check_rule(i, rule, base, svc, governed_default=governed and k == default)
    if svc is not None and svc.spec.protocol in L4_PROTOCOLS:
        out += _check_l4_route(i, r, svc)
    return out


_HTTP_ONLY = ("match", "redirect", "direct_response", "timeout", "retries", "fault", "mirror", "rewrite", "headers")


def _check_l4_route(i: int, r: Route, svc: Service) -> list[Finding]:
    """A TCP or TLS service is routed per connection by weight only: HTTP conditions and edits cannot apply."""
    out: list[Finding] = []
    proto = svc.spec.protocol
    if len(r.spec.http) > 1:
        out.append(Finding(i, ("spec", "http", 1), f"service {svc.metadata.name!r} speaks {proto}: connections "
                           "are split by weight with one rule (no matches); remove the other rules"))
    for k, rule in enumerate(r.spec.http):
        for field in _HTTP_ONLY:
            value = getattr(rule, field)
            if value is not None and value != []:
                out.append(Finding(i, ("spec", "http", k, to_camel(field)),
                                   f"{to_camel(field)} needs HTTP; service {svc.metadata.name!r} speaks {proto} "
                                   "(its connections are split by weight only)"))
        for j, d in enumerate(rule.route):
            if d.headers is not None:
                out.append(Finding(i, ("spec", "http", k, "route", j, "headers"),
                                   f"headers need HTTP; service {svc.metadata.name!r} speaks {proto}"))
    return out


def _check_settings(i: int, p: PolicySettings, base: Loc) -> list[Finding]:
    out: list[Finding] = []
    ch = p.load_balancer.consistent_hash if p.load_balancer else None
    loc: Loc = (*base, "loadBalancer", "consistentHash")
    if ch is not None and ch.http_header_name is not None:
        out += _check_header_name(ch.http_header_name, (*loc, "httpHeaderName"), i)
    if ch is not None and ch.http_cookie is not None and not _HEADER_NAME.match(ch.http_cookie.name):
        out.append(Finding(i, (*loc, "httpCookie", "name"), f"invalid cookie name {ch.http_cookie.name!r}"))
    if ch is not None and ch.http_query_parameter_name == "":
        out.append(Finding(i, (*loc, "httpQueryParameterName"), "empty query parameter name"))
    if p.load_balancer is None and p.connection_pool is None and p.outlier_detection is None:
        out.append(Finding(i, base, "sets nothing: give loadBalancer, connectionPool or "
                                                  "outlierDetection", warning=True))
    return out


def _check_traffic_policy(i: int, tp: TrafficPolicy, services: dict[tuple[str, str], Service],
                          clusters: Sequence[MeshCluster] = ()) -> list[Finding]:
    out: list[Finding] = []
    blocks: list[tuple[Loc, PolicySettings, PolicySettings]] = [(("spec",), tp.spec, tp.spec.settings(None))]
    blocks += [(("spec", "versions", j), v, tp.spec.settings(v.version)) for j, v in enumerate(tp.spec.versions)]
    for base, own, effective in blocks:
        if own.load_balancer is not None and own.load_balancer.locality_lb_setting is not None:
            out += _check_locality(i, own.load_balancer.locality_lb_setting,
                                   (*base, "loadBalancer", "localityLbSetting"), clusters,
                                   outlier_detection=effective.outlier_detection is not None)
    ns = tp.metadata.namespace
    svc = services.get((ns, tp.spec.service))
    if svc is None:
        out.append(Finding(i, ("spec", "service"), _unknown_service(ns, tp.spec.service, services)))
    sets_own = any(getattr(tp.spec, f) is not None for f in PolicySettings.model_fields)
    if sets_own or not tp.spec.versions:  # a policy for some versions only need not set the service's
        out += _check_settings(i, tp.spec, ("spec",))
    for j, v in enumerate(tp.spec.versions):
        if svc is not None and v.version not in svc.spec.versions:
            out.append(Finding(i, ("spec", "versions", j, "version"),
                               f"service {tp.spec.service!r} has no version {v.version!r} "
                               f"(declared: {', '.join(svc.spec.versions)})"))
        out += _check_settings(i, v, ("spec", "versions", j))
    for j in _dupes([v.version for v in tp.spec.versions]):
        out.append(Finding(i, ("spec", "versions", j, "version"), "version listed twice"))
    return out


def _known_terms(clusters: Sequence[MeshCluster]) -> str:
    localities = sorted({c.locality for c in clusters if c.locality})
    names = ", ".join(c.name for c in clusters)
    return f"Mesh localities: {', '.join(localities) or 'none given'}; clusters: {names}"


def _check_locality(i: int, lb: LocalityLbSetting, loc: Loc, clusters: Sequence[MeshCluster], *,
                    outlier_detection: bool) -> list[Finding]:
    """Istio's checks of a LocalityLoadBalancerSetting, against the Mesh's clusters and localities."""
    out: list[Finding] = []
    if lb.distribute and lb.failover:
        out.append(Finding(i, (*loc, "failover"), "give distribute or failover, not both (as Istio: weights per "
                                                  "locality leave no order to fail over in)"))
    if lb.enabled is False and (lb.distribute or lb.failover or lb.failover_priority):
        out.append(Finding(i, (*loc, "enabled"), "enabled: false turns locality balancing off: distribute, "
                                                 "failover and failoverPriority are ignored", warning=True))
    froms: dict[str, int] = {}
    for j, d in enumerate(lb.distribute):
        at: Loc = (*loc, "distribute", j)
        if (why := _term_problem(d.from_, clusters, wildcards=True)) is not None:
            out.append(Finding(i, (*at, "from"), why))
        if d.from_ in froms:
            out.append(Finding(i, (*at, "from"), f"{d.from_!r} already has distribute rule #{froms[d.from_] + 1}: "
                                                 "merge them (only the first would apply)"))
        froms.setdefault(d.from_, j)
        for term in d.to:
            if (why := _term_problem(term, clusters, wildcards=True)) is not None:
                out.append(Finding(i, (*at, "to", term), why))
        total = sum(d.to.values())
        if total != 100:
            weights = " + ".join(str(w) for w in d.to.values())
            out.append(Finding(i, (*at, "to"), f"weights must sum to 100, got {weights} = {total}"))
    for j, f in enumerate(lb.failover):
        at = (*loc, "failover", j)
        for key, term in (("from", f.from_), ("to", f.to)):
            if (why := _term_problem(term, clusters, wildcards=False)) is not None:
                out.append(Finding(i, (*at, key), why))
        if f.from_ == f.to:
            out.append(Finding(i, (*at, "to"), f"failover from {f.from_!r} to itself: name another region or "
                                               "cluster"))
    for j, label in enumerate(lb.failover_priority):
        at = (*loc, "failoverPriority", j)
        if label not in FAILOVER_LABELS:
            out.append(Finding(i, at, f"unknown label {label!r} (known: {', '.join(FAILOVER_LABELS)})"))
        elif label == FAILOVER_LABELS[0] and lb.failover:
            out.append(Finding(i, at, "failover and failoverPriority on the region label together are ambiguous "
                                      "(as Istio refuses): keep one"))
    for j in _dupes(lb.failover_priority):
        out.append(Finding(i, (*loc, "failoverPriority", j), f"label {lb.failover_priority[j]!r} listed twice"))
    if (lb.failover or lb.failover_priority) and lb.enabled is not False and not outlier_detection:
        out.append(Finding(i, (*loc, "failover" if lb.failover else "failoverPriority"),
                           "without outlierDetection only instances that go away move traffic to the next "
                           "locality, not ones that answer errors (as Istio warns): add outlierDetection",
                           warning=True))
    return out


def _term_problem(term: str, clusters: Sequence[MeshCluster], *, wildcards: bool) -> str | None:
    """Why a term of a locality rule is wrong, or None: a cluster's name, or (distribute) a locality
    pattern with `*` only as its last part, or (failover) a region, that covers some cluster of the Mesh."""
    if any(c.name == term for c in clusters):
        return None
    parts = term.split("/")
    if not wildcards and (len(parts) > 1 or "*" in term):
        return f"{term!r}: failover names a region or a cluster, without '/' or '*' ({_known_terms(clusters)})"
    if len(parts) > 3 or any(not p for p in parts):
        return f"{term!r} is not a locality: write region, region/zone or region/zone/subzone"
    if "*" in term and ("*" in parts[:-1] or parts[-1] != "*"):
        return f"{term!r}: '*' may only stand as the whole last part (region/*, region/zone/*, *)"
    if term == "*":
        return None
    prefix = [p for p in parts if p != "*"]
    for c in clusters:
        have = (c.locality or "").split("/") if c.locality else []
        if have and have[:len(prefix)] == prefix:
            return None
    what = "region or cluster" if not wildcards else "locality or cluster"
    return f"{term!r} is no {what} of the Mesh ({_known_terms(clusters)})"


def _check_policy_conflicts(resources: Sequence[ResourceBase]) -> list[Finding]:
    """One TrafficPolicy per service, as one DestinationRule per host: two would leave the winner unclear."""
    return _one_per_service(resources, TrafficPolicy, "merge them into one")


def _one_per_service(resources: Sequence[ResourceBase], kind: type[Route] | type[TrafficPolicy], fix: str
                     ) -> list[Finding]:
    """A finding on every resource of `kind` after the first for the same (namespace, service)."""
    out: list[Finding] = []
    owner: dict[tuple[str, str], ResourceBase] = {}
    for i, r in enumerate(resources):
        if not isinstance(r, kind):
            continue
        key = (r.metadata.namespace, r.spec.service)
        if (first := owner.get(key)) is not None and first.key != r.key:
            out.append(Finding(i, ("spec", "service"),
                               f"service {key[1]!r} already has {kind.__name__} {first.metadata.name!r}; {fix}"))
        owner.setdefault(key, r)
    return out


def _check_route_conflicts(resources: Sequence[ResourceBase]) -> list[Finding]:
    """One Route per service, one owner per ingress host: otherwise which rule wins is ambiguous."""
    out = _one_per_service(resources, Route, "merge the rules into one Route")
    host_owner: dict[str, Route] = {}
    for i, r in enumerate(resources):
        if not isinstance(r, Route):
            continue
        for j, host in enumerate(r.spec.hosts):
            if (prev := host_owner.get(host)) is not None and prev.key != r.key:
                out.append(Finding(i, ("spec", "hosts", j),
                                   f"host {host!r} is already exposed by Route "
                                   f"{prev.metadata.namespace}/{prev.metadata.name}"))
            host_owner.setdefault(host, r)
    return out


# --- ExternalService --------------------------------------------------------------------------------------

_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SAN = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _host_problem(host: str) -> str | None:
    """Why a host of an ExternalService is not one (None: it is): a DNS name or an IP, no wildcard, no port."""
    if "*" in host:
        return f"wildcard host {host!r} is not supported: list each name"
    if ":" in host and not _is_ip(host):
        return f"host {host!r} has a port: give the name alone (ports go in `ports`)"
    if not (_DNS_NAME.match(host) or _is_ip(host)):
        return f"invalid host {host!r}: use a lower-case DNS name or an IP address"
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _pem_problem(text: str) -> str | None:
    """Why `caCertificates` is not PEM certificates (None: it is), as Envoy would refuse it when loading."""
    if "-----BEGIN CERTIFICATE-----" not in text:
        return "caCertificates holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        return f"caCertificates is not valid PEM: {exc}"
    return None


def _check_external(i: int, es: ExternalService) -> list[Finding]:
    """One ExternalService on its own: names, ports, and whether its TLS mode fits its ports' protocols."""
    spec = es.spec
    out: list[Finding] = []
    for j, host in enumerate(spec.hosts):
        if (why := _host_problem(host)) is not None:
            out.append(Finding(i, ("spec", "hosts", j), why))
    out += [Finding(i, ("spec", "hosts", j), f"host {spec.hosts[j]!r} listed twice") for j in _dupes(spec.hosts)]
    out += [Finding(i, ("spec", "ports", j, "name"), f"duplicate port name {spec.ports[j].name!r}")
            for j in _dupes([p.name for p in spec.ports])]
    out += [Finding(i, ("spec", "ports", j, "number"), f"duplicate port {spec.ports[j].number}")
            for j in _dupes([p.number for p in spec.ports])]
    known = True
    for j, port in enumerate(spec.ports):
        if port.protocol.upper() not in EXTERNAL_PROTOCOLS:
            known = False
            out.append(Finding(i, ("spec", "ports", j, "protocol"), f"unknown protocol {port.protocol!r} "
                               f"({_did_you_mean(port.protocol.upper(), EXTERNAL_PROTOCOLS)})"))
    for j, ep in enumerate(spec.endpoints):
        if not (_DNS_NAME.match(ep.address) or _is_ip(ep.address)):
            out.append(Finding(i, ("spec", "endpoints", j, "address"),
                               f"invalid address {ep.address!r}: use an IP address or a DNS name"))
    if known:
        out += _check_external_tls(i, es)
    http = [p for p in spec.ports if p.protocol.upper() == "HTTP"
            or (p.protocol.upper() == "HTTPS" and spec.tls is not None and spec.tls.mode == "originate")]
    if known and not http:
        for name in ("timeout", "retries"):
            if getattr(spec, name) is not None:
                out.append(Finding(i, ("spec", name), f"{name} applies to HTTP requests, and every port here is "
                                   "tunnelled (CONNECT): it changes nothing", warning=True))
    if spec.retries is not None:
        out += _check_retries(spec.retries, spec.timeout, ("spec", "retries"), i)
    return out


def _check_external_tls(i: int, es: ExternalService) -> list[Finding]:
    """originate needs HTTP to route (HTTP, HTTPS ports); passthrough needs the app's TLS (HTTPS, TLS ports)."""
    tls = es.spec.tls
    if tls is None:
        return []
    out: list[Finding] = []
    fits = ("HTTP", "HTTPS") if tls.mode == "originate" else ("HTTPS", "TLS")
    why = ("the sidecar must read HTTP requests to originate TLS for them" if tls.mode == "originate" else
           "passthrough carries the app's own TLS")
    for j, port in enumerate(es.spec.ports):
        if port.protocol.upper() not in fits:
            out.append(Finding(i, ("spec", "ports", j, "protocol"),
                               f"port {port.name!r} speaks {port.protocol.upper()}, but tls.mode is {tls.mode}: "
                               f"{why} (ports {' or '.join(fits)}); split it into another ExternalService"))
    if tls.mode == "passthrough":
        for name in ("sni", "ca_certificates", "subject_alt_names"):
            if getattr(tls, name):
                out.append(Finding(i, ("spec", "tls", to_camel(name)), f"{to_camel(name)} applies only to "
                                   "tls.mode originate (with passthrough the app does its own TLS)"))
        return out
    if tls.sni is not None and _host_problem(tls.sni) is not None:
        out.append(Finding(i, ("spec", "tls", "sni"), f"invalid sni {tls.sni!r}: use a DNS name"))
    if tls.ca_certificates is not None and (bad := _pem_problem(tls.ca_certificates)) is not None:
        out.append(Finding(i, ("spec", "tls", "caCertificates"), bad))
    for j, san in enumerate(tls.subject_alt_names):
        if not _SAN.match(san):
            out.append(Finding(i, ("spec", "tls", "subjectAltNames", j),
                               f"invalid subject alt name {san!r}: use a DNS name (`*.` allowed first)"))
    return out


def _check_external_conflicts(resources: Sequence[ResourceBase]) -> list[Finding]:
    """A host has one owner: one ExternalService, never a mesh Service's name (`svc.ns`, or `svc` as sidecars
    of its namespace call it); an ExternalService and a Service never share a name (egress lists name both)."""
    out: list[Finding] = []
    mesh_names: dict[str, Service] = {}
    for r in resources:
        if isinstance(r, Service):
            mesh_names.setdefault(f"{r.metadata.name}.{r.metadata.namespace}", r)
            mesh_names.setdefault(r.metadata.name, r)
    keys = {(r.metadata.namespace, r.metadata.name) for r in resources if isinstance(r, Service)}
    owner: dict[str, ExternalService] = {}
    for i, r in enumerate(resources):
        if not isinstance(r, ExternalService):
            continue
        if (r.metadata.namespace, r.metadata.name) in keys:
            out.append(Finding(i, ("metadata", "name"), f"Service {r.metadata.namespace}/{r.metadata.name} has this "
                               "name too: a workload's egress would be ambiguous; rename one"))
        for j, host in enumerate(r.spec.hosts):
            if (svc := mesh_names.get(host)) is not None:
                out.append(Finding(i, ("spec", "hosts", j), f"host {host!r} is the name of mesh Service "
                                   f"{svc.metadata.namespace}/{svc.metadata.name}: sidecars route it there"))
            elif (first := owner.get(host)) is not None and first.key != r.key:
                out.append(Finding(i, ("spec", "hosts", j), f"host {host!r} is already declared by ExternalService "
                                   f"{first.metadata.namespace}/{first.metadata.name}"))
            owner.setdefault(host, r)
    return out
