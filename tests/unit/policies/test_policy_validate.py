"""Validation of the security kinds, through the loader: every error is `path:line: message`."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.validate import check_path, check_principal
from reconciler.load import load, read_worktree

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"


def problems(text: str) -> tuple[list[str], list[str]]:
    files = read_worktree(TEMPLATE)
    files["security.yaml"] = text.encode()
    loaded = load(files)
    return [str(p) for p in loaded.problems], [str(w) for w in loaded.warnings]


HEAD = "apiVersion: lockgate.io/v1alpha1\n"


def test_valid_policies_load() -> None:
    errs, warns = problems(HEAD + """\
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  selector: {service: reviews}
  rules:
    - from: [{principals: ["example.org/ns/shop/sa/frontend", "*/sa/ingress-gateway"], namespaces: ["sh*"]}]
      to: [{methods: [GET], paths: ["/reviews*", "*.json", "/", "*"], ports: ["9080"]}]
---
""" + HEAD + """\
kind: PeerAuthentication
metadata: {name: p, namespace: shop}
spec: {selector: {service: reviews}, mtls: {mode: STRICT}}
---
""" + HEAD + """\
kind: RateLimit
metadata: {name: r, namespace: shop}
spec: {service: reviews, rule: default, requestsPerUnit: 5, unit: second}
""")
    assert errs == [] and warns == []


def test_authorization_policy_errors_point_at_the_field() -> None:
    errs, warns = problems(HEAD + """\
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  selector: {service: reveiws}
  action: ALLOW
  rules:
    - from:
        - principals:
            - spiffe://example.org/ns/shop/sa/frontend
            - example.org/ns/shop/frontend
            - example.org/*/sa/frontend
            - other.org/ns/shop/sa/x
          namespaces: ["Shop"]
        - {}
      to:
        - methods: [get, FETCH]
          paths: ["reviews", "/a*b", "/x?y=1", "/with space"]
          ports: [8080]
        - {}
""")
    assert errs == [
        "security.yaml:5: spec.selector.service: unknown service 'reveiws' (services in namespace 'shop': "
        "frontend, reviews)",
        "security.yaml:10: spec.rules[0].from[0].principals[0]: invalid principal "
        "'spiffe://example.org/ns/shop/sa/frontend': write it without 'spiffe://', as "
        "'example.org/ns/shop/sa/frontend'",
        "security.yaml:11: spec.rules[0].from[0].principals[1]: invalid principal "
        "'example.org/ns/shop/frontend': expected <trustDomain>/ns/<namespace>/sa/<serviceAccount>, "
        "e.g. example.org/ns/shop/sa/frontend",
        "security.yaml:12: spec.rules[0].from[0].principals[2]: invalid principal "
        "'example.org/*/sa/frontend': '*' may only stand at the start or the end",
        "security.yaml:14: spec.rules[0].from[0].namespaces[0]: invalid namespace 'Shop': a namespace name, "
        "optionally with '*' at the start or the end",
        "security.yaml:15: spec.rules[0].from[1]: empty source: give principals and/or namespaces (leave `from` "
        "out to match every caller)",
        "security.yaml:17: spec.rules[0].to[0].methods[0]: invalid method 'get'; did you mean 'GET'?",
        "security.yaml:17: spec.rules[0].to[0].methods[1]: invalid method 'FETCH' (one of GET, HEAD, POST, PUT, "
        "DELETE, PATCH, OPTIONS, CONNECT, TRACE)",
        "security.yaml:18: spec.rules[0].to[0].paths[0]: invalid path 'reviews': must start with '/' (or '*' "
        "for a suffix match)",
        "security.yaml:18: spec.rules[0].to[0].paths[1]: invalid path '/a*b': '*' may only stand at the start "
        "(suffix match) or the end (prefix match)",
        "security.yaml:18: spec.rules[0].to[0].paths[2]: invalid path '/x?y=1': paths never include a query or "
        "fragment; match the path only",
        "security.yaml:18: spec.rules[0].to[0].paths[3]: invalid path '/with space': contains characters that "
        "are not allowed in a URL path",
        "security.yaml:20: spec.rules[0].to[1]: empty operation: give methods, paths and/or ports "
        "(leave `to` out to match every request)",
    ]
    assert warns == ["security.yaml:13: warning: spec.rules[0].from[0].principals[3]: principal "
                     "'other.org/ns/shop/sa/x' is not in the mesh's trust domain 'example.org'; it matches no peer"]


