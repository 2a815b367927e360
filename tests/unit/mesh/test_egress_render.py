"""Traffic leaving the mesh, as rendered: ExternalServices (TLS originated, passed through, plain TCP) and the
Mesh's outboundTrafficPolicy (REGISTRY_ONLY refuses clearly, ALLOW_ANY forwards through Envoy's dynamic
forward proxy), scoped by each workload's egress, and accepted by Envoy itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml

from mesh.intent import SYSTEM_CA_BUNDLE, Intent
from mesh.render import RenderCache, render
from mesh.render.context import NOT_FOUND_BODY
from mesh.render.egress import ALLOW_ANY_CLUSTER, DFP_FILTER, REFUSED_BODY, REFUSED_HEADER, external_cluster_name
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET, Snapshot
from reconciler.load import load
from tests.fixtures.intents import template_files
from tests.fixtures.routes import no_scope_reply, outbound_configs, outbound_vhosts, scopes
from tests.fixtures.topology import topology

FRONTEND, REVIEWS = "east/shop/frontend-v1-0", "east/shop/reviews-v1-0"
API, DB, PAY = "api.external.test", "db.external.test", "pay.external.test"


def _ca_pem() -> str:
    """A real self-signed CA certificate (what a user pastes into caCertificates)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


CA = _ca_pem()


def external(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "lockgate.io/v1alpha1", "kind": "ExternalService",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


EXTERNALS = [
    external("api", hosts=[API], ports=[{"name": "https", "number": 443, "protocol": "HTTPS"}],
             endpoints=[{"address": "127.0.0.1", "port": 18443}], tls={"mode": "originate"}, timeout="2s",
             retries={"attempts": 4, "retryOn": "5xx"},
             connectionPool={"tcp": {"maxConnections": 7, "connectTimeout": "250ms"}},
             outlierDetection={"consecutive5xxErrors": 3}),
    external("pay", hosts=[PAY], ports=[{"name": "https", "number": 443, "protocol": "HTTPS"}],
             tls={"mode": "passthrough"}),
    external("db", hosts=[DB], ports=[{"name": "pg", "number": 5432, "protocol": "TCP"}],
             endpoints=[{"address": "db.internal.example"}]),
    external("pinned", hosts=["pinned.external.test"], ports=[{"name": "http", "number": 8080}],
             tls={"mode": "originate", "sni": "edge.example.net", "caCertificates": CA,
                  "subjectAltNames": ["*.example.net"]}),
]


def intent(*, mode: str | None = None, externals: list[dict[str, Any]] = EXTERNALS,
           frontend_egress: list[str] | None = None) -> Intent:
    files = template_files()
    if mode is not None:
        mesh = yaml.safe_load(files["mesh.yaml"])
        mesh["spec"]["outboundTrafficPolicy"] = {"mode": mode}
        files["mesh.yaml"] = yaml.safe_dump(mesh).encode()
    if frontend_egress is not None:
        docs = list(yaml.safe_load_all(files["workloads.yaml"]))
        docs[0]["spec"]["egress"] = frontend_egress
        files["workloads.yaml"] = yaml.safe_dump_all(docs).encode()
    files["external.yaml"] = yaml.safe_dump_all(externals).encode()
    loaded = load(files)
    assert loaded.intent is not None and not loaded.problems, loaded.problems
    return loaded.intent


def snapshots(it: Intent, cache: RenderCache | None = None) -> dict[str, Snapshot]:
    snaps = render(intent=it, topology=topology(), cache=cache)
    for snap in snaps.values():
        snap.consistent()
    return snaps


def vhosts(snap: Snapshot, name: str = "outbound") -> dict[str, dict[str, Any]]:
    """Virtual hosts by name: of one route configuration, or (`outbound`) of every outbound one, however cut."""
    found = outbound_vhosts(snap) if name == "outbound" else snap.items(ROUTE)[name]["virtual_hosts"]
    return {v["name"]: v for v in found}


def hcm(snap: Snapshot, listener: str = "outbound") -> dict[str, Any]:
    config: dict[str, Any] = snap.items(LISTENER)[listener]["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def test_registry_only_is_the_default_and_refuses_undeclared_hosts_and_connect_with_502() -> None:
    it = intent(externals=[])
    assert it.mesh.spec.outbound_traffic_policy.mode == "REGISTRY_ONLY"
    snap = snapshots(it)[FRONTEND]
    # Only declared hosts have a scope (each its own route configuration); no catch-all virtual host ("*").
    assert scopes(snap) == {"frontend": "outbound|frontend.shop", "frontend.shop": "outbound|frontend.shop",
                            "reviews": "outbound|reviews.shop", "reviews.shop": "outbound|reviews.shop"}
    assert [v["name"] for v in outbound_vhosts(snap)] == ["frontend.shop", "reviews.shop"]
    assert not any("*" in v["domains"] for v in outbound_vhosts(snap))
    # Any other host (CONNECT too: no scope, whatever the method) meets Envoy's "no route", answered as the refusal.
    assert no_scope_reply(snap) == {"status": 502, "body": REFUSED_BODY,
                                    "headers": {REFUSED_HEADER: "outboundTrafficPolicy=REGISTRY_ONLY"}}
    assert "REGISTRY_ONLY" in REFUSED_BODY
    assert "scoped_routes" in hcm(snap) and "rds" not in hcm(snap)
    # CONNECT reaches the routes (else Envoy answers 403 itself); no dynamic forward proxy anywhere.
    assert hcm(snap)["upgrade_configs"] == [{"upgrade_type": "CONNECT"}]
    assert hcm(snap)["http_protocol_options"] == {"allow_absolute_url": True, "accept_http_10": True}
    assert DFP_FILTER not in json.dumps(snap.to_json()) and ALLOW_ANY_CLUSTER not in snap.items(CLUSTER)
    # The ingress is not a way out: an unknown host there stays the mesh's 404.
    ingress = snapshots(it)["east/ingress"]
    assert no_scope_reply(ingress, "ingress") == {"status": 404, "body": NOT_FOUND_BODY, "headers": {}}
    assert "upgrade_configs" not in hcm(ingress, "ingress")


def test_tls_origination_routes_plain_http_by_host_to_a_verifying_tls_cluster() -> None:
    snap = snapshots(intent())[FRONTEND]
    name = external_cluster_name(443, API)
    vhost = vhosts(snap)[name]
    assert vhost["domains"] == [API, f"{API}:443"]  # http://api.external.test/ and http://api.external.test:443/
    route, *tail = vhost["routes"]
    # A CONNECT to this HTTP port meets no rule: a 404 of its own (Envoy's "no route" is the REGISTRY_ONLY refusal).
    assert [(r["name"], r["match"], r["direct_response"]["status"]) for r in tail] == [
        ("no-rule-matched-connect", {"connect_matcher": {}}, 404)]
    assert route["route"]["cluster"] == name and route["route"]["timeout"] == "2s"
    assert route["route"]["retry_policy"]["num_retries"] == 4 and route["route"]["retry_policy"]["retry_on"] == "5xx"
    cluster = snap.items(CLUSTER)[name]
    assert cluster["type"] == "STATIC"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 18443}}
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == API
    assert tls["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": API}}]}
    # Circuit breaking and outlier detection, as a TrafficPolicy gives mesh services.
    assert cluster["connect_timeout"] == "0.250s"
    assert cluster["circuit_breakers"]["thresholds"][0]["max_connections"] == 7
    assert cluster["outlier_detection"]["consecutive_5xx"] == 3


