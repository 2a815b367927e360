"""`lockgate validate` asks the real Envoy (`--mode validate`) and points at the intent line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh.render import Extension, Proxy
from mesh.xds.snapshot import LISTENER
from reconciler.envoycheck import check_with_envoy, locate
from reconciler.load import load, read_worktree

pytestmark = pytest.mark.integration
TEMPLATE = Path(__file__).resolve().parents[2] / "repo-template"



class BreakOneCluster(Extension):
    """Stands for any rendering Envoy refuses that our own checks let through."""

    def cluster(self, proxy: Proxy, cluster: dict[str, Any]) -> dict[str, Any]:
        if cluster["name"] == "outbound|reviews.shop|v2":
            return {**cluster, "connect_timeout": "-1s"}
        return cluster


def test_template_passes_envoy_itself() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    assert asyncio.run(check_with_envoy(loaded.intent)) == []


def test_envoy_checks_what_up_would_push_security_included() -> None:
    """The listeners checked are the pushed ones: mTLS, authorization and rate limits in place (found as a
    new user: validate used to check listeners without any of them)."""
    from reconciler.pipeline import ephemeral_certificates, render_planned
    from tests.fixtures.intents import peer_authentication_yaml, template_files

    files = {**template_files(), "security.yaml": peer_authentication_yaml(mode="STRICT").encode()}
    loaded = load(files)
    assert loaded.intent is not None
    rendered = render_planned(loaded.intent, states={}, certs=ephemeral_certificates(["east"]))
    inbound = rendered["east"].snapshots["east/shop/reviews-v1-0"].items(LISTENER)["inbound"]
    assert all("transport_socket" in chain for chain in inbound["filter_chains"])  # what Envoy is asked about
    assert asyncio.run(check_with_envoy(loaded.intent)) == []


class BreakTLS(Extension):
    """A listener Envoy refuses only because of its TLS (a certificate nobody issued): proof that validate
    checks the TLS contexts and secrets that are pushed."""

    def listener(self, proxy: Proxy, listener: dict[str, Any]) -> dict[str, Any]:
        def broken(ctx: dict[str, Any]) -> dict[str, Any]:
            common = {**ctx["common_tls_context"], "tls_certificate_sds_secret_configs": [{"name": "no-such-cert"}]}
            return {**ctx, "common_tls_context": common}

        chains = [{**c, "transport_socket": {**c["transport_socket"],
                                             "typed_config": broken(c["transport_socket"]["typed_config"])}}
                  if "transport_socket" in c else c for c in listener.get("filter_chains", [])]
        return {**listener, "filter_chains": chains}


def test_a_broken_tls_context_is_caught() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    rejections = asyncio.run(check_with_envoy(loaded.intent, extra=[BreakTLS()]))
    assert rejections and all(r.kind in ("listener", "config") for r in rejections), rejections


def test_envoy_rejection_is_narrowed_to_the_resource_and_located() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    rejections = asyncio.run(check_with_envoy(loaded.intent, extra=[BreakOneCluster()]))
    assert {(r.kind, r.name) for r in rejections} == {("cluster", "outbound|reviews.shop|v2")}
    assert all("duration" in r.message.lower() for r in rejections), rejections
    [problem] = locate(rejections, loaded)  # one culprit, though every proxy has the cluster
    assert (problem.path, problem.line) == ("services.yaml", 17)  # the reviews Service's spec
    assert problem.message.startswith("Envoy would reject cluster 'outbound|reviews.shop|v2': ")


def test_a_reason_envoy_prints_on_a_line_of_its_own_is_the_message(tmp_path: Path) -> None:
    """A proto constraint Envoy reports after the configuration it dumps over many lines: the message is that
    reason, not the empty rest of the first line."""
    from mesh.envoy import validate_config

    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager", "stat_prefix": "x",
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
           "scoped_routes": {"name": "x", "rds_config_source": {"ads": {}},
                             "scope_key_builder": {"fragments": [{"header_value_extractor": {"name": "host"}}]},
                             "scoped_route_configurations_list": {"scoped_route_configurations": []}}}
    config = {"static_resources": {"listeners": [{
        "name": "x", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}]}}
    message = asyncio.run(validate_config(config, workdir=tmp_path))
    assert message and "at least 1 item" in message, message
