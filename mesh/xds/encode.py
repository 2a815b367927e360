"""Proto3 JSON (as dicts) straight to protobuf wire bytes, driven by the message descriptors.

`json_format.ParseDict` builds a message field by field in Python and then serialises it: at 1000
services x 100 proxies that was ~0.7 s of a cold push (8000 resources). This encoder walks the same
dict once and writes the wire format directly, with a per-descriptor plan of tags and writers.

It is deliberately narrow: anything it is not sure about (an unknown field, a type it does not
expect, two members of one oneof, a well-known type it does not implement, a value out of range)
raises `Unsupported`, and the caller falls back to ParseDict, which either encodes it or raises the
error the user sees. So it never accepts what ParseDict would refuse; tests compare the two on every
rendered resource and on a message with every scalar type.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["Unsupported", "encode", "encode_as", "forget_written", "share_objects", "shared_objects"]


class Unsupported(Exception):
    """Something this encoder does not handle (or ParseDict would reject): use ParseDict instead."""


Writer = Callable[[Any], bytes]
"""One field's value (a JSON value) to its bytes on the wire, tag included."""


def encode_as(cls: type[Message], value: Mapping[str, Any]) -> bytes:
    """`encode` for a generated message class. A value nested past Python's recursion limit is refused
    too: ParseDict then refuses it with its own depth error (it stops at 100 levels)."""
    try:
        return encode(cast(Descriptor, cls.DESCRIPTOR), value)
    except RecursionError:
        raise Unsupported("nested too deeply") from None


def encode(descriptor: Descriptor, value: Mapping[str, Any]) -> bytes:
    """The serialised message `descriptor` whose proto3 JSON form is `value`; Unsupported if unsure."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise Unsupported(f"{descriptor.full_name}: not an object")
    plan = _plans.get(descriptor)
    if plan is None:
        plan = _plans[descriptor] = _Plan(descriptor)
    if plan.special is not None:
        return plan.special(descriptor, value)
    entries = plan.entries
    pieces: list[bytes] = []
    numbers: list[int] = []
    groups: set[int] | None = None
    last = 0
    ordered = True
    for name, item in value.items():
        entry = entries.get(name)
        if entry is None:
            raise Unsupported(f"{descriptor.full_name}: field {name!r}")
        number, group, writer = entry
        if item is None and number not in plan.nullable:
            continue  # proto3 JSON: null is the default, except in a Value (null_value)
        if group:  # a oneof, or a field that has a second (JSON) name: at most one of each group
            if groups is None:
                groups = {group}
            elif group in groups:
                raise Unsupported(f"{descriptor.full_name}: two values for one field or oneof ({name!r})")
            else:
                groups.add(group)
        if number < last:
            ordered = False
        last = number
        numbers.append(number)
        pieces.append(writer(item))
    if not ordered:  # field-number order, as protobuf writes it: the same bytes for the same message
        pieces = [piece for _, piece in sorted(zip(numbers, pieces, strict=True), key=_first)]
    return b"".join(pieces)


def _first(pair: tuple[int, bytes]) -> int:
    return pair[0]


class _Plan:
    """How to write one message type: per JSON key, (field number, group, writer). A group is nonzero
    for a oneof member (its oneof) or a field with a distinct JSON name (the field itself), so a
    message given two of one group is refused, as ParseDict refuses it."""

    def __init__(self, descriptor: Descriptor) -> None:
        self.special = _SPECIAL.get(descriptor.full_name)
        self.entries: dict[str, tuple[int, int, Writer]] = {}
        self.nullable = frozenset(f.number for f in descriptor.fields if not f.is_repeated and f.message_type
                                  is not None and f.message_type.full_name == "google.protobuf.Value")
        if self.special is not None:
            return
        for f in descriptor.fields:
            oneof = f.containing_oneof
            if oneof is not None and len(oneof.fields) == 1 and oneof.name == "_" + f.name:
                oneof = None  # a proto3 `optional` field's synthetic oneof
            group = -1 - oneof.index if oneof is not None else (f.number if f.json_name != f.name else 0)
            writer = _writer(f)
            self.entries[f.name] = (f.number, group, writer)
            self.entries.setdefault(f.json_name, (f.number, group, writer))


_plans: dict[Descriptor, _Plan] = {}


class _Scope(threading.local):
    shared = False


_scope = _Scope()
_written: dict[int, tuple[Any, str, bytes]] = {}
"""Nested messages already written while `shared_objects()` was on, by identity (holding the object, so its
id is not reused while remembered): render shares one dict between thousands of resources (a route entry
between the ingress and every sidecar's virtual host, the ADS config source between every cluster)."""
_WRITTEN_MAX = 300_000


def forget_written() -> None:
    """Drop what `shared_objects` remembered (wire.forget)."""
    _written.clear()


def share_objects(on: bool) -> bool:
    """Turn `shared_objects`' behaviour on or off for this thread; what it was (to restore in a `finally`)."""
    before = _scope.shared
    _scope.shared = on
    return before


@contextlib.contextmanager
def shared_objects() -> Iterator[None]:
    """Within it (this thread only), a nested object met again is not written again: for objects that are
    never mutated once written, as a snapshot's resources are (wire.typed_digest). Outside it, every call
    writes what it is given, so a caller that edits a dict between two calls gets what it edited."""
    before = share_objects(True)
    try:
        yield
    finally:
        share_objects(before)


# --- the wire format ----------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """An unsigned varint; negative int32/int64 values are written as their 64-bit two's complement."""
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes([i]) for i in range(0x80)]


