"""Checks on Rollouts across resources: service and versions exist, steps make sense, metrics are known;
and the Mesh's notification sinks (the same check as a Rollout's).

Pure, like mesh.validate: findings point at a resource index and a field path; the loader adds file:line.
"""

from __future__ import annotations

import difflib
import math
import re
import urllib.parse
from collections.abc import Sequence

from mesh.intent import L4_PROTOCOLS, Mesh, NotificationSpec, ResourceBase, Service, Workload, parse_duration_ms
from mesh.validate import Finding
from rollouts.intent import BASELINES, BUILTINS, Rollout, parse_percent

MIN_INTERVAL_MS = 500
MIN_SINK_TIMEOUT_MS = 50
MAX_SINK_TIMEOUT_MS = 10_000
"""A notification is sent off the loop, but a sink that takes longer than this is down."""
_VERSION = re.compile(r"\{\{\s*version\s*\}\}")
CONNECTIONS_ONLY = {"request-duration-p99": (
    "its sidecars time no requests (tcp_proxy), and a connection's length is how long its client kept it open, "
    "not how fast the app answered; judge it on request-success-rate (its connection failures) or a query of "
    "your own")}
"""Built-ins a TCP service's sidecars have no honest series for, and why: the ones rollouts.analysis's
TCP_QUERIES leaves out (a test keeps the two in step; validation does not import the provider)."""


