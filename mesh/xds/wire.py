"""JSON resources to packed protobuf `Any`: the one place the proto3 JSON form meets the wire.

Resources are written by `mesh.xds.encode` (ParseDict, ~0.3 ms per cluster, only where the encoder is
unsure), once per object (`typed_digest`, whose digest of the bytes is the resource's version), and the
packed bytes are kept by (type URL, digest): a push after a weight change serialises only what changed.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections import OrderedDict
from typing import Any

# Importing a generated module registers its messages in the default descriptor pool; without these,
# a nested `typed_config` Any names a type ParseDict cannot resolve. Top-level types first, then every
# extension our renderers put into an Any.
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2  # noqa: F401
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from mesh.xds.encode import Unsupported, encode_as, forget_written, share_objects, varint
from mesh.xds.snapshot import Resource, digest

_PREFIX = "type.googleapis.com/"


class _AnyCache:
    """A small thread-safe LRU of packed resources keyed by (type URL, digest of the JSON form)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.dropped = 0
        """How many entries were ever evicted or cleared: a reader that saw every entry present can tell
        whether that still holds (`epoch`)."""

    def get(self, key: tuple[str, str]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: tuple[str, str], value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
                self.dropped += 1

    def clear(self) -> None:
        with self._lock:
            self.dropped += len(self._items)
            self._items.clear()
            self.hits = self.misses = 0


_cache = _AnyCache(maxsize=65536)


@functools.cache  # asked once per resource serialised: a pool lookup and a class factory call each time
def message_class(type_url: str) -> type[Message]:
    """The generated message class for a type URL; ValueError if no imported module defines it."""
    if not type_url.startswith(_PREFIX):
        raise ValueError(f"type URL {type_url!r} does not start with {_PREFIX!r}")
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_url[len(_PREFIX) :])
    except KeyError:
        raise ValueError(f"unknown resource type {type_url!r} (is its _pb2 module imported?)") from None
    return message_factory.GetMessageClass(descriptor)


def _plain(resource: Resource) -> dict[str, Any]:
    return resource if isinstance(resource, dict) else dict(resource)


def _parse(type_url: str, resource: Resource) -> Message:
    msg = message_class(type_url)()
    try:
        json_format.ParseDict(_plain(resource), msg)
    except (json_format.ParseError, KeyError, TypeError, ValueError) as exc:  # ParseDict raises all four
        # Drop protobuf's list of every available field: long, and camelCase where we write snake_case.
        detail = str(exc).split("\n Available Fields", 1)[0]
        raise ValueError(f"{_label(type_url, resource)}: {detail}") from None
    return msg


def _label(type_url: str, resource: Resource) -> str:
    short = type_url.rsplit(".", 1)[-1]
    name = resource.get("name") or resource.get("cluster_name") or "<unnamed>"
    return f"{short} {name!r}"


def to_any_bytes(type_url: str, resource: Resource, *, content_digest: str | None = None) -> bytes:
    """One JSON resource as a serialised `google.protobuf.Any`, memoised by content digest.

    The ADS server assembles responses from these bytes, so a resource shared by a hundred proxies is
    converted and serialised once. Pass the digest when known (Snapshot.digests) to skip re-hashing.
    Route configurations are assembled from per-virtual-host pieces, so changing one service's routes
    re-parses that service's virtual host only, not a thousand others."""
    key = (type_url, content_digest or digest(_plain(resource)))
    packed = _cache.get(key)
    if packed is None:
        value = _value_bytes(type_url, resource)
        packed = _any_head(type_url) + field_bytes(2, value)  # Any: type_url = 1, value = 2
        _cache.put(key, packed)
    return packed


