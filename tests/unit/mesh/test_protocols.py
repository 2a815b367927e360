"""Service port protocols (Istio's rules: `protocol`, else `appProtocol`, else the port name) and what
render makes of HTTP/2, gRPC and TCP services."""

from __future__ import annotations

import json

import pytest

from mesh.intent import ServicePort
from reconciler.load import load
from tests.fixtures.intents import template_files


def with_reviews_ports(ports: str, routes: str | None = None) -> dict[str, bytes]:
    """The template with the reviews Service's ports replaced (the ports line is services.yaml line 19)."""
    files = template_files()
    text = files["services.yaml"].decode()
    old = "    - {name: http, port: 9080, protocol: HTTP}\n  versions: [v1, v2]"
    assert old in text
    files["services.yaml"] = text.replace(old, f"{ports}  versions: [v1, v2]").encode()
    if routes is not None:
        files["routes.yaml"] = routes.encode()
    return files


@pytest.mark.parametrize(("port", "expected"), [
    ({"name": "http", "port": 1}, "HTTP"),
    ({"name": "web", "port": 1}, "HTTP"),
    ({"name": "grpc", "port": 1}, "GRPC"),
    ({"name": "grpc-api", "port": 1}, "GRPC"),
    ({"name": "grpc-web", "port": 1}, "HTTP"),
    ({"name": "h2", "port": 1}, "HTTP2"),
    ({"name": "http2-x", "port": 1}, "HTTP2"),
    ({"name": "tcp-db", "port": 1}, "TCP"),
    ({"name": "mysql", "port": 1}, "TCP"),
    ({"name": "tls", "port": 1}, "TLS"),
    ({"name": "web", "port": 1, "appProtocol": "h2c"}, "HTTP2"),
    ({"name": "grpc", "port": 1, "appProtocol": "http"}, "HTTP"),
    ({"name": "http", "port": 1, "protocol": "TCP", "appProtocol": "tcp"}, "TCP"),
    ({"name": "x", "port": 1, "protocol": "grpc"}, "GRPC"),
])
def test_the_protocol_comes_from_protocol_then_app_protocol_then_the_name(port: dict[str, object],
                                                                           expected: str) -> None:
    assert ServicePort.model_validate(port).effective_protocol == expected


def test_unknown_protocols_are_errors_with_a_line_and_a_suggestion() -> None:
    loaded = load(with_reviews_ports("    - {name: a, port: 9080, protocol: GPRC}\n"
                                     "    - {name: b, port: 9081, protocol: GRPC, appProtocol: grcp}\n"))
    assert [str(p) for p in loaded.problems] == [
        "services.yaml:19: spec.ports[0].protocol: unknown protocol 'GPRC' (did you mean GRPC?)",
        "services.yaml:20: spec.ports[1].appProtocol: unknown appProtocol 'grcp' (did you mean grpc?)",
    ]


def test_a_service_has_one_protocol_and_app_protocol_may_not_contradict_protocol() -> None:
    loaded = load(with_reviews_ports("    - {name: grpc, port: 9080}\n"
                                     "    - {name: tcp, port: 9081}\n"
                                     "    - {name: c, port: 9082, protocol: GRPC, appProtocol: tcp}\n"))
    problems = [str(p) for p in loaded.problems]
    assert "services.yaml:20: spec.ports[1]: port 'tcp' speaks TCP but port 'grpc' speaks GRPC: a service has " \
           "one protocol (its sidecar forwards to one app port); split it into two services" in problems
    assert "services.yaml:21: spec.ports[2].appProtocol: appProtocol 'tcp' contradicts protocol 'GRPC'; give " \
           "one of them" in problems


def test_the_default_stays_http_and_the_template_is_unchanged() -> None:
    loaded = load(template_files())
    assert loaded.intent is not None, loaded.problems
    assert {s.spec.protocol for s in loaded.intent.services.values()} == {"HTTP"}


TCP_ROUTE = """\
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  http:
    - match: [{uri: {prefix: /x}}]
      retries: {attempts: 2}
      route: [{version: v2}]
    - route: [{version: v1, weight: 80}, {version: v2, weight: 20}]
"""