def test_origination_takes_sni_roots_and_names_from_the_intent() -> None:
    snap = snapshots(intent())[FRONTEND]
    tls = snap.items(CLUSTER)[external_cluster_name(8080, "pinned.external.test")]["transport_socket"]["typed_config"]
    assert tls["sni"] == "edge.example.net"
    assert tls["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"inline_string": CA},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "*.example.net"}}]}
    # An ExternalService without timeout or retries: no timeout, the mesh's default retries on its vhost.
    vhost = vhosts(snap)[external_cluster_name(8080, "pinned.external.test")]
    assert vhost["routes"][0]["route"]["timeout"] == "0s" and "retry_policy" not in vhost["routes"][0]["route"]
    assert vhost["retry_policy"]["num_retries"] == 2


def test_passthrough_and_tcp_ports_are_connect_tunnels_without_tls_from_the_sidecar() -> None:
    snap = snapshots(intent())[FRONTEND]
    for host, port in ((PAY, 443), (DB, 5432)):
        name = external_cluster_name(port, host)
        vhost = vhosts(snap)[name]
        assert vhost["domains"] == [f"{host}:{port}"]  # CONNECT's authority
        route, *tail = vhost["routes"]
        # Plain HTTP to a tunnelled port meets no rule: a 404 of its own, not the REGISTRY_ONLY refusal.
        assert [(r["name"], r["match"], r["direct_response"]["status"]) for r in tail] == [
            ("no-rule-matched", {"prefix": "/"}, 404)]
        assert route["match"] == {"connect_matcher": {}}
        assert route["route"]["upgrade_configs"] == [{"upgrade_type": "CONNECT", "connect_config": {}}]
        assert "transport_socket" not in snap.items(CLUSTER)[name]
    # No endpoints: the host itself, resolved by DNS; endpoints by name: those names, by DNS too.
    pay = snap.items(CLUSTER)[external_cluster_name(443, PAY)]
    assert pay["type"] == "STRICT_DNS"
    assert pay["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": PAY, "port_value": 443}
    db = snap.items(CLUSTER)[external_cluster_name(5432, DB)]
    assert db["type"] == "STRICT_DNS"
    assert db["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "db.internal.example", "port_value": 5432}


def test_a_workload_whose_egress_does_not_name_an_external_service_cannot_reach_it() -> None:
    snaps = snapshots(intent(frontend_egress=["reviews", "api"]))
    front, reviews = snaps[FRONTEND], snaps[REVIEWS]
    ext = {n for n in front.items(CLUSTER) if n.startswith("outbound_ext|")}
    assert ext == {external_cluster_name(443, API)}
    assert [v["name"] for v in outbound_vhosts(front)] == [external_cluster_name(443, API), "reviews.shop"]
    # Outside its egress: no scope (frontend itself, the other ExternalServices), so the REGISTRY_ONLY refusal.
    assert scopes(front) == {API: f"outbound|{API}", "reviews": "outbound|reviews.shop",
                             "reviews.shop": "outbound|reviews.shop"}
    assert no_scope_reply(front)["status"] == 502 and no_scope_reply(front)["body"] == REFUSED_BODY
    # reviews has no egress list: every ExternalService, on a route configuration of its own.
    assert {n for n in reviews.items(CLUSTER) if n.startswith("outbound_ext|")} == {
        external_cluster_name(443, API), external_cluster_name(443, PAY), external_cluster_name(5432, DB),
        external_cluster_name(8080, "pinned.external.test")}
    # The same mesh services but fewer external ones: not the same (shared) route configuration.
    same_mesh = snapshots(intent(frontend_egress=["reviews", "frontend", "api"]))
    mine = {v["name"] for v in outbound_vhosts(same_mesh[FRONTEND])}
    theirs = {v["name"] for v in outbound_vhosts(same_mesh[REVIEWS])}
    assert theirs - mine == {external_cluster_name(443, PAY), external_cluster_name(5432, DB),
                             external_cluster_name(8080, "pinned.external.test")}
    assert set(scopes(same_mesh[REVIEWS])) - set(scopes(same_mesh[FRONTEND])) == {PAY, DB, "pinned.external.test"}
    # What both reach is one object each (a change to one destination is built and hashed once) ...
    for name, config in outbound_configs(same_mesh[FRONTEND]).items():
        assert outbound_configs(same_mesh[REVIEWS])[name] is config, name
    # ... but the scope sets are not one shared set.
    assert same_mesh[FRONTEND].parts[SCOPED_ROUTE] != same_mesh[REVIEWS].parts[SCOPED_ROUTE]


def test_allow_any_forwards_undeclared_hosts_through_the_dynamic_forward_proxy() -> None:
    snap = snapshots(intent(mode="ALLOW_ANY"))[FRONTEND]
    filters = [f["name"] for f in hcm(snap)["http_filters"]]
    assert filters[-2:] == [DFP_FILTER, "envoy.filters.http.router"]
    cluster = snap.items(CLUSTER)[ALLOW_ANY_CLUSTER]
    assert cluster["lb_policy"] == "CLUSTER_PROVIDED"
    # The filter and the cluster share one DNS cache configuration (Envoy refuses two that differ).
    assert cluster["cluster_type"]["typed_config"]["dns_cache_config"] == \
        hcm(snap)["http_filters"][-2]["typed_config"]["dns_cache_config"]
    last = snap.items(ROUTE)["outbound"]["virtual_hosts"][-1]
    assert last["domains"] == ["*"]
    assert {json.dumps(r["match"]): r["route"]["cluster"] for r in last["routes"]} == {
        json.dumps({"connect_matcher": {}}): ALLOW_ANY_CLUSTER, json.dumps({"prefix": "/"}): ALLOW_ANY_CLUSTER}
    # Declared hosts still get their own virtual hosts (origination, timeouts) ahead of the catch-all.
    assert external_cluster_name(443, API) in vhosts(snap)


def test_under_allow_any_egress_still_refuses_what_it_leaves_out() -> None:
    snap = snapshots(intent(mode="ALLOW_ANY", frontend_egress=["reviews"]))[FRONTEND]
    denied = vhosts(snap)["egress-denied"]
    # Left out: the frontend service itself (same namespace: both names) and every ExternalService's hosts.
    assert set(denied["domains"]) == {d for n in ("frontend", "frontend.shop", API, PAY, DB, "pinned.external.test")
                                      for d in (n, f"{n}:*")}
    assert {r["direct_response"]["status"] for r in denied["routes"]} == {502}
    assert not any(n.startswith("outbound_ext|") for n in snap.items(CLUSTER))
    # Without an egress list nothing is refused before the catch-all.
    assert "egress-denied" not in vhosts(snapshots(intent(mode="ALLOW_ANY"))[FRONTEND])


def test_the_mesh_security_never_touches_external_clusters() -> None:
    from reconciler.pipeline import ephemeral_certificates, render_planned

    it = intent()
    rendered = render_planned(it, states={}, certs=ephemeral_certificates(["east"]))
    snap = next(s for node, s in rendered["east"].snapshots.items() if "frontend" in node)
    clusters = snap.items(CLUSTER)
    mesh_tls = clusters["outbound|reviews.shop|v1"]["transport_socket"]["typed_config"]
    assert "tls_certificate_sds_secret_configs" in json.dumps(mesh_tls)  # the mesh's mTLS is on ...
    for port, host in ((443, API), (8080, "pinned.external.test")):
        ext = json.dumps(clusters[external_cluster_name(port, host)]["transport_socket"])
        assert "sds" not in ext and "spiffe" not in ext  # ... and never on a server outside the mesh
    assert "transport_socket" not in clusters[external_cluster_name(443, PAY)]


def test_the_render_cache_reuses_egress_parts_and_notices_changes() -> None:
    cache = RenderCache()
    it = intent()
    a = snapshots(it, cache)[FRONTEND]
    b = snapshots(it, cache)[FRONTEND]
    assert outbound_configs(a) and set(outbound_configs(a)) == set(outbound_configs(b))
    assert all(outbound_configs(a)[n] is outbound_configs(b)[n] for n in outbound_configs(a))
    assert scopes(a) and all(a.items(SCOPED_ROUTE)[n] is b.items(SCOPED_ROUTE)[n] for n in a.items(SCOPED_ROUTE))
    assert a.items(CLUSTER)[external_cluster_name(443, API)] is b.items(CLUSTER)[external_cluster_name(443, API)]
    changed = [e if e["metadata"]["name"] != "api" else {**e, "spec": {**e["spec"], "timeout": "3s"}}
               for e in EXTERNALS]
    c = snapshots(intent(externals=changed), cache)[FRONTEND]
    route = vhosts(c)[external_cluster_name(443, API)]["routes"][0]["route"]
    assert route["timeout"] == "3s"
    assert a.versions[ROUTE] != c.versions[ROUTE] and a.versions[CLUSTER] == c.versions[CLUSTER]
    # Only the changed host's route configuration is new; the scopes (which names go where) stay.
    assert {n for n in outbound_configs(a) if outbound_configs(a)[n] is not outbound_configs(c)[n]} == {
        f"outbound|{API}"}
    assert a.versions[SCOPED_ROUTE] == c.versions[SCOPED_ROUTE]
    d = snapshots(intent(externals=changed, mode="ALLOW_ANY"), cache)[FRONTEND]
    assert d.items(ROUTE)["outbound"]["virtual_hosts"][-1]["name"] == "allow-any"


def _parts(snap: Snapshot) -> dict[str, list[Any]]:
    return {key: [dict(r) for r in snap.items(t).values()] for key, t in (
        ("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER), ("endpoints", ENDPOINT),
        ("secrets", SECRET), ("scoped_routes", SCOPED_ROUTE))}


def test_envoy_accepts_every_rendered_configuration(tmp_path: Path) -> None:
    from mesh.envoy import static_bootstrap, validate_config
    from reconciler.envoycheck import check_with_envoy

    for mode in ("REGISTRY_ONLY", "ALLOW_ANY"):
        for egress in (None, ["reviews", "api"]):
            it = intent(mode=mode, frontend_egress=egress)
            assert asyncio.run(check_with_envoy(it)) == [], (mode, egress)
    # The check can fail: a dynamic forward proxy filter whose DNS cache differs from its cluster's is refused.
    snap = snapshots(intent(mode="ALLOW_ANY"))[FRONTEND]
    parts = _parts(snap)
    listener = json.loads(json.dumps(parts["listeners"]))
    for x in listener:
        for f in x["filter_chains"][0]["filters"][0]["typed_config"].get("http_filters", []):
            if f["name"] == DFP_FILTER:
                f["typed_config"]["dns_cache_config"]["dns_lookup_family"] = "V6_ONLY"
    broken = asyncio.run(validate_config(static_bootstrap(**{**parts, "listeners": listener}), workdir=tmp_path))
    assert broken is not None and "dns" in broken.lower(), broken
