"""Snapshot: the complete xDS configuration for one proxy, as an immutable value.

Resources are kept in Envoy's proto3 JSON form (snake_case field names, `@type` on every Any), which
makes golden tests readable and versions cheap: a type's version is the hash of a deterministic
serialisation of its resources, compared only for equality (go-control-plane's snapshot.go is the model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

#: Make-before-break push order: what a resource refers to is sent before the resource itself.
PUSH_ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)
#: Types Envoy subscribes to by wildcard (the full set); the others are requested by name.
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

Resource = Mapping[str, Any]


def canonical(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace. The basis of every version."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_plain).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value)).hexdigest()[:16]


def _pairs_digest(pairs: Mapping[str, str]) -> str:
    text = "\n".join(f"{name}\0{d}" for name, d in pairs.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _DigestMemo:
    """Digests of resource objects, by identity. Render shares one dict between every proxy that needs
    the same resource (1000 clusters x 100 sidecars are 1000 objects), so each is serialised once.

    Holding a reference to each object keeps its id from being reused while it is remembered; resources
    are never mutated after render, which is what makes identity a valid key. When full, it starts over
    (cheaper than LRU bookkeeping on a path taken hundreds of thousands of times per render)."""

    def __init__(self, maxsize: int) -> None:
        self._items: dict[int, tuple[Any, str]] = {}
        self._maxsize = maxsize

    def __call__(self, value: Any) -> str:
        hit = self._items.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        d = digest(value)
        if len(self._items) >= self._maxsize:
            self._items.clear()
        self._items[id(value)] = (value, d)
        return d


resource_digest = _DigestMemo(maxsize=200_000)


class InconsistentSnapshot(ValueError):
    """A listener or cluster names a route configuration or endpoint set the snapshot does not hold."""


@dataclass(frozen=True)
class Snapshot:
    """Resources by type URL, then by name. Build with `Snapshot.of(...)`, never mutate."""

    resources: Mapping[str, Mapping[str, Resource]]
    revision: str = ""
    """The Git revision this snapshot was rendered from (a label, not part of any version)."""
    versions: Mapping[str, str] = field(init=False, repr=False, compare=False)
    digests: Mapping[str, Mapping[str, str]] = field(init=False, repr=False, compare=False)
    """Per resource: type URL -> name -> digest of its content (what the ADS server's caches key on)."""

    def __post_init__(self) -> None:
        frozen = MappingProxyType(
            {t: MappingProxyType(dict(sorted(self.resources.get(t, {}).items()))) for t in PUSH_ORDER}
        )
        digests = MappingProxyType({
            t: MappingProxyType({name: resource_digest(r) for name, r in frozen[t].items()}) for t in PUSH_ORDER
        })
        object.__setattr__(self, "resources", frozen)
        object.__setattr__(self, "digests", digests)
        # A type's version: the hash of its (name, content digest) pairs, so it changes iff any resource does.
        object.__setattr__(self, "versions", MappingProxyType({t: _pairs_digest(digests[t]) for t in PUSH_ORDER}))

    @staticmethod
    def of(
        *,
        listeners: Sequence[Resource] = (),
        routes: Sequence[Resource] = (),
        clusters: Sequence[Resource] = (),
        endpoints: Sequence[Resource] = (),
        secrets: Sequence[Resource] = (),
        revision: str = "",
    ) -> Snapshot:
        def by_name(items: Sequence[Resource], key: str = "name") -> dict[str, Resource]:
            out: dict[str, Resource] = {}
            for item in items:
                name = item[key]
                if name in out:
                    raise InconsistentSnapshot(f"duplicate resource name {name!r}")
                out[name] = item
            return out

        return Snapshot(
            resources={
                LISTENER: by_name(listeners),
                ROUTE: by_name(routes),
                CLUSTER: by_name(clusters),
                ENDPOINT: by_name(endpoints, "cluster_name"),
                SECRET: by_name(secrets),
            },
            revision=revision,
        )

    def version(self, type_url: str) -> str:
        return self.versions[type_url]

    @property
    def version_all(self) -> str:
        """One version for the whole snapshot: changes iff any type's version changes."""
        return digest([self.versions[t] for t in PUSH_ORDER])

    def items(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources[type_url]

    def consistent(self) -> None:
        """Raise InconsistentSnapshot unless every referenced RDS/EDS name is present, and vice versa."""
        want_routes = set(_route_names(self.resources[LISTENER].values()))
        want_eds = {
            (c.get("eds_cluster_config") or {}).get("service_name") or c["name"]
            for c in self.resources[CLUSTER].values()
            if c.get("type") == "EDS"
        }
        problems = []
        for kind, want, have in (
            ("route configuration", want_routes, set(self.resources[ROUTE])),
            ("endpoint set", want_eds, set(self.resources[ENDPOINT])),
        ):
            if missing := sorted(want - have):
                problems.append(f"missing {kind}(s) {missing}")
            if extra := sorted(have - want):
                problems.append(f"unreferenced {kind}(s) {extra}")
        if problems:
            raise InconsistentSnapshot("; ".join(problems))

    def to_json(self) -> dict[str, list[Resource]]:
        """Readable form for golden files: short type names, resources sorted by name."""
        short = {LISTENER: "listeners", ROUTE: "routes", CLUSTER: "clusters", ENDPOINT: "endpoints",
                 SECRET: "secrets"}
        return {short[t]: list(self.resources[t].values()) for t in PUSH_ORDER if self.resources[t]}


def _route_names(listeners: Any) -> Iterator[str]:
    for listener in listeners:
        for chain in listener.get("filter_chains", []):
            for flt in chain.get("filters", []):
                cfg = flt.get("typed_config", {})
                if cfg.get("@type") == HCM and "rds" in cfg:
                    yield cfg["rds"]["route_config_name"]
