"""Istio YAML -> lockgate intent: VirtualService, DestinationRule, PeerAuthentication, AuthorizationPolicy
(networking.istio.io and security.istio.io; v1, v1beta1, v1alpha3).

Pure: `import_istio({path: bytes})` returns the texts of the files to write and what it had to say. Files
are parsed exactly as lockgate parses intent (`reconciler.load`: sizes, nesting and aliases bounded on the
event stream before anything is built, every value's line kept), so a line in a message or a comment is
the line in the Istio file.

What maps, and how:
- DestinationRule: `subsets` become the Service's versions (a subset selects `labels.version`, the version
  a lockgate Workload runs), `trafficPolicy` (and each subset's) a TrafficPolicy. `tls: ISTIO_MUTUAL` is
  what lockgate always does between sidecars.
- VirtualService: its `http` rules become one Route of the service its destinations name. Bound to a
  gateway (`gateways:` naming one besides `mesh`), its `hosts` are exposed at lockgate's ingress.
- PeerAuthentication and AuthorizationPolicy: the same shapes; `selector.matchLabels.app` names the service.
- Service: one per service seen, with the versions seen and the ports given (a destination's `port`, or a
  Kubernetes v1 Service in the input); a port nobody gave is a guess, and its comment says so.

Every value written carries a comment naming the Istio file, line, resource and field it came from.
Whatever has no lockgate equivalent is a `file:line: warning:` (never dropped silently); where dropping a
condition would make an ALLOW rule match more than in Istio, the whole rule is dropped instead (it fails
closed). A document that is not a Kubernetes-style resource, or an Istio resource of the wrong shape, is a
`file:line:` error, and nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mesh.intent import API_VERSION, DNS_LABEL, parse_duration_ms
from mesh.validate import RETRY_ON, Loc
from reconciler.importers.yamlout import Comment, Noted, Val, emit, plain
from reconciler.kinds import KINDS
from reconciler.load import (
    MAX_ALIASES,
    MAX_DOCUMENTS,
    MAX_FILE_BYTES,
    MAX_NODES,
    Problem,
    _Doc,
    _parse_uncached,
    _Usage,
)

GROUPS = {"networking.istio.io": ("v1", "v1beta1", "v1alpha3"), "security.istio.io": ("v1", "v1beta1")}
ROOT_NAMESPACE = "istio-system"
"""Istio's default root namespace: a policy there applies mesh-wide (a Mesh setting in lockgate)."""
ISTIO_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,503"
"""What Istio retries on when a rule sets `retries` without `retryOn` (retriable-status-codes: 503)."""
GUESSED_PORT = 80
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
FILES = {"Service": "services.yaml", "Route": "routes.yaml", "TrafficPolicy": "traffic-policies.yaml",
         "PeerAuthentication": "peer-authentications.yaml", "AuthorizationPolicy": "authorization-policies.yaml"}
"""Where each lockgate kind is written, in this order."""
_LABEL = re.compile(DNS_LABEL)


@dataclass
class Imported:
    files: dict[str, str] = field(default_factory=dict)
    """File name (in the output directory) -> YAML text; empty when there were errors."""
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    """Something in the Istio YAML that lockgate intent does not say (`path:line: warning: ...`)."""
    notes: list[Problem] = field(default_factory=list)
    """Guesses (`path:line: note: ...`): written with a comment saying so; not a loss."""


# --- reading one Istio document -------------------------------------------------------------------------


