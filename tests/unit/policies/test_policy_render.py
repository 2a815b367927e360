"""Golden tests for the security render (intent YAML in, the security-relevant xDS out), and its rules:
rotation changes only secrets, every SDS name resolves, modes resolve service > namespace > mesh, and
authorization and rate limits reach a sidecar through its route configuration, never its listener.

`UPDATE_GOLDEN=1` rewrites the golden files. They hold what this layer adds (listeners with their
transport sockets and our HTTP filters, secrets, the clusters' transport sockets, per-route filter
configs), not the whole snapshot mesh's goldens pin.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mesh.intent import Intent
from mesh.render import render
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds import wire as xds
from mesh.xds.snapshot import LISTENER, PUSH_ORDER, ROUTE, SECRET, InconsistentSnapshot, Snapshot
from multicluster.ca import new_intermediate, new_root, pem
from multicluster.issuer import WorkloadIssuer
from policies import IssuedCert, SecurityExtension, mtls_mode
from policies.render import AUTHZ_FILTERS, LOCAL_RL_FILTER, principal_matcher
from reconciler.load import load, read_worktree
from tests.fixtures.envoy import envoy_validate, static_bootstrap
from tests.fixtures.routes import inline_scopes
from tests.fixtures.topology import topology

GOLDEN = Path(__file__).parent / "golden"
BUNDLE = ("-----BEGIN CERTIFICATE-----\nROOT-A\n-----END CERTIFICATE-----\n",
          "-----BEGIN CERTIFICATE-----\nROOT-B\n-----END CERTIFICATE-----\n")


def intent_of(case: str) -> Intent:
    loaded = load(read_worktree(GOLDEN / case))
    assert loaded.intent is not None, loaded.problems
    return loaded.intent


def fake_certs(intent: Intent, topo: ClusterTopology, serial: str = "1") -> dict[str, IssuedCert]:
    """Placeholder PEMs: render never parses them, and golden files must not change with every run."""
    from policies import identity_of

    proxies: list[Sidecar | Gateway] = [*([topo.ingress] if topo.ingress else []), *topo.sidecars]
    return {p.node_id: IssuedCert(spiffe_id=identity_of(intent, p),
                                  cert_chain_pem=f"CHAIN {identity_of(intent, p)} #{serial}\n",
                                  private_key_pem=f"KEY {p.node_id} #{serial}\n") for p in proxies}


OURS = ("lockgate.", "envoy.filters.http.local_ratelimit")


def _ours(listener: Any) -> dict[str, Any]:
    """A listener with each connection manager cut down to the HTTP filters this layer adds: the rest is
    mesh's (pinned by its own goldens), so a change there does not churn these files."""
    chains = [{**chain, "filters": [{"name": f["name"], "http_filters": [
        h for h in f["typed_config"].get("http_filters", []) if h["name"].startswith(OURS)]}
        for f in chain["filters"]]} for chain in listener["filter_chains"]]
    return {**listener, "filter_chains": chains}


