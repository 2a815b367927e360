"""Cross-resource checks of the security kinds: references, conflicts, and the syntax Envoy would get wrong.

Pure, like mesh.validate: findings point at a resource and a field path; the loader adds `file:line`.
A principal, path or method that parses but can never match is worse than an error: the policy would
silently allow (or deny) the wrong calls, so each is checked here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mesh.intent import DNS_LABEL, L4_PROTOCOLS, Mesh, ResourceBase, Route, Service
from mesh.validate import Finding, Loc
from policies.intent import AuthorizationPolicy, Operation, PeerAuthentication, RateLimit, ServiceSelector, Source

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
_LABEL = re.compile(DNS_LABEL)
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-._~!$&'()+,;=:@%/*]+$")


def validate(resources: Sequence[ResourceBase]) -> list[Finding]:
    """Every problem of PeerAuthentication, AuthorizationPolicy and RateLimit resources, in order."""
    services = {(r.metadata.namespace, r.metadata.name): r for r in resources if isinstance(r, Service)}
    routes = {(r.metadata.namespace, r.spec.service): r for r in resources if isinstance(r, Route)}
    mesh = next((r for r in resources if isinstance(r, Mesh)), None)
    trust_domain = mesh.spec.trust_domain if mesh else None
    out: list[Finding] = []
    peer_owner: dict[tuple[str, str | None], str] = {}
    limit_owner: dict[tuple[str, str, str | None], str] = {}
    for i, r in enumerate(resources):
        if isinstance(r, PeerAuthentication):
            out += _check_selector(i, r.metadata.namespace, r.spec.selector, services)
            key = (r.metadata.namespace, r.spec.selector.service if r.spec.selector else None)
            if key in peer_owner:
                what = f"service {key[1]!r}" if key[1] else f"namespace {key[0]!r} (no selector)"
                out.append(Finding(i, ("spec", "selector") if key[1] else ("spec",),
                                   f"{what} already has PeerAuthentication {peer_owner[key]!r}; keep one"))
            peer_owner.setdefault(key, r.metadata.name)
        elif isinstance(r, AuthorizationPolicy):
            out += _check_authz(i, r, services, trust_domain)
        elif isinstance(r, RateLimit):
            out += _check_rate_limit(i, r, services, routes)
            key3 = (r.metadata.namespace, r.spec.service, r.spec.rule)
            if key3 in limit_owner:
                what = f"rule {r.spec.rule!r} of service {r.spec.service!r}" if r.spec.rule else \
                    f"service {r.spec.service!r}"
                out.append(Finding(i, ("spec", "rule" if r.spec.rule else "service"),
                                   f"{what} already has RateLimit {limit_owner[key3]!r}; keep one"))
            limit_owner.setdefault(key3, r.metadata.name)
    return out


def _unknown_service(ns: str, name: str, services: dict[tuple[str, str], Service]) -> str:
    known = sorted(n for (sns, n) in services if sns == ns)
    hint = f"services in namespace {ns!r}: {', '.join(known)}" if known else f"no Service in namespace {ns!r}"
    return f"unknown service {name!r} ({hint})"


def _check_selector(i: int, ns: str, selector: ServiceSelector | None,
                    services: dict[tuple[str, str], Service]) -> list[Finding]:
    if selector is not None and (ns, selector.service) not in services:
        return [Finding(i, ("spec", "selector", "service"), _unknown_service(ns, selector.service, services))]
    return []


def check_principal(principal: str) -> str | None:
    """None if `principal` is Istio syntax (`<trustDomain>/ns/<ns>/sa/<sa>`, `*` at one end), else why not."""
    if principal.startswith("spiffe://"):
        return f"invalid principal {principal!r}: write it without 'spiffe://', as {principal[9:]!r}"
    if principal == "*":
        return None
    body = principal
    if body.startswith("*"):
        body = body[1:]
    elif body.endswith("*"):
        body = body[:-1]
    if "*" in body:
        return f"invalid principal {principal!r}: '*' may only stand at the start or the end"
    if not body:
        return f"invalid principal {principal!r}"
    wildcard = body != principal
    parts = body.split("/")
    full = len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa"
    if not wildcard and not full:
        return (f"invalid principal {principal!r}: expected <trustDomain>/ns/<namespace>/sa/<serviceAccount>, "
                "e.g. example.org/ns/shop/sa/frontend")
    if full and not (_TRUST_DOMAIN.match(parts[0]) and _LABEL.match(parts[2]) and _LABEL.match(parts[4])):
        return (f"invalid principal {principal!r}: trust domain, namespace and service account must be "
                "lower-case DNS names")
    return None


def check_path(path: str) -> str | None:
    """None if `path` is `/exact`, `/prefix*`, `*suffix` or `*`, else why not."""
    if path == "*":
        return None
    if "?" in path or "#" in path:
        return f"invalid path {path!r}: paths never include a query or fragment; match the path only"
    if not _PATH_CHARS.match(path):
        return f"invalid path {path!r}: contains characters that are not allowed in a URL path"
    body = path[1:] if path.startswith("*") else path[:-1] if path.endswith("*") else path
    if "*" in body:
        return f"invalid path {path!r}: '*' may only stand at the start (suffix match) or the end (prefix match)"
    if not path.startswith(("/", "*")):
        return f"invalid path {path!r}: must start with '/' (or '*' for a suffix match)"
    return None


def _check_namespace_pattern(ns: str) -> str | None:
    body = ns[1:] if ns.startswith("*") else ns[:-1] if ns.endswith("*") else ns
    if "*" in body or (body and not re.fullmatch(r"[a-z0-9-]+", body)):
        return f"invalid namespace {ns!r}: a namespace name, optionally with '*' at the start or the end"
    return None


def _check_source(i: int, src: Source, loc: Loc, trust_domain: str | None) -> list[Finding]:
    out = []
    if not src.principals and not src.namespaces:
        out.append(Finding(i, loc, "empty source: give principals and/or namespaces (leave `from` out to match "
                                   "every caller)"))
    for j, p in enumerate(src.principals):
        if (msg := check_principal(p)) is not None:
            out.append(Finding(i, (*loc, "principals", j), msg))
        elif trust_domain and not p.startswith("*") and p.split("/", 1)[0] != trust_domain:
            out.append(Finding(i, (*loc, "principals", j),
                               f"principal {p!r} is not in the mesh's trust domain {trust_domain!r}; "
                               "it matches no peer", warning=True))
    for j, ns in enumerate(src.namespaces):
        if (msg := _check_namespace_pattern(ns)) is not None:
            out.append(Finding(i, (*loc, "namespaces", j), msg))
    return out


def _check_operation(i: int, op: Operation, loc: Loc, service: Service | None) -> list[Finding]:
    out = []
    if not op.methods and not op.paths and not op.ports:
        out.append(Finding(i, loc, "empty operation: give methods, paths and/or ports (leave `to` out to match "
                                   "every request)"))
    for j, m in enumerate(op.methods):
        if m not in METHODS:
            hint = f"; did you mean {m.upper()!r}?" if m.upper() in METHODS else f" (one of {', '.join(METHODS)})"
            out.append(Finding(i, (*loc, "methods", j), f"invalid method {m!r}{hint}"))
    for j, p in enumerate(op.paths):
        if (msg := check_path(p)) is not None:
            out.append(Finding(i, (*loc, "paths", j), msg))
    for j, port in enumerate(op.ports):
        if not 1 <= port <= 65535:
            out.append(Finding(i, (*loc, "ports", j), f"invalid port {port}: must be 1-65535"))
        elif service is not None and port not in {p.port for p in service.spec.ports}:
            declared = ", ".join(str(p.port) for p in service.spec.ports)
            out.append(Finding(i, (*loc, "ports", j),
                               f"service {service.metadata.name!r} has no port {port} (declared: {declared})"))
    return out


def _check_authz(i: int, r: AuthorizationPolicy, services: dict[tuple[str, str], Service],
                 trust_domain: str | None) -> list[Finding]:
    ns = r.metadata.namespace
    out = _check_selector(i, ns, r.spec.selector, services)
    service = services.get((ns, r.spec.selector.service)) if r.spec.selector else None
    if r.spec.action == "ALLOW" and not r.spec.rules:
        target = f"service {r.spec.selector.service!r}" if r.spec.selector else f"every service in {ns!r}"
        out.append(Finding(i, ("spec", "rules"), f"an ALLOW policy without rules matches nothing: every request to "
                                                 f"{target} is denied", warning=True))
    tcp = [s.metadata.name for s in ([service] if service else [s for (sns, _), s in sorted(services.items())
                                                                  if sns == ns]) if s.spec.protocol in L4_PROTOCOLS]
    for k, rule in enumerate(r.spec.rules):
        for j, src in enumerate(rule.from_):
            out += _check_source(i, src, ("spec", "rules", k, "from", j), trust_domain)
        for j, op in enumerate(rule.to):
            out += _check_operation(i, op, ("spec", "rules", k, "to", j), service)
            out += _check_l4_operation(i, op, ("spec", "rules", k, "to", j), tcp, selected=service is not None)
    return out


def _check_l4_operation(i: int, op: Operation, loc: Loc, tcp: list[str], *, selected: bool) -> list[Finding]:
    """Paths and methods need HTTP: on a TCP service (connections, authorized at L4 by peer and port) they
    could never be checked, so whether the rule matches would be a guess either way."""
    if not tcp:
        return []
    which = f"service {tcp[0]!r} speaks TCP" if selected else \
        f"it applies to TCP service(s) {', '.join(map(repr, tcp))} (no selector); select the HTTP service instead"
    return [Finding(i, (*loc, field), f"{field} need HTTP, but {which}: at L4 only principals, namespaces and "
                                      "ports can be checked")
            for field in ("methods", "paths") if getattr(op, field)]


def _check_rate_limit(i: int, r: RateLimit, services: dict[tuple[str, str], Service],
                      routes: dict[tuple[str, str], Route]) -> list[Finding]:
    ns = r.metadata.namespace
    if (ns, r.spec.service) not in services:
        return [Finding(i, ("spec", "service"), _unknown_service(ns, r.spec.service, services))]
    if r.spec.rule is None:
        return []
    if services[(ns, r.spec.service)].spec.protocol in L4_PROTOCOLS:
        return [Finding(i, ("spec", "rule"), f"service {r.spec.service!r} speaks TCP: its RateLimit is a bucket of "
                                             "connections at its own sidecars; leave `rule` out")]
    route = routes.get((ns, r.spec.service))
    names = [rule.name or f"rule-{k}" for k, rule in enumerate(route.spec.http)] if route else ["default"]
    if r.spec.rule not in names:
        where = f"Route {route.metadata.name!r}" if route else "the default route (no Route)"
        return [Finding(i, ("spec", "rule"), f"service {r.spec.service!r} has no rule {r.spec.rule!r} "
                                             f"(rules of {where}: {', '.join(names)})")]
    return []