def _dotted(loc: Loc) -> str:
    parts = list(loc[1:] if loc[:1] == ("spec",) else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass
class _Src:
    """One Istio resource being converted: where its values are, and the messages about it."""

    doc: _Doc
    kind: str
    name: str
    namespace: str
    out: Imported

    def line(self, loc: Loc) -> int:
        return self.doc.line_of(loc)

    def where(self, loc: Loc) -> str:
        return f"{self.doc.path}:{self.line(loc)}"

    def note(self, loc: Loc, extra: str = "") -> str:
        field_ = _dotted(loc)
        return (f"from {self.where(loc)} {self.kind} {self.name}" + (f" {field_}" if field_ else "")
                + (f"; {extra}" if extra else ""))

    def val(self, value: Any, loc: Loc, extra: str = "") -> Val:
        return Val(value, self.note(loc, extra))

    def _message(self, loc: Loc, text: str) -> str:
        field_ = _dotted(loc)
        return f"{self.kind} {self.name}" + (f" {field_}" if field_ else "") + f": {text}"

    def warn(self, loc: Loc, text: str) -> None:
        self.out.warnings.append(Problem(self.doc.path, self.line(loc), f"warning: {self._message(loc, text)}"))

    def guess(self, loc: Loc, text: str) -> None:
        self.out.notes.append(Problem(self.doc.path, self.line(loc), f"note: {self._message(loc, text)}"))

    def error(self, loc: Loc, text: str) -> None:
        self.out.errors.append(Problem(self.doc.path, self.line(loc), self._message(loc, text)))

    # typed reads: a wrong type is this document's error, and reads as absent

    def as_map(self, value: Any, loc: Loc) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(loc, f"expected a mapping, got {_type(value)}")
            return None
        return value

    def as_list(self, value: Any, loc: Loc) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(loc, f"expected a list, got {_type(value)}")
            return []
        return value

    def as_str(self, value: Any, loc: Loc) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.error(loc, f"expected a non-empty string, got {_type(value)}")
            return None
        return value

    def as_int(self, value: Any, loc: Loc) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(loc, f"expected a whole number, got {_type(value)}")
            return None
        return value

    def duration(self, value: Any, loc: Loc) -> Val | None:
        text = self.as_str(value, loc)
        if text is None:
            return None
        try:
            parse_duration_ms(text)
        except ValueError as exc:
            self.warn(loc, f"{exc}: not imported")
            return None
        return self.val(text, loc)

    def rest(self, data: Mapping[str, Any], loc: Loc, known: set[str] | frozenset[str],
             why: Mapping[str, str] | None = None, *, effect: str = "not imported") -> None:
        """A warning for each field not handled: its specific reason if `why` has one."""
        for key in data:
            if key in known:
                continue
            reason = (why or {}).get(key, "has no lockgate equivalent")
            self.warn((*loc, key), f"{reason}: {effect}")


def _type(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__) + f" ({_short(value)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _label(src: _Src, text: str, loc: Loc, what: str) -> str:
    """`text` as a lockgate name (a DNS label): lower-cased, other characters as `-`, with a note if changed."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-") or "x"
    if name != text:
        src.guess(loc, f"{what} {text!r} is not a DNS label: written as {name!r}")
    return name


def _service_of(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, service) a host names: `reviews`, `reviews.ns`, `reviews.ns.svc[.cluster.local]`; None for
    a wildcard or an external name."""
    if "*" in host:
        return None
    parts = host.lower().split(".")
    if len(parts) == 1:
        return namespace, parts[0]
    if len(parts) == 2 or parts[2] == "svc":
        return parts[1], parts[0]
    return None


# --- what is gathered across documents ----------------------------------------------------------------


@dataclass
class _Service:
    namespace: str
    name: str
    first: tuple[_Src, Loc]
    versions: dict[str, str] = field(default_factory=dict)
    """version -> the note of where it was first seen."""
    ports: dict[int, tuple[str, str]] = field(default_factory=dict)
    """port -> (name, note)."""
    comments: list[str] = field(default_factory=list)


@dataclass
class _Route:
    src: _Src
    name: str
    service: str
    hosts: list[Val] = field(default_factory=list)
    http: list[Any] = field(default_factory=list)
    rule_names: set[str] = field(default_factory=set)


@dataclass
class _State:
    out: Imported
    trust_domain: str | None
    services: dict[tuple[str, str], _Service] = field(default_factory=dict)
    subsets: dict[tuple[str, str], dict[str, tuple[str, str]]] = field(default_factory=dict)
    """(namespace, service) -> subset name -> (version, note)."""
    routes: dict[tuple[str, str], _Route] = field(default_factory=dict)
    resources: list[tuple[str, _Src, list[str], dict[str, Any]]] = field(default_factory=list)
    """(lockgate kind, source, comment lines, tree) in input order; Services and Routes are added last."""

    def service(self, src: _Src, loc: Loc, namespace: str, name: str) -> _Service:
        key = (namespace, name)
        if key not in self.services:
            self.services[key] = _Service(namespace, name, (src, loc))
        return self.services[key]

    def version(self, src: _Src, loc: Loc, namespace: str, service: str, subset: str | None) -> list[tuple[str, str]]:
        """The version(s) a destination with this subset reaches, each with its note."""
        svc = self.service(src, loc, namespace, service)
        known = self.subsets.get((namespace, service), {})
        if subset is not None:
            if subset in known:
                version, where = known[subset]
                return [(version, f"{src.note(loc)}; subset {subset}: {where}")]
            src.warn(loc, f"subset {subset!r} of {service} is defined by no DestinationRule given: imported as "
                          "version of the same name")
            version = _label(src, subset, loc, "subset")
            svc.versions.setdefault(version, src.note(loc))
            return [(version, src.note(loc))]
        versions = list(dict.fromkeys(v for v, _ in known.values()))
        if len(versions) == 1:
            return [(versions[0], f"{src.note(loc)}; no subset: the one version of {service}")]
        if versions:
            src.warn(loc, f"no subset: Istio balances over every instance of {service}; lockgate routes by "
                          f"version: split evenly over {', '.join(versions)}")
            return [(v, f"{src.note(loc)}; no subset: an even share of each version") for v in versions]
        src.guess(loc, f"no subset and no DestinationRule subsets for {service}: routed to version v1 (a guess: "
                       "name the version its Workloads run)")
        svc.versions.setdefault("v1", f"guessed: no version of {service} is named in the Istio YAML")
        return [("v1", f"{src.note(loc)}; guessed version: no subset and no DestinationRule subsets")]


# --- VirtualService -----------------------------------------------------------------------------------

_HTTP_RULE_WHY = {
    "corsPolicy": "CORS is not a lockgate Route setting",
    "delegate": "lockgate has no delegated VirtualServices",
    "mirrors": "lockgate mirrors to one version",
}
_MATCH_WHY = {
    "withoutHeaders": "a header that must be absent has no lockgate equivalent",
    "sourceLabels": "matching on the caller's labels has no lockgate equivalent",
    "sourceNamespace": "matching on the caller's namespace has no lockgate equivalent",
    "gateways": "a per-match gateway has no lockgate equivalent",
    "ignoreUriCase": "case-insensitive paths have no lockgate equivalent",
    "authority": "matching the authority has no lockgate equivalent",
    "scheme": "matching the scheme has no lockgate equivalent",
    "port": "matching the port has no lockgate equivalent",
    "statPrefix": "a per-match stat prefix has no lockgate equivalent",
}
_BROADER = "dropped, so this match is broader than Istio's"


def _virtual_service(src: _Src, spec: dict[str, Any], st: _State) -> None:
    loc: Loc = ("spec",)
    hosts = [(j, h) for j, h in enumerate(src.as_list(spec.get("hosts"), ("spec", "hosts")))
             if src.as_str(h, ("spec", "hosts", j)) is not None]
    gateways = [g for j, g in enumerate(src.as_list(spec.get("gateways"), ("spec", "gateways")))
                if src.as_str(g, ("spec", "gateways", j)) is not None]
    exposed = [g for g in gateways if g != "mesh"]
    in_mesh = not gateways or "mesh" in gateways
    for kind in ("tcp", "tls"):
        for j, _ in enumerate(src.as_list(spec.get(kind), ("spec", kind))):
            src.warn(("spec", kind, j), f"{kind} routes have no lockgate equivalent (lockgate routes HTTP): "
                                        "not imported")
    src.rest(spec, loc, {"hosts", "gateways", "http", "tcp", "tls"},
             {"exportTo": "visibility: lockgate Routes apply wherever the service is called"})
    rules = src.as_list(spec.get("http"), ("spec", "http"))
    services: list[tuple[str, str]] = []
    for i, rule in enumerate(rules):
        rule = src.as_map(rule, ("spec", "http", i)) or {}
        for j, d in enumerate(src.as_list(rule.get("route"), ("spec", "http", i, "route"))):
            dest = src.as_map((d or {}).get("destination") if isinstance(d, dict) else None,
                           ("spec", "http", i, "route", j, "destination")) or {}
            host = dest.get("host")
            if isinstance(host, str) and (svc := _service_of(host, src.namespace)) is not None:
                services.append(svc)
    if not services:
        targets = [s for _, h in hosts if (s := _service_of(h, src.namespace)) is not None]
        if not targets:
            src.warn(loc, "no destination names a service of the mesh: not imported")
            return
        services = targets[:1]
    ns, service = max(dict.fromkeys(services), key=services.count)  # the most named; the first on a tie
    if not _LABEL.match(service) or not _LABEL.match(ns):
        src.error(loc, f"service {service!r} in namespace {ns!r}: not a lockgate name (a DNS label)")
        return
    converted = []
    for i, rule in enumerate(rules):
        if isinstance(rule, dict):
            out = _http_rule(src, ("spec", "http", i), rule, ns, service, st)
            if out is not None:
                converted.append(out)
    if not converted:
        src.warn(("spec", "http"), "no HTTP rule left to import: no Route written")
        return
    route_hosts: list[Val] = []
    if exposed:
        via = ", ".join(exposed)
        for j, h in hosts:
            route_hosts.append(src.val(h, ("spec", "hosts", j), f"exposed at lockgate's ingress (gateways: {via})"))
        if not in_mesh:
            src.warn(("spec", "gateways"), f"bound only to {via}: in lockgate a Route's rules apply inside the mesh "
                                           f"too (calls to {service} from other services), not only at the ingress")
    if in_mesh:
        for j, h in hosts:
            target = _service_of(h, src.namespace)
            if target is not None and target != (ns, service):
                src.warn(("spec", "hosts", j), f"host {h!r} is service {target[1]} in {target[0]}, but the rules "
                                               f"route to {service}: a lockgate Route belongs to the service it "
                                               f"routes to, so calls to {target[1]} are not changed")
            elif target is None and not exposed:
                src.warn(("spec", "hosts", j), f"host {h!r} is not a service of the mesh: lockgate exposes such "
                                               "names only for a VirtualService bound to a gateway: not imported")
    key = (ns, service)
    route = st.routes.get(key)
    if route is None:
        name = _label(src, src.name, ("metadata", "name"), "name")
        route = st.routes[key] = _Route(src=src, name=name, service=service)
    else:
        src.warn(("metadata", "name"), f"a second VirtualService for {service} (the first: {route.src.kind} "
                                       f"{route.src.name} at {route.src.where(())}): lockgate has one Route per "
                                       "service, so its rules follow the first's and apply at the ingress and "
                                       "inside the mesh alike")
    known = {h.value for h in route.hosts}
    route.hosts += [h for h in route_hosts if h.value not in known]
    for rule in converted:
        named = rule.get("name")
        if isinstance(named, Val):
            base, n = str(named.value), 2
            while str(named.value) in route.rule_names:
                named = Val(f"{base[:60]}-{n}", f"{named.note}; renamed: the Route already has a rule {base!r}")
                n += 1
            rule["name"] = named
            route.rule_names.add(str(named.value))
        route.http.append(rule)


def _http_rule(src: _Src, loc: Loc, rule: dict[str, Any], ns: str, service: str, st: _State) -> dict[str, Any] | None:
    if "delegate" in rule:
        src.warn((*loc, "delegate"), "lockgate has no delegated VirtualServices: this rule is not imported")
        return None
    src.rest(rule, loc, {"name", "match", "route", "redirect", "directResponse", "rewrite", "timeout", "retries",
                         "fault", "mirror", "mirrorPercentage", "mirrorPercent", "mirror_percent", "mirrors",
                         "headers"}, _HTTP_RULE_WHY)
    out: dict[str, Any] = {}
    if (name := src.as_str(rule.get("name"), (*loc, "name"))) is not None:
        out["name"] = src.val(_label(src, name, (*loc, "name"), "rule name"), (*loc, "name"))
    matches = []
    for j, m in enumerate(src.as_list(rule.get("match"), (*loc, "match"))):
        if (mm := src.as_map(m, (*loc, "match", j))) is not None:
            matches.append(Noted(_match(src, (*loc, "match", j), mm), src.note((*loc, "match", j))))
    if matches:
        out["match"] = matches
    if "route" in rule:
        dests = _destinations(src, (*loc, "route"), src.as_list(rule["route"], (*loc, "route")), ns, service, st)
        if dests is None:
            return None
        out["route"] = dests
    if (r := src.as_map(rule.get("redirect"), (*loc, "redirect"))) is not None:
        red: dict[str, Any] = {}
        for k in ("uri", "authority"):
            if (v := src.as_str(r.get(k), (*loc, "redirect", k))) is not None:
                red[k] = src.val(v, (*loc, "redirect", k))
        if (code := src.as_int(r.get("redirectCode"), (*loc, "redirect", "redirectCode"))) is not None:
            red["redirectCode"] = src.val(code, (*loc, "redirect", "redirectCode"))
        src.rest(r, (*loc, "redirect"), {"uri", "authority", "redirectCode"})
        out["redirect"] = red
    if (d := src.as_map(rule.get("directResponse"), (*loc, "directResponse"))) is not None:
        direct: dict[str, Any] = {}
        if (status := src.as_int(d.get("status"), (*loc, "directResponse", "status"))) is not None:
            direct["status"] = src.val(status, (*loc, "directResponse", "status"))
        body = src.as_map(d.get("body"), (*loc, "directResponse", "body")) or {}
        if (text := src.as_str(body.get("string"), (*loc, "directResponse", "body", "string"))) is not None:
            direct["body"] = src.val(text, (*loc, "directResponse", "body", "string"))
        src.rest(body, (*loc, "directResponse", "body"), {"string"}, {"bytes": "a binary body is not supported"})
        src.rest(d, (*loc, "directResponse"), {"status", "body"})
        out["directResponse"] = direct
    if (rw := src.as_map(rule.get("rewrite"), (*loc, "rewrite"))) is not None:
        rewrite: dict[str, Any] = {}
        for k in ("uri", "authority"):
            if (v := src.as_str(rw.get(k), (*loc, "rewrite", k))) is not None:
                rewrite[k] = src.val(v, (*loc, "rewrite", k))
        src.rest(rw, (*loc, "rewrite"), {"uri", "authority"},
                 {"uriRegexRewrite": "a regex rewrite has no lockgate equivalent"})
        if rewrite:
            out["rewrite"] = rewrite
    if "timeout" in rule and (t := src.duration(rule["timeout"], (*loc, "timeout"))) is not None:
        out["timeout"] = t
    if (retries := _retries(src, (*loc, "retries"), rule.get("retries"))) is not None:
        out["retries"] = retries
    if (fault := _fault(src, (*loc, "fault"), rule.get("fault"))) is not None:
        out["fault"] = fault
    if (mirror := _mirror(src, loc, rule, ns, service, st)) is not None:
        out["mirror"] = mirror
    if (headers := _headers(src, (*loc, "headers"), rule.get("headers"))) is not None:
        out["headers"] = headers
    return out


def _string_match(src: _Src, loc: Loc, value: Any, *, presence: bool = False) -> dict[str, Any] | None:
    m = src.as_map(value, loc)
    if m is None:
        return None
    if not m and presence:
        return {"present": Val(True, src.note(loc, "an empty match: the header is present, any value"))}
    out = {k: src.val(v, (*loc, k)) for k in ("exact", "prefix", "regex")
           if (v := (m.get(k) if isinstance(m.get(k), str) else None)) is not None}
    for k in ("exact", "prefix", "regex"):
        if k in m and k not in out:
            src.error((*loc, k), f"expected a string, got {_type(m[k])}")
    src.rest(m, loc, {"exact", "prefix", "regex"})
    if len(out) != 1:
        src.error(loc, "give exactly one of exact, prefix, regex")
        return None
    return out


def _match(src: _Src, loc: Loc, m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "uri" in m and (uri := _string_match(src, (*loc, "uri"), m["uri"])) is not None:
        out["uri"] = uri
    for field_, target in (("headers", "headers"), ("queryParams", "queryParams")):
        group = src.as_map(m.get(field_), (*loc, field_)) or {}
        conditions = {}
        for name, cond in group.items():
            key = name.lower() if field_ == "headers" else name
            if (c := _string_match(src, (*loc, field_, name), cond, presence=True)) is not None:
                conditions[key] = c
        if conditions:
            out[target] = conditions
    if "method" in m and (method := _string_match(src, (*loc, "method"), m["method"])) is not None:
        value = method.get("exact")
        if isinstance(value, Val) and str(value.value).upper() in METHODS:
            out["method"] = Val(str(value.value).upper(), value.note)
        else:
            src.warn((*loc, "method"), f"only an exact method is supported: {_BROADER}")
    src.rest(m, loc, {"uri", "headers", "queryParams", "method", "name"}, _MATCH_WHY, effect=_BROADER)
    return out


def _destinations(src: _Src, loc: Loc, route: list[Any], ns: str, service: str, st: _State) -> list[Any] | None:
    """The weighted versions, or None when none of them is this service's (the rule is not imported)."""
    entries: list[tuple[list[tuple[str, str]], int | None, Loc, dict[str, Any] | None]] = []
    foreign = []
    for j, d in enumerate(route):
        at: Loc = (*loc, j)
        d = src.as_map(d, at) or {}
        dest = src.as_map(d.get("destination"), (*at, "destination")) or {}
        host = src.as_str(dest.get("host"), (*at, "destination", "host"))
        if host is None:
            src.error((*at, "destination"), "a destination needs a host")
            continue
        target = _service_of(host, src.namespace)
        if target != (ns, service):
            foreign.append((at, host))
            continue
        src.rest(d, at, {"destination", "weight", "headers"})
        src.rest(dest, (*at, "destination"), {"host", "subset", "port"})
        port = src.as_map(dest.get("port"), (*at, "destination", "port")) or {}
        if (number := src.as_int(port.get("number"), (*at, "destination", "port", "number"))) is not None:
            svc = st.service(src, at, ns, service)
            svc.ports.setdefault(number, ("http", src.note((*at, "destination", "port", "number"))))
        subset = src.as_str(dest.get("subset"), (*at, "destination", "subset"))
        versions = st.version(src, (*at, "destination", "subset") if subset else (*at, "destination"), ns, service,
                              subset)
        weight = src.as_int(d.get("weight"), (*at, "weight")) if "weight" in d else None
        entries.append((versions, weight, at, _headers(src, (*at, "headers"), d.get("headers"))))
    for at, host in foreign:
        src.warn(at, f"routes to {host}, not {service}: a lockgate Route routes to versions of one service"
                     + (": this rule is not imported" if not entries else ": this destination is not imported"))
    if not entries:
        if not foreign:
            src.warn(loc, "no destination: this rule is not imported")
        return None
    if len(entries) == 1 and entries[0][1] is None:
        raw = [100]
    else:
        raw = [w if w is not None else 0 for _, w, _, _ in entries]
    # each version's share: a destination without a subset splits its weight evenly over the versions
    shares: list[tuple[str, float, str, dict[str, Any] | None, Loc]] = []
    for (versions, _w, at, headers), weight in zip(entries, raw, strict=True):
        for version, note in versions:
            shares.append((version, weight / len(versions), note, headers, at))
    total = sum(s for _, s, _, _, _ in shares)
    if total <= 0:
        src.warn(loc, "every weight is 0: this rule is not imported")
        return None
    if round(total, 6) != 100:
        src.warn(loc, f"weights sum to {total:g}, not 100: scaled to 100")
    merged: dict[str, list[Any]] = {}
    for version, share, note, headers, at in shares:
        if version in merged:
            merged[version][1] += share
            if headers is not None:
                src.warn(at, f"a second destination to version {version}: merged, its headers not imported")
        else:
            merged[version] = [version, share, note, headers, at]
    weights = _largest_remainder([m[1] * 100 / total for m in merged.values()])
    out = []
    for (version, _share, note, headers, at), weight in zip(merged.values(), weights, strict=True):
        entry: dict[str, Any] = {"version": Val(version, note),
                                "weight": Val(weight, src.note((*at, "weight")) if len(entries) > 1 or
                                              entries[0][1] is not None else
                                              src.note(at, "one destination: all of the traffic"))}
        if headers is not None:
            entry["headers"] = headers
        out.append(entry)
    return out


def _largest_remainder(values: list[float]) -> list[int]:
    """Whole percents summing to 100, each within 1 of its exact share."""
    floors = [int(v) for v in values]
    rest = 100 - sum(floors)
    order = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for i in order[:rest]:
        floors[i] += 1
    return floors


def _headers(src: _Src, loc: Loc, value: Any) -> dict[str, Any] | None:
    h = src.as_map(value, loc)
    if h is None:
        return None
    out: dict[str, Any] = {}
    for side in ("request", "response"):
        ops = src.as_map(h.get(side), (*loc, side))
        if ops is None:
            continue
        side_out: dict[str, Any] = {}
        for op in ("set", "add"):
            values = src.as_map(ops.get(op), (*loc, side, op)) or {}
            edits = {k: src.val(v, (*loc, side, op, k)) for k, v in values.items()
                     if src.as_str(v, (*loc, side, op, k)) is not None}
            if edits:
                side_out[op] = edits
        removes = [src.val(v, (*loc, side, "remove", j))
                   for j, v in enumerate(src.as_list(ops.get("remove"), (*loc, side, "remove")))
                   if src.as_str(v, (*loc, side, "remove", j)) is not None]
        if removes:
            side_out["remove"] = removes
        src.rest(ops, (*loc, side), {"set", "add", "remove"})
        if side_out:
            out[side] = side_out
    src.rest(h, loc, {"request", "response"})
    return out or None


def _percentage(src: _Src, loc: Loc, m: dict[str, Any], key: str = "percentage") -> Val | None:
    """Istio's `percentage: {value: N}` (`mirrorPercentage` on a rule) or the older whole-number forms."""
    if key in m:
        p = src.as_map(m[key], (*loc, key)) or {}
        value = p.get("value")
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100:
            return src.val(value, (*loc, key, "value"))
        src.error((*loc, key), f"expected {{value: 0-100}}, got {_short(m[key])}")
        return None
    for old in ("percent", "mirrorPercent", "mirror_percent"):
        if old in m and (n := src.as_int(m[old], (*loc, old))) is not None:
            return src.val(n, (*loc, old), "the deprecated whole-number form")
    return None


def _fault(src: _Src, loc: Loc, value: Any) -> dict[str, Any] | None:
    f = src.as_map(value, loc)
    if f is None:
        return None
    out: dict[str, Any] = {}
    if (d := src.as_map(f.get("delay"), (*loc, "delay"))) is not None:
        delay: dict[str, Any] = {}
        if "fixedDelay" in d and (t := src.duration(d["fixedDelay"], (*loc, "delay", "fixedDelay"))) is not None:
            delay["fixedDelay"] = t
        pct = _percentage(src, (*loc, "delay"), d)
        src.rest(d, (*loc, "delay"), {"fixedDelay", "percentage", "percent"},
                 {"exponentialDelay": "an exponential delay has no lockgate equivalent"})
        if pct is None:
            src.warn((*loc, "delay"), "no percentage: Istio delays no request then: not imported")
        elif "fixedDelay" in delay:
            out["delay"] = {"percentage": pct, **delay}
    if (a := src.as_map(f.get("abort"), (*loc, "abort"))) is not None:
        abort: dict[str, Any] = {}
        if (status := src.as_int(a.get("httpStatus"), (*loc, "abort", "httpStatus"))) is not None:
            abort["httpStatus"] = src.val(status, (*loc, "abort", "httpStatus"))
        pct = _percentage(src, (*loc, "abort"), a)
        src.rest(a, (*loc, "abort"), {"httpStatus", "percentage", "percent"},
                 {"grpcStatus": "a gRPC status abort has no lockgate equivalent",
                  "http2Error": "an HTTP/2 error abort has no lockgate equivalent"})
        if pct is None:
            src.warn((*loc, "abort"), "no percentage: Istio aborts no request then: not imported")
        elif abort:
            out["abort"] = {"percentage": pct, **abort}
    src.rest(f, loc, {"delay", "abort"})
    return out or None


def _retries(src: _Src, loc: Loc, value: Any) -> dict[str, Any] | None:
    r = src.as_map(value, loc)
    if r is None:
        return None
    attempts = src.as_int(r.get("attempts"), (*loc, "attempts"))
    src.rest(r, loc, {"attempts", "perTryTimeout", "retryOn"},
             {"retryRemoteLocalities": "retrying in other localities has no lockgate equivalent",
              "retryIgnorePreviousHosts": "lockgate's retries always try another instance"})
    if attempts is None:
        src.warn(loc, "no attempts: not imported (lockgate's default retries are Istio's: 2, on the same "
                      "conditions)")
        return None
    out: dict[str, Any] = {"attempts": src.val(min(max(attempts, 0), 10), (*loc, "attempts"))}
    if attempts > 10:
        src.warn((*loc, "attempts"), f"{attempts} attempts: lockgate allows at most 10: imported as 10")
    if "perTryTimeout" in r and (t := src.duration(r["perTryTimeout"], (*loc, "perTryTimeout"))) is not None:
        out["perTryTimeout"] = t
    on = src.as_str(r.get("retryOn"), (*loc, "retryOn"))
    if on is None:
        out["retryOn"] = Val(ISTIO_RETRY_ON, src.note(loc, "no retryOn: Istio's default conditions"))
    else:
        words = [w.strip() for w in on.split(",") if w.strip()]
        kept = [w for w in words if w in RETRY_ON or w.isdigit()]
        for w in words:
            if w not in kept:
                src.warn((*loc, "retryOn"), f"retry condition {w!r} is not one Envoy knows: not imported")
        if kept:
            out["retryOn"] = src.val(",".join(kept), (*loc, "retryOn"))
    return out


def _mirror(src: _Src, loc: Loc, rule: dict[str, Any], ns: str, service: str, st: _State) -> dict[str, Any] | None:
    mirrors = src.as_list(rule.get("mirrors"), (*loc, "mirrors"))
    if "mirror" in rule:
        at, m, pct_from = (*loc, "mirror"), src.as_map(rule["mirror"], (*loc, "mirror")), loc
        for j, _ in enumerate(mirrors):
            src.warn((*loc, "mirrors", j), "lockgate mirrors to one version (the `mirror` one): not imported")
    elif mirrors:
        first = src.as_map(mirrors[0], (*loc, "mirrors", 0)) or {}
        at, m, pct_from = (*loc, "mirrors", 0, "destination"), src.as_map(first.get("destination"),
                                                                       (*loc, "mirrors", 0, "destination")), \
            (*loc, "mirrors", 0)
        for j in range(1, len(mirrors)):
            src.warn((*loc, "mirrors", j), "lockgate mirrors to one version: not imported")
    else:
        return None
    if m is None:
        return None
    host = src.as_str(m.get("host"), (*at, "host"))
    if host is None or _service_of(host, src.namespace) != (ns, service):
        src.warn(at, f"mirrors to {host}, not {service}: lockgate mirrors to a version of the same service: "
                     "not imported")
        return None
    src.rest(m, at, {"host", "subset", "port"})
    subset = src.as_str(m.get("subset"), (*at, "subset"))
    versions = st.version(src, (*at, "subset") if subset else at, ns, service, subset)
    if len(versions) > 1:
        src.warn(at, f"lockgate mirrors to one version: imported as {versions[0][0]}")
    out: dict[str, Any] = {"version": Val(*versions[0])}
    pct = (_percentage(src, loc, rule, "mirrorPercentage") if pct_from == loc
           else _percentage(src, pct_from, src.as_map(mirrors[0], pct_from) or {}))
    if pct is not None:
        out["percentage"] = pct
    return out


# --- DestinationRule ----------------------------------------------------------------------------------

_LB_SIMPLE = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST",
              "RANDOM": "RANDOM"}


def _settings(src: _Src, loc: Loc, value: Any, comments: list[str]) -> dict[str, Any]:
    """A trafficPolicy's settings (loadBalancer, connectionPool, outlierDetection); its `tls` is a comment."""
    p = src.as_map(value, loc)
    if p is None:
        return {}
    out: dict[str, Any] = {}
    if (lb := src.as_map(p.get("loadBalancer"), (*loc, "loadBalancer"))) is not None:
        lb_out: dict[str, Any] = {}
        if "simple" in lb:
            simple = lb["simple"]
            if simple in _LB_SIMPLE:
                extra = "LEAST_CONN is Istio's older name of LEAST_REQUEST" if simple == "LEAST_CONN" else ""
                lb_out["simple"] = src.val(_LB_SIMPLE[simple], (*loc, "loadBalancer", "simple"), extra)
            else:
                src.warn((*loc, "loadBalancer", "simple"), f"{simple!r} has no lockgate equivalent: not imported")
        if (ch := src.as_map(lb.get("consistentHash"), (*loc, "loadBalancer", "consistentHash"))) is not None:
            at: Loc = (*loc, "loadBalancer", "consistentHash")
            ch_out: dict[str, Any] = {}
            for k in ("httpHeaderName", "httpQueryParameterName"):
                if (v := src.as_str(ch.get(k), (*at, k))) is not None:
                    ch_out[k] = src.val(v, (*at, k))
            if ch.get("useSourceIp") is True:
                ch_out["useSourceIp"] = src.val(True, (*at, "useSourceIp"))
            if (cookie := src.as_map(ch.get("httpCookie"), (*at, "httpCookie"))) is not None:
                c_out = {k: src.val(v, (*at, "httpCookie", k)) for k in ("name", "path", "ttl")
                         if (v := src.as_str(cookie.get(k), (*at, "httpCookie", k))) is not None}
                src.rest(cookie, (*at, "httpCookie"), {"name", "path", "ttl"})
                ch_out["httpCookie"] = c_out
            src.rest(ch, at, {"httpHeaderName", "httpQueryParameterName", "useSourceIp", "httpCookie"},
                     {"minimumRingSize": "the ring size is Envoy's default in lockgate",
                      "ringHash": "the ring size is Envoy's default in lockgate",
                      "maglev": "lockgate hashes with a ring, not Maglev"})
            if ch_out:
                lb_out["consistentHash"] = ch_out
        src.rest(lb, (*loc, "loadBalancer"), {"simple", "consistentHash"},
                 {"localityLbSetting": "locality load balancing is not a lockgate TrafficPolicy setting yet",
                  "warmupDurationSecs": "slow start has no lockgate equivalent"})
        if len(lb_out) == 1:
            out["loadBalancer"] = lb_out
    if (pool := src.as_map(p.get("connectionPool"), (*loc, "connectionPool"))) is not None:
        pool_out: dict[str, Any] = {}
        groups = {"tcp": (("maxConnections",), ("connectTimeout",)),
                  "http": (("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries"),
                           ())}
        for group, (numbers, durations) in groups.items():
            g = src.as_map(pool.get(group), (*loc, "connectionPool", group))
            if g is None:
                continue
            g_out: dict[str, Any] = {}
            for k in numbers:
                if (n := src.as_int(g.get(k), (*loc, "connectionPool", group, k))) is not None:
                    if n >= (0 if k == "maxRetries" else 1):
                        g_out[k] = src.val(n, (*loc, "connectionPool", group, k))
                    else:
                        src.warn((*loc, "connectionPool", group, k), f"{n} (Istio's 'unset'): not imported")
            for k in durations:
                if k in g and (t := src.duration(g[k], (*loc, "connectionPool", group, k))) is not None:
                    g_out[k] = t
            src.rest(g, (*loc, "connectionPool", group), {*numbers, *durations})
            if g_out:
                pool_out[group] = g_out
        src.rest(pool, (*loc, "connectionPool"), {"tcp", "http"})
        if pool_out:
            out["connectionPool"] = pool_out
    if (od := src.as_map(p.get("outlierDetection"), (*loc, "outlierDetection"))) is not None:
        at = (*loc, "outlierDetection")
        od_out: dict[str, Any] = {}
        for k in ("consecutive5xxErrors", "maxEjectionPercent"):
            if (n := src.as_int(od.get(k), (*at, k))) is not None:
                od_out[k] = src.val(n, (*at, k))
        for k in ("interval", "baseEjectionTime"):
            if k in od and (t := src.duration(od[k], (*at, k))) is not None:
                od_out[k] = t
        src.rest(od, at, {"consecutive5xxErrors", "maxEjectionPercent", "interval", "baseEjectionTime"},
                 {"consecutiveErrors": "the deprecated count of gateway errors (502, 503, 504) has no lockgate "
                                       "equivalent; consecutive5xxErrors has",
                  "consecutiveGatewayErrors": "counting only gateway errors has no lockgate equivalent",
                  "consecutiveLocalOriginFailures": "local-origin failures have no lockgate equivalent",
                  "splitExternalLocalOriginErrors": "local-origin failures have no lockgate equivalent",
                  "minHealthPercent": "a panic threshold has no lockgate equivalent"})
        if od_out:
            out["outlierDetection"] = od_out
    if (tls := src.as_map(p.get("tls"), (*loc, "tls"))) is not None:
        mode = tls.get("mode")
        if mode == "ISTIO_MUTUAL":
            comments.append(f"{src.note((*loc, 'tls', 'mode'))}: ISTIO_MUTUAL is what lockgate sidecars always "
                            "do (mTLS with the mesh's certificates)")
            src.rest(tls, (*loc, "tls"), {"mode"})
        else:
            src.warn((*loc, "tls", "mode"), f"tls mode {mode}: lockgate sidecars always originate mTLS with the "
                                            "mesh's certificates: not imported")
    src.rest(p, loc, {"loadBalancer", "connectionPool", "outlierDetection", "tls"},
             {"portLevelSettings": "per-port settings have no lockgate equivalent",
              "proxyProtocol": "PROXY protocol has no lockgate equivalent",
              "tunnel": "tunnelling has no lockgate equivalent"})
    return out


def _subsets(src: _Src, spec: dict[str, Any], st: _State) -> None:
    """First pass: each subset's version, so VirtualServices anywhere in the input can name them."""
    host = spec.get("host")
    target = _service_of(host, src.namespace) if isinstance(host, str) else None
    if target is None:
        return
    known = st.subsets.setdefault(target, {})
    svc = st.service(src, ("spec", "host"), *target)
    subsets = spec.get("subsets")
    for j, s in enumerate(subsets if isinstance(subsets, list) else []):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            continue
        at: Loc = ("spec", "subsets", j)
        labels = s.get("labels")
        version = labels.get("version") if isinstance(labels, dict) else None
        if isinstance(version, str) and _LABEL.match(version):
            note = src.note((*at, "labels", "version"))
        else:
            version = re.sub(r"[^a-z0-9-]+", "-", s["name"].lower()).strip("-") or "x"
            note = src.note((*at, "name"), "no labels.version: the subset's name as the version")
        known.setdefault(s["name"], (version, note))
        svc.versions.setdefault(version, note)


def _destination_rule(src: _Src, spec: dict[str, Any], st: _State) -> None:
    host = src.as_str(spec.get("host"), ("spec", "host"))
    if host is None:
        src.error(("spec",), "a DestinationRule needs a host")
        return
    target = _service_of(host, src.namespace)
    if target is None:
        src.warn(("spec", "host"), f"host {host!r} is not a service of the mesh (a wildcard or an external "
                                   "name): not imported")
        return
    ns, service = target
    comments: list[str] = []
    src.rest(spec, ("spec",), {"host", "trafficPolicy", "subsets"},
             {"exportTo": "visibility: lockgate TrafficPolicies apply wherever the service is called",
              "workloadSelector": "lockgate applies a TrafficPolicy at every caller"})
    settings = _settings(src, ("spec", "trafficPolicy"), spec.get("trafficPolicy"), comments)
    versions = []
    for j, s in enumerate(src.as_list(spec.get("subsets"), ("spec", "subsets"))):
        at: Loc = ("spec", "subsets", j)
        s = src.as_map(s, at) or {}
        name = src.as_str(s.get("name"), (*at, "name"))
        if name is None:
            src.error(at, "a subset needs a name")
            continue
        labels = src.as_map(s.get("labels"), (*at, "labels")) or {}
        version = st.subsets.get(target, {}).get(name, (name, ""))[0]
        if "version" not in labels:
            src.warn((*at, "labels"), f"no version label: lockgate selects instances by version: the subset is "
                                      f"version {version!r}")
        for k in labels:
            if k != "version":
                src.warn((*at, "labels", k), "lockgate selects a version's instances by version only: this "
                                             "label is not matched")
        src.rest(s, at, {"name", "labels", "trafficPolicy"})
        sub = _settings(src, (*at, "trafficPolicy"), s.get("trafficPolicy"), comments)
        if sub:
            versions.append({"version": src.val(version, (*at, "labels", "version") if "version" in labels
                                                else (*at, "name")), **sub})
    if not settings and not versions:  # nothing but tls (or nothing): the comment goes with the Service
        st.service(src, ("spec", "host"), ns, service).comments.extend(comments)
        return
    body: dict[str, Any] = {"service": src.val(service, ("spec", "host")), **settings}
    if versions:
        body["versions"] = versions
    st.resources.append(("TrafficPolicy", src, comments, _envelope(src, "TrafficPolicy", ns, body)))


# --- security -------------------------------------------------------------------------------------------


def _selector(src: _Src, spec: dict[str, Any], st: _State, *, kind: str) -> tuple[bool, dict[str, Any] | None]:
    """(usable, the lockgate selector or None for the whole namespace)."""
    for ref in ("targetRef", "targetRefs"):
        if ref in spec:
            src.warn(("spec", ref), f"{ref} (a Gateway API attachment) has no lockgate equivalent: not imported")
            return False, None
    sel = src.as_map(spec.get("selector"), ("spec", "selector"))
    if sel is None:
        return True, None
    labels = src.as_map(sel.get("matchLabels"), ("spec", "selector", "matchLabels")) or {}
    src.rest(sel, ("spec", "selector"), {"matchLabels"})
    if not labels:
        return True, None
    app = labels.get("app")
    if not isinstance(app, str) or not _LABEL.match(app):
        src.warn(("spec", "selector", "matchLabels"), "lockgate selects a service by name (the `app` label): "
                                                      f"without one this {kind} is not imported")
        return False, None
    for k in labels:
        if k != "app":
            src.warn(("spec", "selector", "matchLabels", k), f"lockgate selects a whole service: the {k} label is "
                                                             "not matched (the policy applies to every version)")
    st.service(src, ("spec", "selector", "matchLabels", "app"), src.namespace, app)
    return True, {"service": src.val(app, ("spec", "selector", "matchLabels", "app"), "the app label names the "
                                                                                       "service")}


def _peer_authentication(src: _Src, spec: dict[str, Any], st: _State) -> None:
    usable, selector = _selector(src, spec, st, kind="PeerAuthentication")
    if not usable:
        return
    src.rest(spec, ("spec",), {"selector", "mtls"},
             {"portLevelMtls": "per-port modes have no lockgate equivalent"})
    mtls = src.as_map(spec.get("mtls"), ("spec", "mtls")) or {}
    mode = mtls.get("mode", "UNSET")
    src.rest(mtls, ("spec", "mtls"), {"mode"})
    if mode in (None, "UNSET"):
        src.warn(("spec", "mtls"), "mode UNSET (inherit): lockgate inherits when there is no PeerAuthentication: "
                                   "not imported")
        return
    if mode == "DISABLE":
        src.warn(("spec", "mtls", "mode"), "DISABLE: lockgate sidecars have no plaintext-only mode: imported as "
                                           "PERMISSIVE (mTLS and plaintext accepted)")
        mode_val = src.val("PERMISSIVE", ("spec", "mtls", "mode"), "DISABLE has no lockgate equivalent")
    elif mode in ("STRICT", "PERMISSIVE"):
        mode_val = src.val(mode, ("spec", "mtls", "mode"))
    else:
        src.error(("spec", "mtls", "mode"), f"unknown mode {mode!r} (STRICT, PERMISSIVE, DISABLE, UNSET)")
        return
    if src.namespace == ROOT_NAMESPACE and selector is None:
        src.warn(("metadata", "namespace"), f"a PeerAuthentication in {ROOT_NAMESPACE} is mesh-wide: in lockgate "
                                            f"set `mtls: {{mode: {mode_val.value}}}` in the Mesh: not imported")
        return
    body: dict[str, Any] = {}
    if selector is not None:
        body["selector"] = selector
    body["mtls"] = Noted({"mode": mode_val}, src.note(("spec", "mtls")))
    st.resources.append(("PeerAuthentication", src, [], _envelope(src, "PeerAuthentication", src.namespace, body)))


_SOURCE_WHY = {k: "has no lockgate equivalent" for k in (
    "notPrincipals", "requestPrincipals", "notRequestPrincipals", "notNamespaces", "ipBlocks", "notIpBlocks",
    "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts")}
_OPERATION_WHY = {k: "has no lockgate equivalent" for k in ("hosts", "notHosts", "notMethods", "notPaths", "notPorts")}


def _authorization_policy(src: _Src, spec: dict[str, Any], st: _State) -> None:
    usable, selector = _selector(src, spec, st, kind="AuthorizationPolicy")
    if not usable:
        return
    action = spec.get("action", "ALLOW")
    if action not in ("ALLOW", "DENY"):
        src.warn(("spec", "action"), f"action {action}: lockgate policies ALLOW or DENY: not imported")
        return
    src.rest(spec, ("spec",), {"selector", "action", "rules"}, {"provider": "an external authorizer has no "
                                                                            "lockgate equivalent"})
    if src.namespace == ROOT_NAMESPACE:
        src.warn(("metadata", "namespace"), f"a policy in {ROOT_NAMESPACE} is mesh-wide in Istio; lockgate "
                                            "policies are per namespace: not imported")
        return
    allow = action == "ALLOW"
    # ALLOW: a rule with a condition lockgate cannot express would allow more, so the rule goes (fails closed);
    # DENY: the condition goes, so the rule denies more (fails closed too).
    effect = "this ALLOW rule is not imported (it would allow more than in Istio)" if allow else \
        "dropped, so this DENY rule denies more than in Istio"
    rules = []
    for k, rule in enumerate(src.as_list(spec.get("rules"), ("spec", "rules"))):
        at: Loc = ("spec", "rules", k)
        rule = src.as_map(rule, at)
        if rule is None:
            continue
        lossy = False

        def lost(loc: Loc, what: str, why: str = "has no lockgate equivalent") -> None:
            nonlocal lossy
            lossy = True
            src.warn(loc, f"{what} {why}: {effect}")

        out_rule: dict[str, Any] = {}
        for key, inner, fields, why, convert in (
            ("from", "source", ("principals", "namespaces"), _SOURCE_WHY, _principal_value(src, st)),
            ("to", "operation", ("methods", "paths", "ports"), _OPERATION_WHY, _operation_value(src)),
        ):
            entries = []
            for j, entry in enumerate(src.as_list(rule.get(key), (*at, key))):
                e = src.as_map(entry, (*at, key, j)) or {}
                cond = src.as_map(e.get(inner), (*at, key, j, inner)) or {}
                for extra in e:
                    if extra != inner:
                        lost((*at, key, j, extra), extra)
                out_entry: dict[str, Any] = {}
                for f in fields:
                    values = []
                    for n, v in enumerate(src.as_list(cond.get(f), (*at, key, j, inner, f))):
                        converted = convert(f, v, (*at, key, j, inner, f, n))
                        if converted is not None:
                            values.append(converted)
                    if values:
                        out_entry[f] = values
                for extra in cond:
                    if extra not in fields:
                        lost((*at, key, j, inner, extra), extra, why.get(extra, "has no lockgate equivalent"))
                if out_entry:
                    entries.append(Noted(out_entry, src.note((*at, key, j))))
                elif not allow:
                    pass  # a DENY source with nothing left: the rule matches any caller (denies more)
            if entries:
                out_rule[key] = entries
        for j, _ in enumerate(src.as_list(rule.get("when"), (*at, "when"))):
            lost((*at, "when", j), "a `when` condition")
        src.rest(rule, at, {"from", "to", "when"})
        if lossy and allow:
            continue
        rules.append(Noted(out_rule, src.note(at)))
    body: dict[str, Any] = {}
    if selector is not None:
        body["selector"] = selector
    body["action"] = src.val(action, ("spec", "action") if "action" in spec else ("spec",),
                             "" if "action" in spec else "Istio's default action")
    if "rules" in spec:
        if rules or not spec.get("rules"):
            body["rules"] = Noted(rules, src.note(("spec", "rules")))
        else:
            src.warn(("spec", "rules"), "no rule left: the policy allows nothing, as one without rules")
            body["rules"] = Noted([], src.note(("spec", "rules"), "every rule dropped"))
    st.resources.append(("AuthorizationPolicy", src, [], _envelope(src, "AuthorizationPolicy", src.namespace,
                                                                   body)))


def _principal_value(src: _Src, st: _State) -> Callable[[str, Any, Loc], Val | None]:
    def convert(field_: str, value: Any, loc: Loc) -> Val | None:
        text = src.as_str(value, loc)
        if text is None:
            return None
        if field_ == "principals" and st.trust_domain and "/" in text and not text.startswith("*"):
            domain, rest = text.split("/", 1)
            if domain != st.trust_domain:
                return src.val(f"{st.trust_domain}/{rest}", loc, f"trust domain {domain} -> {st.trust_domain} "
                                                                 "(--trust-domain)")
        return src.val(text, loc)

    return convert


def _operation_value(src: _Src) -> Callable[[str, Any, Loc], Val | None]:
    def convert(field_: str, value: Any, loc: Loc) -> Val | None:
        if field_ == "ports":
            digits = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
            if not digits.isdigit():
                src.error(loc, f"expected a port number, got {_type(value)}")
                return None
            return src.val(int(digits), loc)
        text = src.as_str(value, loc)
        return None if text is None else src.val(text, loc)

    return convert


# --- Kubernetes Services (ports), the envelope, and the whole import -------------------------------------


def _kubernetes_service(src: _Src, spec: dict[str, Any], st: _State) -> None:
    """A v1 Service in the input says which ports a service has (nothing else of it is lockgate intent)."""
    name = _label(src, src.name, ("metadata", "name"), "name")
    svc = st.service(src, ("metadata", "name"), src.namespace, name)
    for j, p in enumerate(src.as_list(spec.get("ports"), ("spec", "ports"))):
        p = src.as_map(p, ("spec", "ports", j)) or {}
        number = src.as_int(p.get("port"), ("spec", "ports", j, "port"))
        if number is None:
            continue
        given = p.get("name")
        port_name = given if isinstance(given, str) and given else "http"
        protocol = str(p.get("appProtocol") or port_name).lower()
        if protocol.startswith(("tcp", "mongo", "mysql", "redis", "udp", "tls")) or p.get("protocol") == "UDP":
            src.warn(("spec", "ports", j), f"port {number} ({port_name}) is not HTTP: lockgate routes HTTP only: "
                                           "not imported")
            continue
        svc.ports.setdefault(number, (_label(src, port_name, ("spec", "ports", j, "name"), "port name"),
                                      src.note(("spec", "ports", j, "port"))))


def _envelope(src: _Src, kind: str, namespace: str, spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": src.val(name or _label(src, src.name, ("metadata", "name"), "name"),
                                          ("metadata", "name"))}
    md["namespace"] = src.val(namespace, ("metadata", "namespace") if "namespace" in (src.doc.data.get("metadata")
                                                                                      or {}) else ("metadata",),
                              "" if "namespace" in (src.doc.data.get("metadata") or {}) else
                              "no namespace given: the importer's default (--namespace)")
    return {"apiVersion": Val(API_VERSION), "kind": Val(kind, f"from {src.where(())} {src.kind} {src.name}"),
            "metadata": md, "spec": spec}


