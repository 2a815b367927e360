"""The direct JSON -> wire encoder (`mesh.xds.encode`) writes exactly what ParseDict + SerializeToString
writes, and refuses (so that ParseDict decides) everything ParseDict rejects."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

import mesh.render  # noqa: F401 - registers the Any types render emits
from mesh.xds import wire
from mesh.xds.encode import Unsupported, encode_as
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET

GOLDEN = Path(__file__).parent / "golden"
KEYS = {"listeners": LISTENER, "routes": ROUTE, "clusters": CLUSTER, "endpoints": ENDPOINT,
        "scoped_routes": SCOPED_ROUTE, "secrets": SECRET}


def reference(cls: type[Message], value: Any) -> bytes:
    msg = cls()
    json_format.ParseDict(value, msg)
    return msg.SerializeToString(deterministic=True)


def golden_resources() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for case in sorted(GOLDEN.iterdir()):
        path = case / "xds.json"
        if not path.exists():
            continue
        for node, snap in json.loads(path.read_text()).items():
            for key, type_url in KEYS.items():
                for i, res in enumerate(snap.get(key, [])):
                    out.append((f"{case.name}/{node}/{key}[{i}]", type_url, res))
    return out


GOLDEN_RESOURCES = golden_resources()


def test_there_are_golden_resources_of_every_routed_type() -> None:
    types = {t for _, t, _ in GOLDEN_RESOURCES}
    assert {LISTENER, ROUTE, CLUSTER, ENDPOINT} <= types
    assert len(GOLDEN_RESOURCES) > 50


@pytest.mark.parametrize(("label", "type_url", "resource"), GOLDEN_RESOURCES,
                         ids=[label for label, _, _ in GOLDEN_RESOURCES])
def test_every_golden_resource_encodes_to_protobufs_own_bytes(label: str, type_url: str,
                                                              resource: dict[str, Any]) -> None:
    cls = wire.message_class(type_url)
    assert encode_as(cls, resource) == reference(cls, resource)


def rendered_resources(*, canary_weight: int) -> list[tuple[str, str, Any, str]]:
    """(type URL, name, resource, its digest) of everything a 20-service mesh with canaries renders (the
    sidecars and the ingress), serialised cold, as snapshots are."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[3] / "bench"))
    import scale  # type: ignore[import-not-found]

    from mesh.render import RenderCache, render

    wire.forget()
    topo = scale.topology(4, 20, list(range(30000, 30009)))
    snaps = render(intent=scale.big_intent(20, canary_weight=canary_weight), topology=topo, revision="r",
                   cache=RenderCache())
    out = [(type_url, name, part[name], part.digests[name]) for snap in snaps.values()
           for type_url, parts in snap.parts.items() for part in parts for name in part]
    assert len(out) > 100
    return out


def test_a_rendered_mesh_encodes_to_protobufs_own_bytes() -> None:
    for type_url, name, resource, _ in rendered_resources(canary_weight=10):
        cls = wire.message_class(type_url)
        assert encode_as(cls, resource) == reference(cls, resource), (type_url, name)


def test_a_rendered_mesh_serialised_as_snapshots_are_is_protobufs_own_bytes() -> None:
    """The snapshot path (wire.typed_digest: nested objects shared by many resources written once, under
    `shared_objects`) gives every resource the bytes ParseDict gives it, and a digest of those bytes."""
    import hashlib

    for type_url, name, resource, d in rendered_resources(canary_weight=20):
        cls = wire.message_class(type_url)
        packed = wire.to_any(type_url, resource, content_digest=d).value
        assert cls.FromString(packed) == cls.FromString(reference(cls, resource)), (type_url, name)
        if type_url != ROUTE:  # a route configuration is assembled from its virtual hosts' bytes
            assert packed == reference(cls, resource), (type_url, name)
        assert d == hashlib.sha256(packed).hexdigest()[:16]