def typed_digest(type_url: str, resource: Resource) -> str:
    """The digest of a resource's serialised form (its `Any` value), serialising it on the way: the bytes
    are kept for the ADS server under (type URL, this digest). Memoised by identity, so a resource shared
    by a hundred proxies, or kept by render across commits, is serialised once. The encoding is
    deterministic (fields in number order, maps sorted), so equal content has one digest; a resource
    that does not serialise gets its JSON digest, and serving it names the error (as before)."""
    hit = _typed.get(id(resource))
    if hit is not None and hit[0] is resource and hit[1] == type_url:
        return hit[2]
    before = share_objects(True)  # not `with shared_objects()`: a context manager per resource costs ~1 us
    try:
        value = _value_bytes(type_url, resource)
    except ValueError:
        found = digest(_plain(resource))
    else:
        found = hashlib.sha256(value).hexdigest()[:16]
        _cache.put((type_url, found), _any_head(type_url) + field_bytes(2, value))
    finally:
        share_objects(before)
    if len(_typed) >= 200_000:
        _typed.clear()
    _typed[id(resource)] = (resource, type_url, found)
    return found


@functools.cache
def _any_head(type_url: str) -> bytes:
    """An Any's first field (type_url = 1), the same for every resource of a type."""
    return field_bytes(1, type_url.encode())


_typed: dict[int, tuple[Resource, str, str]] = {}
"""typed_digest's memo, by identity (holding the resource, so its id is not reused while remembered)."""


def _value_bytes(type_url: str, resource: Resource) -> bytes:
    if type_url == _ROUTE and resource.get("virtual_hosts"):
        return _route_config_bytes(resource)
    return _fields_bytes(type_url, resource)


def epoch() -> int:
    """Changes whenever a serialised resource is dropped from the cache: what was all serialised at one
    epoch still is while it lasts (server.serialise_ahead skips such parts)."""
    return _cache.dropped


def serialise_once(type_url: str, resource: Resource, content_digest: str) -> bool:
    """`to_any_bytes` for a resource not serialised yet; whether it was new (server.serialise_ahead)."""
    if _cache.get((type_url, content_digest)) is not None:
        return False
    to_any_bytes(type_url, resource, content_digest=content_digest)
    return True