_CONVERT: dict[str, Callable[[_Src, dict[str, Any], _State], None]] = {
    "VirtualService": _virtual_service,
    "DestinationRule": _destination_rule,
    "PeerAuthentication": _peer_authentication,
    "AuthorizationPolicy": _authorization_policy,
}
_NOT_IMPORTED = {
    "ServiceEntry": "lockgate routes to its own Services only",
    "Sidecar": "a Workload's `egress` is the nearest lockgate setting",
    "EnvoyFilter": "lockgate renders its Envoy configuration itself",
    "WorkloadEntry": "lockgate's Workloads are its own",
    "WorkloadGroup": "lockgate's Workloads are its own",
    "ProxyConfig": "lockgate configures its proxies itself",
    "RequestAuthentication": "end-user (JWT) authentication has no lockgate equivalent",
}


def _gateway(src: _Src, spec: Any) -> None:
    """lockgate's ingress gateway (one per cluster, plain HTTP on its own port) plays a Gateway's part: a
    plain-HTTP Gateway loses nothing that routes (a note); TLS or a non-HTTP server does (a warning)."""
    servers = src.as_list((src.as_map(spec, ("spec",)) or {}).get("servers"), ("spec", "servers"))
    lossy = False
    for j, server in enumerate(servers):
        server = src.as_map(server, ("spec", "servers", j)) or {}
        port = server.get("port")
        protocol = str(port.get("protocol", "HTTP") if isinstance(port, dict) else "HTTP").upper()
        if "tls" in server or protocol != "HTTP":
            lossy = True
            src.warn(("spec", "servers", j), f"a {protocol} server" + (" with tls" if "tls" in server else "")
                     + ": lockgate's ingress gateway serves plain HTTP: not imported")
    if not lossy:
        src.guess(("kind",), "lockgate's ingress gateway (one per cluster, plain HTTP, its address in `lockgate "
                             "status`) serves the hosts of every VirtualService bound to this Gateway")


