"""ExternalService and outboundTrafficPolicy validation: every mistake is a `path:line` error that says why."""

from __future__ import annotations

from reconciler.load import load
from tests.fixtures.intents import template_files

HEAD = """\
apiVersion: lockgate.io/v1alpha1
kind: ExternalService
metadata: {name: api, namespace: shop}
spec:
"""
"""external.yaml's first four lines: a spec's first field is on line 5."""


def problems(external: str, **files: str) -> list[str]:
    given = {**template_files(), "external.yaml": external.encode(), **{k: v.encode() for k, v in files.items()}}
    return [str(p) for p in load(given).problems]


def warnings(external: str) -> list[str]:
    return [str(p) for p in load({**template_files(), "external.yaml": external.encode()}).warnings]


GOOD = HEAD + """\
  hosts: [api.external.test]
  ports: [{name: https, number: 443, protocol: HTTPS}]
  tls: {mode: originate}
  timeout: 2s
  retries: {attempts: 2, retryOn: "5xx,connect-failure"}
"""


def test_a_valid_external_service_loads_and_is_in_the_intent() -> None:
    loaded = load({**template_files(), "external.yaml": GOOD.encode()})
    assert loaded.problems == [] and loaded.warnings == []
    assert loaded.intent is not None
    from mesh.intent import ExternalService

    [es] = loaded.intent.of_kind(ExternalService)
    assert es.spec.hosts == ["api.external.test"] and es.spec.tls is not None and es.spec.tls.mode == "originate"


def test_hosts_are_plain_dns_names_listed_once() -> None:
    assert problems(HEAD + """\
  hosts: ["*.external.test", "api.external.test:443", "API.external.test", b.test, b.test]
  ports: [{name: http, number: 80}]
""") == [
        "external.yaml:5: spec.hosts[0]: wildcard host '*.external.test' is not supported: list each name",
        "external.yaml:5: spec.hosts[1]: host 'api.external.test:443' has a port: give the name alone (ports go in "
        "`ports`)",
        "external.yaml:5: spec.hosts[2]: invalid host 'API.external.test': use a lower-case DNS name or an IP address",
        "external.yaml:5: spec.hosts[4]: host 'b.test' listed twice",
    ]


def test_ports_are_unique_with_known_protocols() -> None:
    assert problems(HEAD + """\
  hosts: [api.external.test]
  ports:
    - {name: web, number: 80, protocol: HTPS}
    - {name: web, number: 80}
    - {name: bad, number: 70000}
""") == [
        "external.yaml:7: spec.ports[0].protocol: unknown protocol 'HTPS' (did you mean HTTPS?)",
        "external.yaml:8: spec.ports[1].name: duplicate port name 'web'",
        "external.yaml:8: spec.ports[1].number: duplicate port 80",
        "external.yaml:9: spec.ports[2].number: Input should be less than or equal to 65535",
    ]


def test_the_tls_mode_must_fit_the_ports_protocols() -> None:
    assert problems(HEAD + """\
  hosts: [db.external.test]
  ports:
    - {name: pg, number: 5432, protocol: TCP}
  tls: {mode: originate}
""") == ["external.yaml:7: spec.ports[0].protocol: port 'pg' speaks TCP, but tls.mode is originate: the sidecar must "
         "read HTTP requests to originate TLS for them (ports HTTP or HTTPS); split it into another ExternalService"]
    assert problems(HEAD + """\
  hosts: [pay.external.test]
  ports:
    - {name: http, number: 80}
    - {name: https, number: 443, protocol: HTTPS}
  tls:
    mode: passthrough
    sni: other.test
""") == [
        "external.yaml:7: spec.ports[0].protocol: port 'http' speaks HTTP, but tls.mode is passthrough: passthrough "
        "carries the app's own TLS (ports HTTPS or TLS); split it into another ExternalService",
        "external.yaml:11: spec.tls.sni: sni applies only to tls.mode originate (with passthrough the app does its "
        "own TLS)",
    ]