def security_view(snap: Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = {
        "listeners": [_ours(x) for x in snap.items(LISTENER).values()],
        "secrets": list(snap.items(SECRET).values()),
        "cluster_tls": {name: c["transport_socket"] for name, c in snap.items(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster").items() if "transport_socket" in c},
    }
    per_route = {}
    for rc in snap.items("type.googleapis.com/envoy.config.route.v3.RouteConfiguration").values():
        for vh in rc["virtual_hosts"]:
            for i, r in enumerate(vh["routes"]):
                if "typed_per_filter_config" in r:
                    per_route[f"{rc['name']}/{vh['name']}/{r.get('name', f'#{i}')}"] = r["typed_per_filter_config"]
    out["route_filters"] = per_route
    return out


def render_case(case: str) -> dict[str, Snapshot]:
    intent, topo = intent_of(case), topology()
    ext = SecurityExtension(intent=intent, certs=fake_certs(intent, topo), trust_bundle=BUNDLE)
    return render(intent=intent, topology=topo, revision="r1", extensions=[ext])


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_golden(case: str) -> None:
    snaps = render_case(case)
    for snap in snaps.values():
        snap.consistent()
        snap.consistent()
        for type_url in PUSH_ORDER:
            for res in snap.items(type_url).values():
                xds.check(type_url, res)  # packs as the ADS server will
    got = {node: security_view(snap) for node, snap in sorted(snaps.items())}
    path = GOLDEN / case / "xds.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


def test_rotation_changes_only_secrets() -> None:
    intent, topo = intent_of("strict"), topology()
    a = render(intent=intent, topology=topo, extensions=[
        SecurityExtension(intent=intent, certs=fake_certs(intent, topo, "1"), trust_bundle=BUNDLE)])
    b = render(intent=intent, topology=topo, extensions=[
        SecurityExtension(intent=intent, certs=fake_certs(intent, topo, "2"), trust_bundle=BUNDLE)])
    for node in a:
        changed = {t for t in PUSH_ORDER if a[node].version(t) != b[node].version(t)}
        assert changed == {SECRET}, (node, changed)


def test_upstream_tls_matches_each_destination_identity() -> None:
    intent, topo = intent_of("permissive"), topology()
    snap = render(intent=intent, topology=topo, extensions=[
        SecurityExtension(intent=intent, certs=fake_certs(intent, topo), trust_bundle=BUNDLE)])["east/ingress"]
    tls = security_view(snap)["cluster_tls"]

    def sans(cluster: str) -> list[str]:
        ctx = tls[cluster]["typed_config"]["common_tls_context"]["combined_validation_context"]
        return [m["matcher"]["exact"] for m in ctx["default_validation_context"]["match_typed_subject_alt_names"]]

    assert sans("outbound|reviews.shop|v1") == ["spiffe://example.org/ns/shop/sa/reviews"]
    assert sans("outbound|reviews.shop|v2") == ["spiffe://example.org/ns/shop/sa/reviews-canary"]
    # Every outbound cluster originates mTLS with the proxy's own certificate, over SDS through ADS.
    ctx = tls["outbound|frontend.shop|v1"]["typed_config"]["common_tls_context"]
    assert ctx["tls_certificate_sds_secret_configs"] == [
        {"name": "workload-cert", "sds_config": {"ads": {}, "resource_api_version": "V3"}}]


def test_trust_bundle_holds_every_root() -> None:
    snap = render_case("strict")["east/shop/frontend-v1-0"]
    bundle = snap.items(SECRET)["trust-bundle"]["validation_context"]["trusted_ca"]["inline_string"]
    assert bundle == BUNDLE[0] + BUNDLE[1]


def test_mtls_mode_resolution() -> None:
    strict, permissive = intent_of("strict"), intent_of("permissive")
    assert mtls_mode(strict, "shop", "reviews") == "STRICT"  # namespace-wide
    assert mtls_mode(strict, "other", "reviews") == "PERMISSIVE"  # mesh default
    assert mtls_mode(permissive, "shop", "reviews") == "STRICT"  # per service
    assert mtls_mode(permissive, "shop", "frontend") == "PERMISSIVE"
    mesh = permissive.mesh.model_copy(update={"spec": permissive.mesh.spec.model_copy(update={
        "mtls": permissive.mesh.spec.mtls.model_copy(update={"mode": "STRICT"})})})
    assert mtls_mode(permissive.model_copy(update={"mesh": mesh}), "shop", "frontend") == "STRICT"


def test_missing_secret_is_refused() -> None:
    intent, topo = intent_of("strict"), topology()
    certs = fake_certs(intent, topo)
    del certs["east/shop/reviews-v1-0"]
    snaps = render(intent=intent, topology=topo, extensions=[
        SecurityExtension(intent=intent, certs=certs, trust_bundle=BUNDLE)])
    snaps["east/shop/reviews-v2-0"].consistent()
    with pytest.raises(InconsistentSnapshot, match=r"missing secret\(s\) \['workload-cert'\]"):
        snaps["east/shop/reviews-v1-0"].consistent()


REVIEWS = ("east/shop/reviews-v1-0", "east/shop/reviews-v2-0")
REVIEWS_INBOUND = frozenset((n, "inbound") for n in REVIEWS)
EVERY_RULE_ROUTE = frozenset({("east/ingress", "ingress|shop.example.com"),
                              ("east/shop/frontend-v1-0", "outbound|frontend.shop"),
                              *((n, "outbound|frontend.shop") for n in REVIEWS)})
"""Where a rule of frontend's Route is served: the ingress's route configuration for frontend's host, and each
sidecar's for frontend alone (routes are cut per host and per destination: reviews' stay as they were)."""
DENY_FRONTEND = """---
apiVersion: lockgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-frontend, namespace: shop}
spec:
  selector: {service: reviews}
  action: DENY
  rules:
    - from: [{principals: [example.org/ns/shop/sa/frontend]}]
"""


def _docs_without(text: str, name: str) -> str:
    """The YAML stream without the document whose metadata names `name`."""
    return "---".join(d for d in text.split("---") if f"name: {name}," not in d)


def _edited(case: str, edit: Callable[[str], str]) -> Intent:
    files = read_worktree(GOLDEN / case)
    text = files["security.yaml"].decode()
    files["security.yaml"] = edit(text).encode()
    assert files["security.yaml"].decode() != text, "the edit changed nothing"
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems
    return loaded.intent


def _secured(intent: Intent) -> dict[str, Snapshot]:
    topo = topology()
    return render(intent=intent, topology=topo, extensions=[
        SecurityExtension(intent=intent, certs=fake_certs(intent, topo), trust_bundle=BUNDLE)])


def _changed_routes(a: dict[str, Snapshot], b: dict[str, Snapshot]) -> set[tuple[str, str]]:
    return {(n, name) for n in a for name in {*a[n].items(ROUTE), *b[n].items(ROUTE)}
            if a[n].items(ROUTE).get(name) != b[n].items(ROUTE).get(name)}


@pytest.mark.parametrize(("edit", "changed"), [
    pytest.param(lambda t: t + DENY_FRONTEND, REVIEWS_INBOUND, id="a DENY for a principal added"),
    pytest.param(lambda t: _docs_without(t, "no-admin"), REVIEWS_INBOUND, id="the only DENY removed"),
    pytest.param(lambda t: _docs_without(t, "frontend-reads"), REVIEWS_INBOUND, id="the only ALLOW removed"),
    pytest.param(lambda t: t.replace("methods: [GET, HEAD]", "methods: [GET]"), REVIEWS_INBOUND,
                 id="an ALLOW rule narrowed"),
    pytest.param(lambda t: t.replace("burst: 20", "burst: 10"), REVIEWS_INBOUND, id="a service's rate limit changed"),
    pytest.param(lambda t: _docs_without(t, "reviews"), REVIEWS_INBOUND, id="a service's rate limit removed"),
    pytest.param(lambda t: _docs_without(t, "frontend-default"), EVERY_RULE_ROUTE, id="a rule's rate limit removed"),
    pytest.param(lambda t: t.split("---")[0], REVIEWS_INBOUND | EVERY_RULE_ROUTE, id="every policy and limit removed"),
])
def test_policy_and_rate_limit_changes_reach_routes_not_listeners(
        edit: Callable[[str], str], changed: frozenset[tuple[str, str]]) -> None:
    """A listener change reaches only new connections (old ones drain on the old chain); a route
    configuration reaches the next request on open ones. So these changes must be route changes only."""
    before, after = _secured(intent_of("strict")), _secured(_edited("strict", edit))
    assert {n: s.version(LISTENER) for n, s in before.items()} == {n: s.version(LISTENER) for n, s in after.items()}
    assert _changed_routes(before, after) == changed
    assert {n for n in before if before[n].version(ROUTE) != after[n].version(ROUTE)} == {n for n, _ in changed}


def test_the_mtls_mode_is_still_the_listeners() -> None:
    """The mode is what a connection was accepted with: changing it is a listener change (new connections),
    accepted because it revokes no one principal."""
    before = _secured(intent_of("strict"))
    after = _secured(_edited("strict", lambda t: t.replace("mode: STRICT", "mode: PERMISSIVE")))
    assert {n for n in before if before[n].version(LISTENER) != after[n].version(LISTENER)} == {
        "east/shop/frontend-v1-0", *REVIEWS}
    assert _changed_routes(before, after) == set()


def _http_filters(snap: Snapshot, listener: str) -> list[dict[str, Any]]:
    (chain, *_) = snap.items(LISTENER)[listener]["filter_chains"]
    filters: list[dict[str, Any]] = chain["filters"][0]["typed_config"]["http_filters"]
    return filters


def test_inbound_filters_are_neutral_and_the_rules_come_per_route() -> None:
    snaps = _secured(intent_of("strict"))
    reviews, frontend = snaps["east/shop/reviews-v1-0"], snaps["east/shop/frontend-v1-0"]
    for snap in (reviews, frontend):  # one chain for every sidecar: DENY before ALLOW, then the bucket
        chain = _http_filters(snap, "inbound")
        assert [f["name"] for f in chain] == ["lockgate.authz.deny", "lockgate.authz.allow", LOCAL_RL_FILTER,
                                              "envoy.filters.http.router"]
        assert not any({"rules", "shadow_rules", "token_bucket"} & set(f["typed_config"]) for f in chain)
    (vhost,) = reviews.items(ROUTE)["inbound"]["virtual_hosts"]
    per_route = vhost["routes"][0]["typed_per_filter_config"]
    assert {name: cfg["rbac"]["rules"]["action"] for name, cfg in per_route.items() if name in AUTHZ_FILTERS.values()
            } == {"lockgate.authz.deny": "DENY", "lockgate.authz.allow": "ALLOW"}
    assert list(per_route["lockgate.authz.deny"]["rbac"]["rules"]["policies"]) == ["shop/no-admin[0]"]
    assert per_route[LOCAL_RL_FILTER]["token_bucket"]["max_tokens"] == 20
    # frontend has no policy and no service-wide limit: its inbound routes carry no per-route filters.
    (vhost,) = frontend.items(ROUTE)["inbound"]["virtual_hosts"]
    assert all("typed_per_filter_config" not in r for r in vhost["routes"])


def test_sidecars_of_a_service_share_one_inbound_route_configuration() -> None:
    """Without port conditions the rules are the service's, so its sidecars share one object (built and
    hashed once); policy-less sidecars keep the configuration render shares between all of them."""
    intent = _edited("strict", lambda t: t.replace(", ports: [9080]", ""))
    snaps = _secured(intent)
    v1, v2 = snaps["east/shop/reviews-v1-0"].items(ROUTE)["inbound"], snaps["east/shop/reviews-v2-0"].items(ROUTE)[
        "inbound"]
    assert v1 is v2
    plain = render(intent=intent, topology=topology())["east/shop/frontend-v1-0"].items(ROUTE)["inbound"]
    assert snaps["east/shop/frontend-v1-0"].items(ROUTE)["inbound"] == plain
    # With a port condition each sidecar's rules name its own inbound port.
    ported = _secured(intent_of("strict"))
    assert ported["east/shop/reviews-v1-0"].items(ROUTE)["inbound"] != ported["east/shop/reviews-v2-0"].items(ROUTE)[
        "inbound"]


@pytest.mark.parametrize(("principal", "matcher"), [
    ("example.org/ns/shop/sa/frontend", {"exact": "spiffe://example.org/ns/shop/sa/frontend"}),
    ("example.org/ns/shop/*", {"prefix": "spiffe://example.org/ns/shop/"}),
    ("*/sa/frontend", {"suffix": "/sa/frontend"}),
    ("*", {"prefix": "spiffe://"}),
])
def test_principal_matchers(principal: str, matcher: dict[str, str]) -> None:
    assert principal_matcher(principal) == matcher


def _static_bootstrap(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as static config: RDS and EDS inlined, SDS references turned into static secrets, and a
    scoped outbound listener's scopes inlined (SRDS itself would need a node and a control plane)."""
    def strip_sds(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip_sds(v) for k, v in value.items() if k != "sds_config"}
        if isinstance(value, list):
            return [strip_sds(v) for v in value]
        return value

    return static_bootstrap(inline_scopes(strip_sds(json.loads(json.dumps(snap.to_json())))), secrets=True)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["strict", "permissive"])
def test_envoy_accepts_with_real_certificates(case: str, tmp_path: Path) -> None:
    """Envoy itself (`--mode validate`) takes the listeners, filters, transport sockets and secrets."""
    now = dt.datetime.now(dt.UTC)
    root = new_root(now=now)
    issuer = WorkloadIssuer(ttl=60)
    issuer.add_authority("east", new_intermediate(root, cluster="east", now=now))
    intent, topo = intent_of(case), topology()
    certs = issuer.certs_for(intent, topo, now=now.timestamp())
    assert issuer.trust_bundle == [pem(root.cert)]
    snaps = render(intent=intent, topology=topo, extensions=[
        SecurityExtension(intent=intent, certs=certs, trust_bundle=issuer.trust_bundle)])
    for node in ("east/ingress", "east/shop/reviews-v1-0", "east/shop/frontend-v1-0"):
        out = envoy_validate(_static_bootstrap(snaps[node]), tmp_path / f"{node.replace('/', '_')}.json")
        assert out.returncode == 0, out.stdout + out.stderr


def test_issued_cert_repr_hides_the_key() -> None:
    cert = IssuedCert(spiffe_id="spiffe://x/ns/a/sa/b", cert_chain_pem="C", private_key_pem="SECRET-KEY")
    assert "SECRET-KEY" not in repr(cert)
    assert "SECRET-KEY" not in str(dataclasses.replace(cert, serial="1"))


def test_http2_is_offered_by_alpn_inside_the_mtls_only_for_http2_services() -> None:
    snaps = render_case("protocols")
    front, grpc_sidecar = snaps["east/shop/frontend-v1-0"], snaps["east/shop/reviews-v2-0"]
    tls = {name: c["transport_socket"]["typed_config"]["common_tls_context"]
           for name, c in front.items("type.googleapis.com/envoy.config.cluster.v3.Cluster").items()
           if "transport_socket" in c}
    assert tls["outbound|reviews.shop|v1"]["alpn_protocols"] == ["h2"]
    assert "alpn_protocols" not in tls["outbound|frontend.shop|v1"]

    def inbound_alpn(snap: Snapshot) -> object:
        (chain,) = snap.items(LISTENER)["inbound"]["filter_chains"]
        return chain["transport_socket"]["typed_config"]["common_tls_context"].get("alpn_protocols")

    assert inbound_alpn(grpc_sidecar) == ["h2", "http/1.1"]
    assert inbound_alpn(front) is None