_ORDER = {"DestinationRule": 0, "Service": 1}
"""Subsets and ports first: VirtualServices anywhere in the input name them."""


def import_istio(sources: Mapping[str, bytes], *, namespace: str = "default",
                 trust_domain: str | None = None) -> Imported:
    """lockgate intent for the Istio resources in `sources` (path -> content, paths as the user gave them).

    `namespace` is where a resource without `metadata.namespace` lives (kubectl's `-n`); `trust_domain`
    replaces the trust domain of AuthorizationPolicy principals (Istio's default is cluster.local)."""
    out = Imported()
    st = _State(out=out, trust_domain=trust_domain)
    budget = _Usage(documents=MAX_DOCUMENTS, nodes=MAX_NODES, aliases=MAX_ALIASES)
    srcs: list[tuple[_Src, dict[str, Any]]] = []
    for path, raw in sources.items():
        if len(raw) > MAX_FILE_BYTES:
            out.errors.append(Problem(path, 0, f"file is {len(raw)} bytes, more than the {MAX_FILE_BYTES >> 20} "
                                               "MiB limit"))
            continue
        parsed = _parse_uncached(path, raw, budget)
        budget = budget.minus(parsed.usage)
        out.errors += parsed.problems
        if not parsed.docs and not parsed.problems:
            out.errors.append(Problem(path, 1, "no YAML documents: not Istio YAML"))
        for doc in parsed.docs:
            if (found := _source(doc, namespace, out)) is not None:
                srcs.append(found)
    for src, spec in sorted(srcs, key=lambda s: _ORDER.get(s[0].kind, 2)):
        if src.kind == "DestinationRule":
            _subsets(src, spec, st)
    for src, spec in sorted(srcs, key=lambda s: _ORDER.get(s[0].kind, 2)):
        if src.kind == "Service":
            _kubernetes_service(src, spec, st)
        elif (convert := _CONVERT.get(src.kind)) is not None:
            convert(src, spec, st)
    documents = _services(st) + _routes(st) + st.resources
    for kind, src, _, tree in documents:  # a conversion bug, or a value lockgate refuses: located at its source
        try:
            KINDS[kind].model_validate(plain(tree))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            src.error(("metadata", "name"), f"the imported {kind} is not valid lockgate intent: {where}: "
                                            f"{first['msg']}")
    out.warnings.sort()
    out.notes.sort()
    if out.errors:
        out.errors.sort()
        return out
    for kind, file in FILES.items():
        docs = [(comments, tree) for k, _, comments, tree in documents if k == kind]
        if docs:
            out.files[file] = ("# lockgate intent imported from Istio YAML by `lockgate import istio`: each value's "
                               "comment says where it came from.\n" + emit(docs))
    return out