def validate(resources: Sequence[ResourceBase]) -> list[Finding]:
    out: list[Finding] = []
    mesh_sinks: dict[str, NotificationSpec] = {}
    for i, r in enumerate(resources):  # Mesh-wide sinks: the same one check as a Rollout's
        if isinstance(r, Mesh):
            seen: set[str] = set()
            for j, n in enumerate(r.spec.notifications):
                out += _endpoint(i, ("spec", "notifications", j), what="notification", name=n.name, url=n.url,
                                 timeout=n.timeout, seen=seen)
                mesh_sinks.setdefault(n.name, n)
    services = {(r.metadata.namespace, r.metadata.name): r for r in resources if isinstance(r, Service)}
    clusters = {c.name for r in resources if isinstance(r, Mesh) for c in r.spec.clusters}
    workloads = [r for r in resources if isinstance(r, Workload)]
    owner: dict[tuple[str, str], Rollout] = {}
    for i, r in enumerate(resources):
        if not isinstance(r, Rollout):
            continue
        spec, ns = r.spec, r.metadata.namespace
        key = (ns, spec.service)
        if (first := owner.get(key)) is not None and first.key != r.key:
            out.append(Finding(i, ("spec", "service"), f"service {spec.service!r} already has Rollout "
                               f"{first.metadata.name!r}; one Rollout per service"))
        owner.setdefault(key, r)
        svc = services.get(key)
        if svc is None:
            out.append(Finding(i, ("spec", "service"), f"unknown service {spec.service!r} in namespace {ns!r}"))
        else:
            for field in ("stable", "canary"):
                version = getattr(spec, field)
                if version is not None and version not in svc.spec.versions:
                    out.append(Finding(i, ("spec", field), f"service {spec.service!r} has no version {version!r} "
                                       f"(declared: {', '.join(svc.spec.versions)})"))
        steps = spec.steps
        if spec.strategy == "canary":
            if not steps:
                out.append(Finding(i, ("spec", "steps"), "a canary needs at least one step (e.g. [10, 50, 100])"))
            for j, w in enumerate(steps):
                if not 1 <= w <= 100:
                    out.append(Finding(i, ("spec", "steps", j), f"step weight {w} is not between 1 and 100"))
                elif j and w <= steps[j - 1]:
                    out.append(Finding(i, ("spec", "steps", j), f"steps must increase: {steps[j - 1]} then {w}"))
        if spec.strategy == "ab" and not spec.match:
            out.append(Finding(i, ("spec", "match"), "an ab rollout needs `match`: which requests go to the canary"))
        if spec.strategy in ("canary", "mirror") and spec.match:
            out.append(Finding(i, ("spec", "match"), f"`match` has no effect with strategy {spec.strategy}",
                               warning=True))
        if (aff := spec.session_affinity) is not None:
            if spec.strategy != "canary":
                out.append(Finding(i, ("spec", "sessionAffinity"), f"sessionAffinity has no effect with strategy "
                                   f"{spec.strategy}: it keeps clients on a canary the weights chose", warning=True))
            if aff.max_age_s < 1:
                out.append(Finding(i, ("spec", "sessionAffinity", "maxAge"), f"maxAge {aff.max_age} is under 1s: "
                                   "Max-Age counts whole seconds, and 0 deletes the cookie"))
        if parse_duration_ms(spec.interval) < MIN_INTERVAL_MS:
            out.append(Finding(i, ("spec", "interval"), f"interval must be at least {MIN_INTERVAL_MS}ms"))
        hooks: set[str] = set()
        for j, h in enumerate(spec.webhooks):
            out += _endpoint(i, ("spec", "webhooks", j), what="webhook", name=h.name, url=h.url, timeout=h.timeout,
                             seen=hooks)
            if h.timeout_s >= spec.interval_s:
                out.append(Finding(i, ("spec", "webhooks", j, "timeout"), f"timeout {h.timeout} is not shorter than "
                                   f"the interval {spec.interval}: the hook would delay every analysis", warning=True))
        sinks: set[str] = set()
        for j, n in enumerate(spec.notifications):
            out += _endpoint(i, ("spec", "notifications", j), what="notification", name=n.name, url=n.url,
                             timeout=n.timeout, seen=sinks)
            if (wide := mesh_sinks.get(n.name)) is not None and wide != n:
                out.append(Finding(i, ("spec", "notifications", j, "name"), f"notification {n.name!r} is also a "
                                   "Mesh-wide sink, set differently: this Rollout's decisions go to this one only",
                                   warning=True))
        out += _waves(i, r, clusters=clusters, workloads=workloads)
        names: set[str] = set()
        for j, m in enumerate(spec.analysis.metrics):
            loc = ("spec", "analysis", "metrics", j)
            if m.name in names:
                out.append(Finding(i, (*loc, "name"), f"duplicate metric {m.name!r}"))
            names.add(m.name)
            if m.builtin is not None and m.builtin not in BUILTINS:
                close = difflib.get_close_matches(m.builtin, BUILTINS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(BUILTINS)}"
                out.append(Finding(i, (*loc, "builtin"), f"unknown builtin metric {m.builtin!r} ({hint})"))
            elif m.builtin in CONNECTIONS_ONLY and svc is not None and svc.spec.protocol in L4_PROTOCOLS:
                out.append(Finding(i, (*loc, "builtin"), f"builtin {m.builtin!r} has no series for "
                                   f"{svc.spec.protocol} service {spec.service!r}: {CONNECTIONS_ONLY[m.builtin]}"))
            if m.min is not None and m.max is not None and m.min > m.max:
                out.append(Finding(i, (*loc, "min"), f"min {m.min} is above max {m.max}"))
            if (c := m.compare) is not None:
                at = (*loc, "compare")
                if c.baseline not in BASELINES:
                    out.append(Finding(i, (*at, "baseline"), f"unknown baseline {c.baseline!r} "
                                       f"(known: {', '.join(BASELINES)})"))
                if parse_percent(c.max_increase) is None:
                    out.append(Finding(i, (*at, "maxIncrease"), f"maxIncrease {c.max_increase!r} is not a "
                                       "percentage such as 20% (0% or more)"))
                if not (math.isfinite(c.min_increase) and c.min_increase >= 0):
                    out.append(Finding(i, (*at, "minIncrease"), f"minIncrease {c.min_increase:g} is not a "
                                       "finite amount of 0 or more, in the metric's unit (e.g. 2 for 2 ms)"))
                if not 0.5 < c.confidence < 1:
                    out.append(Finding(i, (*at, "confidence"), f"confidence {c.confidence:g} is not between "
                                       "0.5 and 1 (exclusive), e.g. 0.98"))
                if m.query is not None and not _VERSION.search(m.query):
                    out.append(Finding(i, (*loc, "query"), "a compared query must select `{{ version }}`: "
                                       "otherwise canary and stable read the same series"))
    return out


