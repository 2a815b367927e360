"""`Snapshot.consistent` finds a resource's SDS references by scanning its serialised bytes first
(`wire.may_name_secrets`) and walking its dicts only when they may hold one. These tests hold that scan to
the full walk on every resource of every secured golden mesh, and on references it could miss: inside an
Any, inside a Struct, and in a set that was never serialised."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.xds import wire
from mesh.xds.snapshot import CLUSTER, PUSH_ORDER, ResourceSet, Snapshot, _sds_names
from tests.unit.policies.test_policy_render import GOLDEN, render_case

CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())


def _resources(snaps: dict[str, Snapshot]) -> list[tuple[str, Any, str]]:
    return [(t, part[name], part.digests[name]) for snap in snaps.values() for t in PUSH_ORDER
            for part in snap.parts[t] for name in part]


@pytest.mark.parametrize("case", CASES)
def test_the_scan_never_skips_a_resource_the_walk_finds_a_secret_in(case: str) -> None:
    resources = _resources(render_case(case))
    skipped = named = 0
    for type_url, resource, digest in resources:
        found = _sds_names(resource)
        if not wire.may_name_secrets(type_url, digest):
            assert not found, (type_url, resource.get("name"))
            skipped += 1
        named += bool(found)
    assert named, "a secured mesh names secrets: the case tests nothing"
    assert skipped > len(resources) // 2, "most resources (routes, endpoints) hold no secret: the scan skips them"


@pytest.mark.parametrize("case", CASES)
def test_each_parts_secret_references_are_the_full_walks(case: str) -> None:
    for snap in render_case(case).values():
        for t in PUSH_ORDER:
            for part in snap.parts[t]:
                walked = frozenset().union(*(_sds_names(part[n]) for n in part))
                assert part.refs()[2] == walked, (t, sorted(part))


def _cluster(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"service_name": name, "eds_config": {"ads": {}}},
            **extra}


TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
SDS = {"name": "spiffe://t/ns/a/sa/b", "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def test_a_reference_inside_an_any_is_found() -> None:
    tls = _cluster("a", transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS, "common_tls_context": {"tls_certificate_sds_secret_configs": [SDS]}}})
    part = ResourceSet([tls])
    part.bind(CLUSTER)
    assert wire.may_name_secrets(CLUSTER, part.digests["a"])
    assert part.refs()[2] == {SDS["name"]}


def test_a_reference_inside_a_struct_is_found_as_the_walk_finds_it() -> None:
    """Envoy would not fetch it, but the walk counts any `{name, sds_config}`: the scan must not be
    narrower than it (a Struct's keys are bytes on the wire; no type name says a secret is there)."""
    meta = _cluster("a", metadata={"filter_metadata": {"x": {"ref": SDS}}})
    part = ResourceSet([meta])
    part.bind(CLUSTER)
    assert wire.may_name_secrets(CLUSTER, part.digests["a"])
    assert part.refs()[2] == {SDS["name"]}


def test_a_plain_cluster_is_not_walked_and_names_nothing() -> None:
    part = ResourceSet([_cluster("a")])
    part.bind(CLUSTER)
    assert not wire.may_name_secrets(CLUSTER, part.digests["a"])
    assert part.refs()[2] == frozenset()


def test_bytes_the_cache_does_not_hold_are_walked() -> None:
    assert wire.may_name_secrets(CLUSTER, "no-such-digest")
    unbound = ResourceSet([_cluster("a", transport_socket={"name": "tls", "typed_config": {
        "@type": TLS, "common_tls_context": {"tls_certificate_sds_secret_configs": [SDS]}}})])
    assert unbound.refs()[2] == {SDS["name"]}  # never bound to a type: no bytes, the walk


def test_a_type_defined_after_its_name_was_first_looked_up_is_still_recognised() -> None:
    """A name no message has is not remembered as "no secrets": a module imported later may define it."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    name = b"lockgate_test_scan.Late"
    assert not wire._carries_secrets(name)  # looked up before it exists (a route path could spell it)
    proto = descriptor_pb2.FileDescriptorProto(name="lockgate_test_scan_late.proto", package="lockgate_test_scan",
                                               syntax="proto3")
    msg = proto.message_type.add(name="Late")
    msg.field.add(name="sds_config", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    descriptor_pool.Default().Add(proto)
    assert wire._carries_secrets(name)


def test_a_bound_set_whose_bytes_the_cache_dropped_is_walked() -> None:
    tls = _cluster("a", transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS, "common_tls_context": {"tls_certificate_sds_secret_configs": [SDS]}}})
    part = ResourceSet([tls])
    part.bind(CLUSTER)
    digest = part.digests["a"]
    wire._cache.clear()  # what an LRU eviction leaves: the digest, no bytes under it
    assert wire.may_name_secrets(CLUSTER, digest)
    assert part.refs()[2] == {SDS["name"]}