def test_port_must_be_the_selected_services() -> None:
    errs, _ = problems(HEAD + """\
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  selector: {service: reviews}
  rules:
    - to: [{ports: [8080]}]
""")
    assert errs == ["security.yaml:7: spec.rules[0].to[0].ports[0]: service 'reviews' has no port 8080 "
                    "(declared: 9080)"]


def test_allow_without_rules_is_a_warning() -> None:
    errs, warns = problems(HEAD + """\
kind: AuthorizationPolicy
metadata: {name: lock, namespace: shop}
spec: {selector: {service: reviews}}
""")
    assert errs == []
    assert warns == ["security.yaml:4: warning: spec.rules: an ALLOW policy without rules matches nothing: every "
                     "request to service 'reviews' is denied"]


def test_peer_authentication_and_rate_limit_errors() -> None:
    errs, _ = problems(HEAD + """\
kind: PeerAuthentication
metadata: {name: a, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
""" + HEAD + """\
kind: PeerAuthentication
metadata: {name: b, namespace: shop}
spec: {mtls: {mode: DISABLE}}
---
""" + HEAD + """\
kind: PeerAuthentication
metadata: {name: c, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
""" + HEAD + """\
kind: RateLimit
metadata: {name: r, namespace: shop}
spec: {service: ratings, requestsPerUnit: 5, unit: second}
---
""" + HEAD + """\
kind: RateLimit
metadata: {name: s, namespace: shop}
spec: {service: reviews, rule: slow, requestsPerUnit: 0, unit: day}
---
""" + HEAD + """\
kind: RateLimit
metadata: {name: t, namespace: shop}
spec: {service: reviews, rule: fast, requestsPerUnit: 5, unit: second}
""")
    assert errs == [
        "security.yaml:9: spec.mtls.mode: Input should be 'STRICT' or 'PERMISSIVE'",
        "security.yaml:14: spec: namespace 'shop' (no selector) already has PeerAuthentication 'a'; keep one",
        "security.yaml:19: spec.service: unknown service 'ratings' (services in namespace 'shop': frontend, "
        "reviews)",
        "security.yaml:24: spec.requestsPerUnit: Input should be greater than or equal to 1",
        "security.yaml:24: spec.unit: Input should be 'second', 'minute' or 'hour'",
        "security.yaml:29: spec.rule: service 'reviews' has no rule 'fast' (rules of Route 'reviews': default)",
    ]


@pytest.mark.parametrize(("principal", "ok"), [
    ("example.org/ns/shop/sa/frontend", True), ("*", True), ("*/sa/frontend", True),
    ("example.org/ns/shop/*", True), ("spiffe://example.org/ns/a/sa/b", False), ("example.org", False),
    ("ex*ample.org/ns/a/sa/b", False), ("EXAMPLE.org/ns/a/sa/b", False), ("**", False),
])
def test_principal_syntax(principal: str, ok: bool) -> None:
    assert (check_principal(principal) is None) == ok


@pytest.mark.parametrize(("path", "ok"), [
    ("/", True), ("/a/b", True), ("/a/*", True), ("*.html", True), ("*", True),
    ("a", False), ("/a*b", False), ("/a?b", False), ("/a#b", False), ("**/x", False),
])
def test_path_syntax(path: str, ok: bool) -> None:
    assert (check_path(path) is None) == ok