def _tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


# --- scalars: JSON value -> the value's wire payload (without the tag) --------------------------------

_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1), FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1), FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}
_INTEGER = re.compile(r"-?[0-9]+\Z")


def _integer(value: Any, field_type: int) -> int:
    if isinstance(value, bool):
        raise Unsupported("bool for an integer")
    if isinstance(value, int):
        n = value
    elif (isinstance(value, str) and _INTEGER.match(value)) or (isinstance(value, float) and value.is_integer()):
        n = int(value)
    else:
        raise Unsupported(f"{value!r} for an integer")
    lo, hi = _RANGES[field_type]
    if not lo <= n <= hi:
        raise Unsupported(f"{n} out of range")
    return n


_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT_MAX = 3.4028234663852886e38


def _float(value: Any, field_type: int) -> float:
    if isinstance(value, bool):
        raise Unsupported("bool for a number")
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str) and value in _FLOAT_WORDS:
        x = _FLOAT_WORDS[value]
    else:
        raise Unsupported(f"{value!r} for a number")
    if field_type == FieldDescriptor.TYPE_FLOAT and math.isfinite(x) and abs(x) > _FLOAT_MAX:
        raise Unsupported(f"{x} out of float range")
    return x


def _scalar_payload(f: FieldDescriptor) -> tuple[int, Callable[[Any], bytes]]:
    """(wire type, JSON value -> payload) for a scalar field."""
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        def string(v: Any) -> bytes:
            if not isinstance(v, str):
                raise Unsupported(f"{v!r} for a string")
            data = v.encode()
            return varint(len(data)) + data
        return 2, string
    if t == FieldDescriptor.TYPE_BOOL:
        def boolean(v: Any) -> bytes:
            if not isinstance(v, bool):
                raise Unsupported(f"{v!r} for a bool")
            return b"\x01" if v else b"\x00"
        return 0, boolean
    if t == FieldDescriptor.TYPE_ENUM:
        enum = f.enum_type
        assert enum is not None
        by_name = {v.name: v.number for v in enum.values}
        numbers = {v.number for v in enum.values}
        closed = getattr(enum, "is_closed", False)

        def enumerated(v: Any) -> bytes:
            if isinstance(v, str):
                if v not in by_name:
                    raise Unsupported(f"enum value {v!r}")
                return varint(by_name[v])
            if isinstance(v, int) and not isinstance(v, bool) and -(1 << 31) <= v < (1 << 31):
                if closed and v not in numbers:
                    raise Unsupported(f"enum number {v}")
                return varint(v)
            raise Unsupported(f"{v!r} for an enum")
        return 0, enumerated
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_UINT64):
        return 0, lambda v: varint(_integer(v, t))
    if t in (FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64):
        bits = 31 if t == FieldDescriptor.TYPE_SINT32 else 63

        def zigzag(v: Any) -> bytes:
            n = _integer(v, t)
            return varint((n << 1) ^ (n >> bits))
        return 0, zigzag
    if t in (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
        fmt32 = "<I" if t == FieldDescriptor.TYPE_FIXED32 else "<i"
        return 5, lambda v: struct.pack(fmt32, _integer(v, t))
    if t in (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64):
        fmt64 = "<Q" if t == FieldDescriptor.TYPE_FIXED64 else "<q"
        return 1, lambda v: struct.pack(fmt64, _integer(v, t))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return 1, lambda v: struct.pack("<d", _float(v, t))
    if t == FieldDescriptor.TYPE_FLOAT:
        return 5, lambda v: struct.pack("<f", _float(v, t))
    raise Unsupported(f"field type {t}")  # bytes (base64) and groups: ParseDict's


_ZERO: dict[int, Any] = {t: 0 for t in _RANGES} | {
    FieldDescriptor.TYPE_STRING: "", FieldDescriptor.TYPE_BOOL: False, FieldDescriptor.TYPE_ENUM: 0,
    FieldDescriptor.TYPE_DOUBLE: 0.0, FieldDescriptor.TYPE_FLOAT: 0.0}
"""Each scalar type's default, whose payload an implicit-presence field does not write (as protobuf)."""


# --- fields -------------------------------------------------------------------------------------------


def _writer(f: FieldDescriptor, *, always: bool = False) -> Writer:
    """`always`: write a default value too (a map entry's value, which protobuf always writes)."""
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        sub = f.message_type
        assert sub is not None
        tag = _tag(f.number, 2)
        if sub.GetOptions().map_entry:
            return _map_writer(f, sub, tag)
        body = _body(sub)
        if body is None:  # a plain message (most of them): `encode` called directly, one frame fewer
            type_name = sub.full_name

            def one(v: Any) -> bytes:
                if _scope.shared:  # a snapshot's resources: a nested object shared by many is written once
                    hit = _written.get(id(v))
                    if hit is not None and hit[0] is v and hit[1] == type_name:
                        return tag + hit[2]
                    payload = encode(sub, v)
                    n = len(payload)
                    framed = (_SMALL[n] if n < 0x80 else varint(n)) + payload
                    if len(_written) >= _WRITTEN_MAX:
                        _written.clear()
                    _written[id(v)] = (v, type_name, framed)
                    return tag + framed
                payload = encode(sub, v)
                n = len(payload)
                return tag + (_SMALL[n] if n < 0x80 else varint(n)) + payload
        else:
            def one(v: Any) -> bytes:
                payload = body(v)
                n = len(payload)
                return tag + (_SMALL[n] if n < 0x80 else varint(n)) + payload

        if f.is_repeated:
            def many(v: Any) -> bytes:
                if type(v) is not list and not isinstance(v, list | tuple):
                    raise Unsupported(f"{f.full_name}: not a list")
                if None in v:
                    raise Unsupported(f"{f.full_name}: null in a list")
                return b"".join([one(item) for item in v])
            return many
        return one
    if f.type == FieldDescriptor.TYPE_BYTES or f.type == FieldDescriptor.TYPE_GROUP:
        def unsupported(v: Any) -> bytes:
            raise Unsupported(f"{f.full_name}: bytes")
        return unsupported
    wire_type, payload = _scalar_payload(f)
    stag = _tag(f.number, wire_type)
    if f.is_repeated and wire_type != 2:
        ptag = _tag(f.number, 2)

        def packed(v: Any) -> bytes:  # proto3 packs repeated numbers
            if not isinstance(v, list | tuple):
                raise Unsupported(f"{f.full_name}: not a list")
            return _delimited(ptag, b"".join(payload(item) for item in v)) if v else b""
        return packed
    if f.is_repeated:
        def strings(v: Any) -> bytes:
            if not isinstance(v, list | tuple):
                raise Unsupported(f"{f.full_name}: not a list")
            return b"".join(stag + payload(item) for item in v)
        return strings
    if f.type == FieldDescriptor.TYPE_STRING:  # the common case, written without the generic payload call
        def string(v: Any) -> bytes:
            if type(v) is not str:
                raise Unsupported(f"{v!r} for a string")
            if not v and not f.has_presence and not always:
                return b""
            data = v.encode()
            n = len(data)
            return stag + (_SMALL[n] if n < 0x80 else varint(n)) + data
        return string
    if not f.has_presence and not always:
        zero = payload(_ZERO[f.type])

        def implicit(v: Any) -> bytes:
            data = payload(v)  # validates, even when the default is not written
            return b"" if data == zero else stag + data
        return implicit
    return lambda v: stag + payload(v)


def _body(sub: Descriptor) -> Callable[[Any], bytes] | None:
    """JSON value -> the bytes of a nested message of type `sub` (without its tag and length), for the
    types whose JSON form is a scalar; None for the rest (`encode`)."""
    if sub.full_name == "google.protobuf.Value":
        return _value
    if sub.full_name in _WRAPPERS:
        return lambda v: _wrapper(sub, v)
    if sub.full_name == "google.protobuf.Duration":
        return _duration
    return None


def _message(sub: Descriptor, v: Any) -> bytes:
    body = _body(sub)
    return encode(sub, v) if body is None else body(v)


def _map_writer(f: FieldDescriptor, entry: Descriptor, tag: bytes) -> Writer:
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    key_type = key_field.type
    value_writer = _writer(value_field, always=True)

    def key_bytes(k: str) -> bytes:
        if key_type == FieldDescriptor.TYPE_STRING:
            data = k.encode()
            return b"\x0a" + varint(len(data)) + data
        if key_type == FieldDescriptor.TYPE_BOOL:
            if k not in ("true", "false"):
                raise Unsupported(f"map key {k!r}")
            return b"\x08" + (b"\x01" if k == "true" else b"\x00")
        raise Unsupported("a map with non-string keys")

    def entries(v: Any) -> bytes:
        if not isinstance(v, Mapping):
            raise Unsupported(f"{f.full_name}: not an object")
        out = []
        for k in sorted(v):  # as SerializeToString(deterministic=True)
            item = v[k]
            if item is None:
                raise Unsupported("null map value")
            body = key_bytes(k) + value_writer(item)
            out.append(_delimited(tag, body))
        return b"".join(out)
    return entries


# --- well-known types -----------------------------------------------------------------------------------

_WRAPPERS = {f"google.protobuf.{n}Value" for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32",
                                                     "Bool", "String")}