def test_a_bad_pem_is_refused_at_its_line() -> None:
    found = problems(HEAD + """\
  hosts: [api.external.test]
  ports: [{name: https, number: 443, protocol: HTTPS}]
  tls:
    mode: originate
    caCertificates: |
      -----BEGIN CERTIFICATE-----
      bm90IGEgY2VydGlmaWNhdGU=
      -----END CERTIFICATE-----
    subjectAltNames: ["not a name"]
""")
    assert len(found) == 2, found
    assert found[0].startswith("external.yaml:9: spec.tls.caCertificates: caCertificates is not valid PEM: ")
    assert found[1] == ("external.yaml:13: spec.tls.subjectAltNames[0]: invalid subject alt name 'not a name': use a "
                        "DNS name (`*.` allowed first)")
    assert problems(HEAD + """\
  hosts: [api.external.test]
  ports: [{name: https, number: 443, protocol: HTTPS}]
  tls: {mode: originate, caCertificates: "just text"}
""") == ["external.yaml:7: spec.tls.caCertificates: caCertificates holds no PEM certificate "
         "(-----BEGIN CERTIFICATE-----)"]


def test_hosts_have_one_owner_and_never_shadow_a_mesh_service() -> None:
    other = """\
---
apiVersion: lockgate.io/v1alpha1
kind: ExternalService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [api.external.test, reviews.shop, frontend]
  ports: [{name: http, number: 80}]
"""
    assert problems(GOOD + other) == [
        "external.yaml:13: metadata.name: Service shop/reviews has this name too: a workload's egress would be "
        "ambiguous; rename one",
        "external.yaml:15: spec.hosts[0]: host 'api.external.test' is already declared by ExternalService shop/api",
        "external.yaml:15: spec.hosts[1]: host 'reviews.shop' is the name of mesh Service shop/reviews: sidecars "
        "route it there",
        "external.yaml:15: spec.hosts[2]: host 'frontend' is the name of mesh Service shop/frontend: sidecars route "
        "it there",
    ]


def test_egress_may_name_an_external_service() -> None:
    workloads = template_files()["workloads.yaml"].decode()
    anchor = '  command: [lockgate, demo-app, --call, "http://reviews.shop:9080/reviews"]\n'
    assert anchor in workloads
    named = workloads.replace(anchor, anchor + "  egress: [reviews, api, api.shop, nothere]\n")
    found = problems(GOOD, **{"workloads.yaml": named})
    assert sorted(p.split(": ", 2)[1:] for p in found) == [
        ["spec.egress[2]", "service 'api.shop' listed twice"],  # `api` and `api.shop` are one ExternalService
        ["spec.egress[3]", "unknown service 'nothere' (services in namespace 'shop': frontend, reviews)"]]


def test_timeout_and_retries_on_tunnels_only_are_warned_about() -> None:
    assert warnings(HEAD + """\
  hosts: [pay.external.test]
  ports: [{name: https, number: 443, protocol: HTTPS}]
  timeout: 1s
""") == ["external.yaml:7: warning: spec.timeout: timeout applies to HTTP requests, and every port here is tunnelled "
         "(CONNECT): it changes nothing"]


def test_retries_are_checked_as_a_route_s_are() -> None:
    assert problems(HEAD + """\
  hosts: [api.external.test]
  ports: [{name: http, number: 80}]
  retries: {attempts: 2, retryOn: "5xx,conect-failure"}
""") == ["external.yaml:7: spec.retries.retryOn: unknown retry condition 'conect-failure' (did you mean "
         "'connect-failure'?)"]


def test_outbound_traffic_policy_takes_two_modes() -> None:
    mesh = template_files()["mesh.yaml"].decode() + "  outboundTrafficPolicy: {mode: ALLOW_ALL}\n"
    found = problems(GOOD, **{"mesh.yaml": mesh})
    assert len(found) == 1 and found[0].startswith("mesh.yaml:10: spec.outboundTrafficPolicy.mode: "), found
    assert "REGISTRY_ONLY" in found[0] and "ALLOW_ANY" in found[0]


def test_envoy_refusing_an_external_cluster_points_at_its_external_service() -> None:
    """`lockgate validate`'s Envoy check names the ExternalService that rendered `outbound_ext|443|host`, not
    `.:0`."""
    from reconciler.envoycheck import Rejection, locate

    loaded = load({**template_files(), "external.yaml": GOOD.encode()})
    rejections = [Rejection(proxy=p, kind="cluster", name="outbound_ext|443|api.external.test", message="bad")
                  for p in ("east/shop/frontend-v1-0", "east/shop/reviews-v1-0")]
    [problem] = locate(rejections, loaded)
    assert (problem.path, problem.line) == ("external.yaml", 4)  # its spec
    assert "outbound_ext|443|api.external.test" in problem.message