def _source(doc: _Doc, namespace: str, out: Imported) -> tuple[_Src, dict[str, Any]] | None:
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("apiVersion"), str) \
            or not isinstance(data.get("kind"), str):
        out.errors.append(Problem(doc.path, doc.line, "not Istio YAML: expected a resource with apiVersion and kind"))
        return None
    api, kind = data["apiVersion"], data["kind"]
    md = data.get("metadata")
    md = md if isinstance(md, dict) else {}
    name = md["name"] if isinstance(md.get("name"), str) else ""
    ns = md["namespace"] if isinstance(md.get("namespace"), str) else namespace
    src = _Src(doc=doc, kind=kind, name=name, namespace=ns, out=out)
    group, _, version = api.rpartition("/")
    if api == API_VERSION:
        src.error(("apiVersion",), "not Istio YAML: this is lockgate intent already")
        return None
    if group not in GROUPS:
        if api == "v1" and kind == "Service":
            ports = src.as_map(data.get("spec"), ("spec",)) or {}
            return (src, ports) if name else None
        src.warn(("apiVersion",), f"{api} {kind} is not an Istio networking or security resource: not imported")
        return None
    if version not in GROUPS[group]:
        src.error(("apiVersion",), f"{api}: this importer reads {group} {', '.join(GROUPS[group])}")
        return None
    if not name:
        src.error(("metadata",), "metadata.name is required")
        return None
    if kind == "Gateway":
        _gateway(src, data.get("spec"))
        return None
    if kind in _NOT_IMPORTED:
        src.warn(("kind",), f"no lockgate equivalent ({_NOT_IMPORTED[kind]}): not imported")
        return None
    if kind not in _CONVERT:
        src.warn(("kind",), f"{kind} has no lockgate equivalent: not imported")
        return None
    spec = src.as_map(data.get("spec"), ("spec",)) or {}
    src.rest({k: v for k, v in data.items() if k not in ("apiVersion", "kind", "metadata", "spec")}, (),
             set(), {"status": "status is not intent"}, effect="ignored")
    return src, spec