_wrapper_writers: dict[str, Writer] = {}


def _wrapper(sub: Descriptor, v: Any) -> bytes:
    writer = _wrapper_writers.get(sub.full_name)
    if writer is None:
        writer = _wrapper_writers[sub.full_name] = _writer(sub.fields_by_name["value"])
    return writer(v)


_DURATION = re.compile(r"(-)?([0-9]+)(?:\.([0-9]{1,9}))?s\Z")
_MAX_DURATION_S = 315_576_000_000


def _duration(v: Any) -> bytes:
    m = _DURATION.match(v) if isinstance(v, str) else None
    if m is None:
        raise Unsupported(f"duration {v!r}")
    seconds = int(m.group(2))
    nanos = int((m.group(3) or "0").ljust(9, "0"))
    if seconds > _MAX_DURATION_S:
        raise Unsupported(f"duration {v!r} out of range")
    if m.group(1):
        seconds, nanos = -seconds, -nanos
    out = b""
    if seconds:
        out += b"\x08" + varint(seconds)
    if nanos:
        out += b"\x10" + varint(nanos)
    return out


def _value(v: Any) -> bytes:
    """google.protobuf.Value: null_value = 1, number_value = 2, string_value = 3, bool_value = 4,
    struct_value = 5, list_value = 6."""
    if v is None:
        return b"\x08\x00"
    if isinstance(v, bool):
        return b"\x20" + (b"\x01" if v else b"\x00")
    if isinstance(v, int | float):
        x = float(v)
        if not math.isfinite(x):
            raise Unsupported("a non-finite Value")
        return b"\x11" + struct.pack("<d", x)
    if isinstance(v, str):
        data = v.encode()
        return b"\x1a" + varint(len(data)) + data
    if isinstance(v, Mapping):
        return _delimited(b"\x2a", _struct_fields(v))
    if isinstance(v, list | tuple):
        return _delimited(b"\x32", b"".join(_delimited(b"\x0a", _value(item)) for item in v))
    raise Unsupported(f"{type(v).__name__} in a Value")