def _fields_bytes(type_url: str, resource: Resource) -> bytes:
    """A message's bytes, written straight from its JSON form (`encode`); ParseDict only for what the
    encoder does not handle, which also names the error in a resource protobuf rejects."""
    try:
        return encode_as(message_class(type_url), _plain(resource))
    except Unsupported:
        return _parse(type_url, resource).SerializeToString(deterministic=True)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: tag, varint length, payload. Concatenated fields of a
    message are that message (the wire format allows any field order and repeats)."""
    tag = _TAGS[number] if number < len(_TAGS) else varint((number << 3) | 2)
    return tag + varint(len(payload)) + payload


_TAGS = [varint((number << 3) | 2) for number in range(16)]



_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
_VHOSTS_FIELD = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name["virtual_hosts"].number




def _route_config_bytes(config: Resource) -> bytes:
    """RouteConfiguration bytes from cached pieces: each virtual host, and inside it each route entry
    (route entries are shared between the variants of a virtual host, so each is parsed once)."""
    head = _fields_bytes(_ROUTE, {k: v for k, v in config.items() if k != "virtual_hosts"})
    parts = []
    for vhost in config["virtual_hosts"]:
        hit = _vhosts.get(id(vhost))
        if hit is not None and hit[0] is vhost:
            parts.append(hit[1])
            continue
        try:
            piece = field_bytes(_VHOSTS_FIELD, _vhost_bytes(vhost))
        except (json_format.ParseError, KeyError, TypeError, ValueError) as exc:
            detail = str(exc).split("\n Available Fields", 1)[0]
            raise ValueError(f"RouteConfiguration {config.get('name')!r} virtual host "
                             f"{vhost.get('name')!r}: {detail}") from None
        if len(_vhosts) >= 200_000:
            _vhosts.clear()
        _vhosts[id(vhost)] = (vhost, piece)
        parts.append(piece)
    return head + b"".join(parts)


_vhosts: dict[int, tuple[Resource, bytes]] = {}
"""Framed virtual hosts by identity: render keeps a virtual host the same object while its routes are, and
shares it between the route configurations that hold it (the ingress and the sidecars' buckets)."""


def _vhost_bytes(vhost: Resource) -> bytes:
    try:
        return encode_as(route_components_pb2.VirtualHost, _plain(vhost))
    except Unsupported:
        msg = route_components_pb2.VirtualHost()
        json_format.ParseDict(_plain(vhost), msg)
        return bytes(msg.SerializeToString(deterministic=True))


def may_name_secrets(type_url: str, content_digest: str) -> bool:
    """Whether a resource may refer to an SDS secret, read off its serialised form (cached under its
    digest) instead of walking its dicts: False only when those bytes hold neither the word `sds_config`
    (a Struct's keys are written verbatim) nor the name of a message type that can reach a field called
    `sds_config` without an Any between (an Any's contents are named by its own type URL, which is in the
    bytes; the resource's own type is, in its Any head). Unknown bytes: True (the caller walks).

    A secret reference is `{name, sds_config}` (`snapshot._sds_names`); at 1000 services the walk over
    every cluster and route configuration was ~80 ms of a cold push's check, the scan is a few."""
    packed = _cache.get((type_url, content_digest))
    if packed is None or b"sds_config" in packed:
        return True
    return any(_carries_secrets(name) for name in set(_TYPE_NAMES.findall(packed)))


_TYPE_NAMES = re.compile(rb"/([A-Za-z_][A-Za-z0-9_.]*)")
"""What may follow a type URL's last `/` (a message's full name); other matches are names no message has.
A name ends where its string does: the bytes are written in field order, so an Any's type URL (field 1)
is followed by its value's tag (0x12, not a name character). An Any with no value may run into the next
tag's byte, and names no secret, having no fields. Render writes every type URL with its prefix; one
without a `/` is not an Any Envoy unpacks (protobuf's `Any::UnpackTo` requires the `/`)."""


def _carries_secrets(full_name: bytes) -> bool:
    """Whether a message of this type can hold a field named `sds_config` (through its fields' message
    types, not through an Any or a Struct: those are covered by the bytes themselves). Remembered per type;
    a name no message has is not (a route's path segments are looked up too, and a module imported later
    may define it)."""
    found = _carriers.get(full_name)
    if found is None:
        try:
            root = descriptor_pool.Default().FindMessageTypeByName(full_name.decode("ascii"))
        except (KeyError, UnicodeDecodeError):
            return False  # no such message: nothing was encoded as one
        found = _carriers[full_name] = _reaches_sds_config(root)
    return found


_carriers: dict[bytes, bool] = {}
"""_carries_secrets' memo: one entry per message type met in a resource's bytes (bounded by the pool)."""


def _reaches_sds_config(root: Descriptor) -> bool:
    seen = {root.full_name}
    stack = [root]
    while stack:
        desc = stack.pop()
        for f in desc.fields:
            if f.name == "sds_config":
                return True
            sub = f.message_type
            if sub is not None and sub.full_name not in seen and sub.full_name not in _OPAQUE:
                seen.add(sub.full_name)
                stack.append(sub)
    return False


_OPAQUE = frozenset({"google.protobuf.Any", "google.protobuf.Struct", "google.protobuf.Value",
                     "google.protobuf.ListValue"})


def forget() -> None:
    """Drop every memoised serialisation: for a measurement that must start cold (bench/scale.py)."""
    _cache.clear()
    _vhosts.clear()
    _typed.clear()
    forget_written()


def to_any(type_url: str, resource: Resource, *, content_digest: str | None = None) -> any_pb2.Any:
    """Pack one JSON resource (a fresh message each call; the serialised form is what is cached)."""
    return any_pb2.Any.FromString(to_any_bytes(type_url, resource, content_digest=content_digest))


def check(type_url: str, resource: Resource) -> None:
    """Raise ValueError naming the resource unless it parses as `type_url` (unknown fields, bad enums,
    unresolvable `@type`). Envoy's own validation (regexes, ranges, required fields) happens only on
    the proxy and shows up as a NACK."""
    _parse(type_url, resource)