def _waves(i: int, r: Rollout, *, clusters: set[str], workloads: Sequence[Workload]) -> list[Finding]:
    """spec.waves: known clusters where the canary runs, each in one wave; names unique; spec.approve
    names a wave. (bake is a duration and approval `manual` by the model already.)"""
    spec, out = r.spec, []
    if not spec.waves:
        if spec.approve is not None:
            out.append(Finding(i, ("spec", "approve"), "approve names a wave, but the Rollout has no waves"))
        return out
    if spec.strategy != "canary":
        out.append(Finding(i, ("spec", "waves"), f"waves need strategy canary (steps per wave), not {spec.strategy}"))
    canary = spec.active_canary
    running = {c for w in workloads if w.metadata.namespace == r.metadata.namespace and w.spec.service == spec.service
               and w.spec.version == canary and w.spec.replicas > 0 for c in w.spec.clusters}
    seen: dict[str, int] = {}
    names: set[str] = set()
    for j, wave in enumerate(spec.waves):
        loc = ("spec", "waves", j)
        if wave.name is not None:
            if wave.name in names:
                out.append(Finding(i, (*loc, "name"), f"duplicate wave name {wave.name!r}"))
            names.add(wave.name)
        for k, c in enumerate(wave.clusters):
            if c not in clusters:
                out.append(Finding(i, (*loc, "clusters", k), f"unknown cluster {c!r} (the Mesh has: "
                                   f"{', '.join(sorted(clusters)) or 'none'})"))
            elif canary is not None and c not in running:
                out.append(Finding(i, (*loc, "clusters", k), f"the canary {canary!r} of {spec.service!r} does not "
                                   f"run in cluster {c!r}: a wave there would judge nothing"))
            if c in seen:
                out.append(Finding(i, (*loc, "clusters", k), f"cluster {c!r} is already in waves[{seen[c]}]; "
                                   "each cluster is in one wave"))
            seen.setdefault(c, j)
        if j == 0 and wave.bake_s > 0:
            out.append(Finding(i, (*loc, "bake"), "the first wave has no wave before it to bake after: bake has no "
                               "effect here", warning=True))
    for c in sorted(running - set(seen)):
        out.append(Finding(i, ("spec", "waves"), f"the canary runs in cluster {c!r}, which is in no wave: it gets "
                           "the canary only when the last wave passes", warning=True))
    a = spec.approve
    if a is not None and not (isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(spec.waves)) \
            and not (isinstance(a, str) and a in names):
        known = ", ".join([*(str(n) for n in range(len(spec.waves))), *sorted(names)])
        out.append(Finding(i, ("spec", "approve"), f"approve {a!r} names no wave (an index from 0, or a name: "
                           f"{known})"))
    return out


def _endpoint(i: int, loc: tuple[str | int, ...], *, what: str, name: str, url: str, timeout: str,
              seen: set[str]) -> list[Finding]:
    """A webhook's or a notification sink's name (unique), URL (http/https with a host) and timeout."""
    out = []
    if name in seen:
        out.append(Finding(i, (*loc, "name"), f"duplicate {what} {name!r}"))
    seen.add(name)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        out.append(Finding(i, (*loc, "url"), f"url {url!r} is not an http:// or https:// URL with a host"))
    if not MIN_SINK_TIMEOUT_MS <= parse_duration_ms(timeout) <= MAX_SINK_TIMEOUT_MS:
        out.append(Finding(i, (*loc, "timeout"), f"timeout {timeout} is not between {MIN_SINK_TIMEOUT_MS}ms and "
                           f"{MAX_SINK_TIMEOUT_MS // 1000}s"))
    return out