def _struct_fields(v: Mapping[str, Any]) -> bytes:
    """Struct.fields (map<string, Value> = 1), keys sorted."""
    out = []
    for k in sorted(v):
        if not isinstance(k, str):
            raise Unsupported("a non-string Struct key")
        data = k.encode()
        out.append(_delimited(b"\x0a", b"\x0a" + varint(len(data)) + data + _delimited(b"\x12", _value(v[k]))))
    return b"".join(out)


def _special_struct(descriptor: Descriptor, v: Mapping[str, Any]) -> bytes:
    return _struct_fields(v)


def _special_any(descriptor: Descriptor, v: Mapping[str, Any]) -> bytes:
    """An Any in JSON: `@type` plus the packed message's fields, or `value` for a well-known type."""
    if not v:
        return b""
    type_url = v.get("@type")
    if not isinstance(type_url, str) or "/" not in type_url:
        raise Unsupported("an Any without @type")
    try:
        packed = descriptor_pool.Default().FindMessageTypeByName(type_url.rsplit("/", 1)[1])
    except KeyError:
        raise Unsupported(f"unknown @type {type_url!r}") from None
    rest = {k: item for k, item in v.items() if k != "@type"}
    if packed.full_name in _WRAPPERS or packed.full_name in ("google.protobuf.Duration", "google.protobuf.Value",
                                                            "google.protobuf.Struct"):
        if set(rest) != {"value"}:
            raise Unsupported("a well-known type in an Any without `value`")
        inner = _message(packed, rest["value"]) if packed.full_name != "google.protobuf.Struct" else (
            _struct_fields(rest["value"]) if isinstance(rest["value"], Mapping) else _unsupported_struct())
    elif packed.full_name.startswith("google.protobuf."):
        raise Unsupported(f"{packed.full_name} in an Any")
    else:
        inner = encode(packed, rest)
    url = type_url.encode()
    return b"\x0a" + varint(len(url)) + url + (_delimited(b"\x12", inner) if inner else b"")


def _unsupported_struct() -> bytes:
    raise Unsupported("a Struct that is not an object")


def _refuse(descriptor: Descriptor, v: Mapping[str, Any]) -> bytes:
    raise Unsupported(descriptor.full_name)


_SPECIAL: dict[str, Callable[[Descriptor, Mapping[str, Any]], bytes]] = {
    "google.protobuf.Any": _special_any,
    "google.protobuf.Struct": _special_struct,
    **{f"google.protobuf.{n}": _refuse for n in ("Timestamp", "FieldMask", "ListValue", "Duration", "Value",
                                                  "DoubleValue", "FloatValue", "Int64Value", "UInt64Value",
                                                  "Int32Value", "UInt32Value", "BoolValue", "StringValue",
                                                  "BytesValue")},
}
"""Messages whose JSON form is not an object of their fields. Those refused here are either written by
`_message` from their JSON scalar form before `encode` is reached, or left to ParseDict."""
