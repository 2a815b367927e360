"""Security of TCP services: mTLS around the inbound tcp_proxy and on the callers' clusters, network RBAC
by peer identity, a connection rate limit; and validation refusing HTTP-only rule fields on TCP services."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.names import sni
from mesh.xds.snapshot import CLUSTER, LISTENER, Snapshot
from reconciler.load import load
from reconciler.pipeline import PLANNED_NOW, ephemeral_certificates, render_mesh
from tests.unit.mesh.test_tcp_render import MESH, ROUTE_80_20, intent_of, topo

POLICIES = """\
---
apiVersion: lockgate.io/v1alpha1
kind: PeerAuthentication
metadata: {name: echo, namespace: shop}
spec: {selector: {service: echo}, mtls: {mode: STRICT}}
---
apiVersion: lockgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: shop}
spec:
  selector: {service: echo}
  action: DENY
  rules: [{from: [{principals: [example.org/ns/shop/sa/client]}]}]
---
apiVersion: lockgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: shop-only, namespace: shop}
spec:
  selector: {service: echo}
  rules: [{from: [{namespaces: [shop]}], to: [{ports: [9000]}]}]
---
apiVersion: lockgate.io/v1alpha1
kind: RateLimit
metadata: {name: echo, namespace: shop}
spec: {service: echo, requestsPerUnit: 10, unit: second, burst: 20}
"""
TCP_PROXY = "envoy.filters.network.tcp_proxy"


def rendered(text: str) -> dict[str, Snapshot]:
    out = render_mesh(intent=intent_of(text), states={}, topologies={"east": topo()},
                      certs=ephemeral_certificates(["east"]), now=PLANNED_NOW.timestamp(), revision="r1")
    assert out["east"].error is None
    return out["east"].snapshots


def inbound(snaps: dict[str, Snapshot], node: str = "east/shop/echo-v1-0") -> dict[str, Any]:
    return dict(snaps[node].items(LISTENER)["inbound"])


def test_the_inbound_tcp_chain_is_rbac_then_the_connection_bucket_then_tcp_proxy_inside_strict_mtls() -> None:
    listener = inbound(rendered(MESH + ROUTE_80_20 + POLICIES))
    (chain,) = listener["filter_chains"]  # STRICT: no plaintext chain
    assert [f["name"] for f in chain["filters"]] == [
        "envoy.filters.network.rbac.deny", "envoy.filters.network.rbac.allow", "envoy.filters.network.local_ratelimit",
        TCP_PROXY]
    deny, allow, bucket, _ = (f["typed_config"] for f in chain["filters"])
    assert deny["rules"] == {"action": "DENY", "policies": {"shop/no-client[0]": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://example.org/ns/shop/sa/client"}}}]}}}
    assert allow["rules"] == {"action": "ALLOW", "policies": {"shop/shop-only[0]": {
        "permissions": [{"destination_port": 20010}],  # every port of the service arrives at this listener
        "principals": [{"authenticated": {"principal_name": {"safe_regex": {
            "regex": "spiffe://[^/]+/ns/shop/sa/[^/]+"}}}}]}}}
    assert deny["stat_prefix"] == "lockgate_authz_deny." and allow["stat_prefix"] == "lockgate_authz_allow."
    # 10 connections a second, 20 at once: exact steps of 1 token every 100 ms.
    assert bucket["token_bucket"] == {"max_tokens": 20, "tokens_per_fill": 1, "fill_interval": "0.100s"}
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True and "alpn_protocols" not in tls["common_tls_context"]


def test_without_policies_the_chain_is_tcp_proxy_alone_and_permissive_keeps_a_plaintext_chain() -> None:
    listener = inbound(rendered(MESH + ROUTE_80_20))
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert set(chains) == {"inbound-mtls", "inbound-plaintext"}  # the Mesh's default mode, PERMISSIVE
    assert all([f["name"] for f in c["filters"]] == [TCP_PROXY] for c in chains.values())
    assert "transport_socket" in chains["inbound-mtls"] and "transport_socket" not in chains["inbound-plaintext"]
    # a policy applies to both chains: a plaintext peer has no identity, so a principal rule never allows it
    listener = inbound(rendered(MESH + ROUTE_80_20 + POLICIES.replace("mode: STRICT", "mode: PERMISSIVE")))
    assert all(len(c["filters"]) == 4 for c in listener["filter_chains"])


def test_the_callers_tcp_clusters_originate_mtls_to_the_versions_identity() -> None:
    snaps = rendered(MESH + ROUTE_80_20 + POLICIES)
    cluster = dict(snaps["east/shop/client-v1-0"].items(CLUSTER)["outbound|echo.shop|v2"])
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == sni("shop", "echo", "v2")  # what an east-west gateway routes by
    sans = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert sans["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://example.org/ns/shop/sa/echo"}}]
    assert "alpn_protocols" not in tls["common_tls_context"]  # opaque bytes: no HTTP/2 offered


def test_an_http_service_keeps_its_route_level_filters() -> None:
    chain = inbound(rendered(MESH + ROUTE_80_20 + POLICIES), "east/shop/client-v1-0")["filter_chains"][0]
    assert [f["name"] for f in chain["filters"]] == ["envoy.filters.network.http_connection_manager"]


def problems(text: str) -> list[str]:
    return [str(p) for p in load({"mesh.yaml": text.encode()}).problems]


@pytest.mark.parametrize("selector", ["selector: {service: echo}", "selector: null"])
def test_paths_and_methods_on_a_tcp_service_are_errors_with_their_line(selector: str) -> None:
    policy = f"""\
---
apiVersion: lockgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: http-only, namespace: shop}}
spec:
  {selector}
  rules:
    - to:
        - methods: [GET]
          paths: [/x]
        - ports: [9000]
"""
    found = problems(MESH + ROUTE_80_20 + policy)
    why = "service 'echo' speaks TCP" if "echo" in selector else \
        "it applies to TCP service(s) 'echo' (no selector); select the HTTP service instead"
    assert found == [f"mesh.yaml:36: spec.rules[0].to[0].methods: methods need HTTP, but {why}: at L4 only "
                     "principals, namespaces and ports can be checked",
                     f"mesh.yaml:37: spec.rules[0].to[0].paths: paths need HTTP, but {why}: at L4 only "
                     "principals, namespaces and ports can be checked"]
    # the same rule on the HTTP service is fine
    assert problems(MESH + ROUTE_80_20 + policy.replace(selector, "selector: {service: client}")
                    .replace("ports: [9000]", "ports: [8080]")) == []


def test_the_policies_above_are_valid() -> None:
    assert problems(MESH + ROUTE_80_20 + POLICIES) == []


def test_a_tcp_service_rate_limit_has_no_rule() -> None:
    rule = POLICIES.replace("unit: second, burst: 20}", "unit: second, burst: 20, rule: rule-0}")
    assert problems(MESH + ROUTE_80_20 + rule) == [
        "mesh.yaml:52: spec.rule: service 'echo' speaks TCP: its RateLimit is a bucket of connections at its own "
        "sidecars; leave `rule` out"]