def test_a_tcp_route_splits_by_weight_only() -> None:
    loaded = load(with_reviews_ports("    - {name: tcp-echo, port: 9080}\n", TCP_ROUTE))
    assert [str(p) for p in loaded.problems] == [
        "routes.yaml:7: spec.http[0].match: match needs HTTP; service 'reviews' speaks TCP (its connections are "
        "split by weight only)",
        "routes.yaml:8: spec.http[0].retries: retries needs HTTP; service 'reviews' speaks TCP (its connections "
        "are split by weight only)",
        "routes.yaml:10: spec.http[1]: service 'reviews' speaks TCP: connections are split by weight with one "
        "rule (no matches); remove the other rules",
    ]


@pytest.mark.parametrize(("status", "code"), [("UNAVAILABLE", 14), ("unavailable", 14), (13, 13)])
def test_grpc_status_by_name_or_code(status: object, code: int) -> None:
    from mesh.intent import FaultAbort

    assert FaultAbort.model_validate({"percentage": 50, "grpcStatus": status}).grpc_status == code


def test_an_abort_has_one_status_and_unknown_grpc_names_get_a_suggestion() -> None:
    from pydantic import ValidationError

    from mesh.intent import FaultAbort

    with pytest.raises(ValidationError, match="did you mean UNAVAILABLE"):
        FaultAbort.model_validate({"percentage": 50, "grpcStatus": "UNAVAILIBLE"})
    with pytest.raises(ValidationError, match="exactly one of httpStatus, grpcStatus"):
        FaultAbort.model_validate({"percentage": 50, "grpcStatus": 14, "httpStatus": 503})
    with pytest.raises(ValidationError, match="exactly one of httpStatus, grpcStatus"):
        FaultAbort.model_validate({"percentage": 50})


def _render_golden_protocols() -> dict[str, object]:
    from pathlib import Path

    from mesh.render import render
    from reconciler.load import read_worktree
    from tests.fixtures.topology import golden_topology

    loaded = load(read_worktree(Path(__file__).parent / "golden" / "protocols"))
    assert loaded.intent is not None, loaded.problems
    return dict(render(intent=loaded.intent, topology=golden_topology()))


def test_grpc_services_speak_http2_upstream_and_count_grpc_failures_inbound() -> None:
    from mesh.xds.snapshot import CLUSTER, LISTENER
    from tests.fixtures.routes import outbound_vhost

    snaps: dict[str, object] = _render_golden_protocols()
    front, grpc_sidecar = snaps["east/shop/frontend-v1-0"], snaps["east/shop/reviews-v2-0"]

    def h2(cluster: dict[str, object]) -> bool:
        return "http2_protocol_options" in json.dumps(cluster)

    clusters = front.items(CLUSTER)  # type: ignore[attr-defined]
    assert h2(clusters["outbound|reviews.shop|v1"]) and not h2(clusters["outbound|frontend.shop|v1"])
    assert h2(grpc_sidecar.items(CLUSTER)["inbound|app"])  # type: ignore[attr-defined]
    assert not h2(clusters["inbound|app"])
    inbound = json.dumps(dict(grpc_sidecar.items(LISTENER)["inbound"]))  # type: ignore[attr-defined]
    assert "envoy.filters.http.grpc_stats" in inbound
    assert "grpc_stats" not in json.dumps(front.to_json())  # type: ignore[attr-defined]
    vhost = outbound_vhost(front, "reviews.shop")  # type: ignore[arg-type]
    routes = {r["name"]: r for r in vhost["routes"]}
    assert routes["default"]["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "2s"}
    assert routes["method"]["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    assert routes["method"]["match"]["path"] == "/shop.Reviews/Get"
    assert routes["default"]["route"]["retry_policy"]["retry_on"] == \
        "unavailable,cancelled,deadline-exceeded,resource-exhausted,internal"
    abort = routes["chaos"]["typed_per_filter_config"]["envoy.filters.http.fault"]["abort"]
    assert abort == {"grpc_status": 14, "percentage": {"numerator": 50, "denominator": "HUNDRED"}}
    http_vhost = outbound_vhost(front, "frontend.shop")  # type: ignore[arg-type]
    assert "max_stream_duration" not in json.dumps(http_vhost)