def test_outside_shared_objects_an_edited_dict_is_written_as_edited() -> None:
    from mesh.xds.encode import shared_objects

    inner = {"text": "before"}
    with shared_objects():
        first = encode_as(ALL, {"child": inner, "children": [inner]})
        again = encode_as(ALL, {"child": inner})
    assert ALL.FromString(first).child.text == "before"  # type: ignore[attr-defined]
    assert ALL.FromString(again).child.text == "before"  # type: ignore[attr-defined]
    inner["text"] = "after"
    assert ALL.FromString(encode_as(ALL, {"child": inner})).child.text == "after"  # type: ignore[attr-defined]


# --- every scalar kind, on a message of our own -------------------------------------------------------


def _scalars_message() -> type[Message]:
    f = descriptor_pb2.FileDescriptorProto(name="lockgate_test_encode.proto", package="lockgate.test.encode",
                                           syntax="proto3",
                                           dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto",
                                                       "google/protobuf/struct.proto",
                                                       "google/protobuf/wrappers.proto"])
    enum = f.enum_type.add(name="Colour")
    for i, n in enumerate(("NONE", "RED", "GREEN")):
        enum.value.add(name=n, number=i)
    m = f.message_type.add(name="All")
    T = descriptor_pb2.FieldDescriptorProto
    kinds = [("i32", T.TYPE_INT32), ("i64", T.TYPE_INT64), ("u32", T.TYPE_UINT32), ("u64", T.TYPE_UINT64),
             ("s32", T.TYPE_SINT32), ("s64", T.TYPE_SINT64), ("f32", T.TYPE_FIXED32), ("f64", T.TYPE_FIXED64),
             ("sf32", T.TYPE_SFIXED32), ("sf64", T.TYPE_SFIXED64), ("dbl", T.TYPE_DOUBLE), ("flt", T.TYPE_FLOAT),
             ("yes", T.TYPE_BOOL), ("text", T.TYPE_STRING)]
    number = 1
    for name, kind in kinds:
        m.field.add(name=name, number=number, type=kind, label=T.LABEL_OPTIONAL, json_name=_camel(name))
        m.field.add(name=f"many_{name}", number=number + 1, type=kind, label=T.LABEL_REPEATED,
                    json_name=_camel(f"many_{name}"))
        number += 2
    m.field.add(name="colour", number=100, type=T.TYPE_ENUM, type_name=".lockgate.test.encode.Colour",
                label=T.LABEL_OPTIONAL, json_name="colour")
    m.field.add(name="child", number=101, type=T.TYPE_MESSAGE, type_name=".lockgate.test.encode.All",
                label=T.LABEL_OPTIONAL, json_name="child")
    m.field.add(name="children", number=102, type=T.TYPE_MESSAGE, type_name=".lockgate.test.encode.All",
                label=T.LABEL_REPEATED, json_name="children")
    for name, number, type_name in (("timeout", 103, ".google.protobuf.Duration"),
                                    ("count", 104, ".google.protobuf.UInt32Value"),
                                    ("flag", 105, ".google.protobuf.BoolValue"),
                                    ("meta", 106, ".google.protobuf.Struct"),
                                    ("anything", 107, ".google.protobuf.Any"),
                                    ("val", 108, ".google.protobuf.Value")):
        m.field.add(name=name, number=number, type=T.TYPE_MESSAGE, type_name=type_name, label=T.LABEL_OPTIONAL,
                    json_name=name)
    entry = m.nested_type.add(name="LabelsEntry", options=descriptor_pb2.MessageOptions(map_entry=True))
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL, json_name="key")
    entry.field.add(name="value", number=2, type=T.TYPE_INT32, label=T.LABEL_OPTIONAL, json_name="value")
    m.field.add(name="labels", number=109, type=T.TYPE_MESSAGE, type_name=".lockgate.test.encode.All.LabelsEntry",
                label=T.LABEL_REPEATED, json_name="labels")
    m.oneof_decl.add(name="choice")
    m.field.add(name="left", number=110, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL, oneof_index=0,
                json_name="left")
    m.field.add(name="right", number=111, type=T.TYPE_UINT32, label=T.LABEL_OPTIONAL, oneof_index=0,
                json_name="right")
    m.oneof_decl.add(name="_maybe")
    m.field.add(name="maybe", number=112, type=T.TYPE_INT32, label=T.LABEL_OPTIONAL, oneof_index=1,
                proto3_optional=True, json_name="maybe")
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName("lockgate.test.encode.All")
    except KeyError:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("lockgate.test.encode.All"))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