_Document = tuple[str, _Src, list[str], dict[str, Any]]
"""(lockgate kind, the Istio resource it came from, comment lines before it, its tree)."""


def _services(st: _State) -> list[_Document]:
    docs: list[_Document] = []
    for (ns, name), svc in st.services.items():
        src, loc = svc.first
        http = Val("HTTP", "what lockgate routes")
        ports = [{"name": Val(n, "a port name"), "port": Val(port, note), "protocol": http}
                 for port, (n, note) in sorted(svc.ports.items())]
        names = [p["name"].value for p in ports]
        for p in ports:  # two ports of one name (destinations give none): number them
            if names.count(p["name"].value) > 1:
                p["name"] = Val(f"{p['name'].value}-{p['port'].value}", "a port name")
        if not ports:
            ports = [{"name": Val("http", "a port name"),
                      "port": Val(GUESSED_PORT, f"guessed: no port of {name} is given in the Istio YAML; set the one "
                                                "its callers use"), "protocol": http}]
            src.guess(loc, f"no port of service {name} is given (a destination port or a Kubernetes Service): "
                           f"port {GUESSED_PORT} is a guess")
        versions = [Val(v, note) for v, note in svc.versions.items()]
        if not versions:
            versions = [Val("v1", f"guessed: no version of {name} is named in the Istio YAML")]
            src.guess(loc, f"no version of service {name} is named (no DestinationRule subsets): v1 is a guess")
        spec: dict[str, Any] = {"ports": ports, "versions": versions}
        for c in dict.fromkeys(svc.comments):
            spec[f"#{len(spec)}"] = Comment(c)
        named = f"{src.note(loc)} (where {name} is first named)"
        env = {"apiVersion": Val(API_VERSION), "kind": Val("Service", "every service the Istio YAML names"),
               "metadata": {"name": Val(name, named), "namespace": Val(ns, named)}, "spec": spec}
        docs.append(("Service", src, [], env))
    return docs


def _routes(st: _State) -> list[_Document]:
    docs: list[_Document] = []
    for (ns, service), route in st.routes.items():
        body: dict[str, Any] = {"service": Val(service, route.src.note(("spec", "http"), "the service its "
                                                                                        "destinations name"))}
        if route.hosts:
            body["hosts"] = route.hosts
        body["http"] = route.http
        docs.append(("Route", route.src, [], _envelope(route.src, "Route", ns, body, name=route.name)))
    return docs