ALL = _scalars_message()

ACCEPTED: list[dict[str, Any]] = [
    {},
    {"i32": -1, "i64": -(1 << 63), "u32": (1 << 32) - 1, "u64": str((1 << 64) - 1), "s32": -(1 << 31),
     "s64": (1 << 63) - 1, "f32": 7, "f64": "18446744073709551615", "sf32": -5, "sf64": "-9", "dbl": 1.5,
     "flt": 0.25, "yes": True, "text": "héllo ✓"},
    {"i32": 0, "u32": 0, "text": "", "yes": False, "dbl": 0, "colour": "NONE"},  # defaults: not written
    {"i32": 3.0, "i64": "42", "dbl": "Infinity", "flt": "-Infinity"},
    {"manyI32": [1, -1, 300], "many_text": ["a", "", "c"], "many_yes": [True, False], "many_dbl": [0.5, -2],
     "many_s64": [-1, 1], "many_f32": [], "manySf64": [-3]},
    {"colour": "GREEN"}, {"colour": 1}, {"colour": 7},  # proto3 enums are open
    {"child": {"child": {"text": "deep"}, "i32": 5}, "children": [{}, {"u64": 1}, {"colour": "RED"}]},
    {"timeout": "1.5s"}, {"timeout": "0s"}, {"timeout": "-0.000000001s"}, {"timeout": "315576000000s"},
    {"count": 0}, {"count": 17}, {"flag": False}, {"flag": True},
    {"meta": {"a": 1, "b": [True, None, "x", {"c": 2.5}], "d": {}, "e": None}},
    {"val": None}, {"val": [1, "two"]}, {"val": {"k": "v"}},
    {"anything": {"@type": "type.googleapis.com/lockgate.test.encode.All", "text": "inner", "i32": -2}},
    {"anything": {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "2s"}},
    {"anything": {"@type": "type.googleapis.com/google.protobuf.UInt32Value", "value": 3}},
    {"anything": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {"x": 1}}},
    {"anything": {"@type": "type.googleapis.com/lockgate.test.encode.All"}}, {"anything": {}},
    {"labels": {"b": 2, "a": 1, "zero": 0}},
    {"left": ""}, {"right": 0}, {"left": "x", "maybe": 0}, {"maybe": -4},
    {"text": None, "child": None},  # null is the default
    {"flt": 3.4028234663852886e38}, {"i32": (1 << 31) - 1},
    {"children": ({"text": "t"},), "many_text": ("a", "b"), "many_i32": (1, 2)},  # tuples, as ParseDict takes them
]


@pytest.mark.parametrize("value", ACCEPTED, ids=[json.dumps(v)[:60] for v in ACCEPTED])
def test_every_kind_of_field_encodes_to_protobufs_own_bytes(value: dict[str, Any]) -> None:
    expected = reference(ALL, value)
    got = encode_as(ALL, value)
    assert ALL.FromString(got) == ALL.FromString(expected)
    assert got == expected


def test_explicit_presence_is_kept_for_zero_values() -> None:
    """A oneof member or a proto3 `optional` field set to its default is still set (ParseDict sets it)."""
    msg = ALL.FromString(encode_as(ALL, {"right": 0, "maybe": 0, "count": 0}))
    assert msg.WhichOneof("choice") == "right"
    assert msg.HasField("maybe") and msg.HasField("count")


def test_nan_is_written_as_nan() -> None:
    msg: Any = ALL.FromString(encode_as(ALL, {"dbl": "NaN"}))
    assert math.isnan(msg.dbl)


REFUSED: list[dict[str, Any]] = [
    {"nope": 1},  # unknown field
    {"i32": 1 << 31}, {"u32": -1}, {"u64": 1 << 64}, {"i32": True}, {"i32": 1.5},
    {"yes": 1}, {"yes": "true"}, {"text": 5}, {"colour": "BLUE"}, {"flt": 1e39},
    {"many_i32": 1}, {"many_i32": [1, None]}, {"children": [None]}, {"children": {}},
    {"child": "x"}, {"child": {"nope": 1}},
    {"timeout": "1"}, {"timeout": 1}, {"timeout": "315576000001s"},
    {"left": "x", "right": 1},  # two members of one oneof
    {"labels": {"a": None}}, {"labels": {"a": "x"}}, {"labels": []},
    {"anything": {"text": "no type"}}, {"anything": {"@type": "type.googleapis.com/no.such.Type"}},
    {"anything": {"@type": "type.googleapis.com/lockgate.test.encode.All", "nope": 1}},
    {"meta": [1]},
]
LENIENT: list[dict[str, Any]] = [
    {"i32": "1.0"}, {"colour": True}, {"dbl": "1.5"}, {"dbl": True}, {"timeout": "1.0000000001s"},
    {"many_i32": [1], "manyI32": [2]},
    {"anything": {"@type": "type.googleapis.com/google.protobuf.Duration"}}, {"val": math.nan},
]
"""Refused by the encoder, whatever ParseDict then makes of them (it accepts some)."""


@pytest.mark.parametrize("value", REFUSED, ids=[repr(v)[:60] for v in REFUSED])
def test_what_parsedict_rejects_is_refused(value: dict[str, Any]) -> None:
    with pytest.raises(json_format.ParseError):
        reference(ALL, value)
    with pytest.raises(Unsupported):
        encode_as(ALL, value)


ALL_URL = "type.googleapis.com/lockgate.test.encode.All"


@pytest.mark.parametrize("value", REFUSED + LENIENT, ids=[repr(v)[:60] for v in REFUSED + LENIENT])
def test_what_the_encoder_refuses_is_what_parsedict_makes_of_it(value: dict[str, Any]) -> None:
    """The encoder never decides alone: to_any_bytes falls back to ParseDict, bytes or error."""
    with pytest.raises(Unsupported):
        encode_as(ALL, value)
    try:
        expected = reference(ALL, value)
    except Exception:  # whatever ParseDict raises, to_any_bytes names it as a ValueError
        with pytest.raises(ValueError):
            wire.to_any_bytes(ALL_URL, value)
        return
    assert wire.to_any(ALL_URL, value).value == expected


def test_a_value_nested_thousands_deep_is_refused_and_parsedict_names_it() -> None:
    """A careless (or hostile) resource: a Struct 5000 levels deep. The encoder does not crash on it; the
    caller gets ParseDict's depth error as a ValueError, and the process goes on serialising."""
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(5000):
        inner["k"] = {}
        inner = inner["k"]
    with pytest.raises(Unsupported):
        encode_as(ALL, {"meta": deep})
    with pytest.raises(ValueError):
        wire.to_any_bytes(ALL_URL, {"meta": deep})
    assert ALL.FromString(encode_as(ALL, {"text": "after"})).text == "after"  # type: ignore[attr-defined]


def test_a_bad_resource_still_gets_parsedicts_error_through_to_any_bytes() -> None:
    with pytest.raises(ValueError, match="no field named"):
        wire.to_any_bytes(CLUSTER, {"name": "c", "conect_timeout": "1s"})
    with pytest.raises(ValueError, match="Cluster 'c'"):
        wire.to_any_bytes(CLUSTER, {"name": "c", "type": "NOT_A_TYPE"})
