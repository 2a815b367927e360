"""An authenticated control plane with a real Envoy: the proxy whose bootstrap carries its token converges;
a raw gRPC client without a token, or with that proxy's token claiming another node, is refused before it
reads a secret, and what the real proxy ACKed stays as it was."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from e2e.harness import SECRET_TYPE, ads_attempt, wait_for
from mesh.xds.snapshot import LISTENER, Snapshot
from multicluster import ca
from reconciler.runtime.local.runtime import ProxyTokens
from reconciler.runtime.local.supervisor import Supervised

if TYPE_CHECKING:
    from conftest import ControlPlane, EnvoyProcess

pytestmark = pytest.mark.integration

NODE, OTHER = "east/shop/reviews-v1-0", "east/shop/ratings-v1-0"
ADS = {"ads": {}, "resource_api_version": "V3"}


def secured_snapshot(revision: str) -> Snapshot:
    """One cluster whose TLS certificate comes over SDS: the proxy asks for `workload-cert` itself."""
    now = dt.datetime.now(dt.UTC)
    root = ca.new_root(now=now)
    cert = ca.issue(ca.new_intermediate(root, cluster="east", now=now), spiffe_id="spiffe://example.org/ns/shop/sa/x",
                    now=now)
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "workload-cert", "sds_config": ADS}]}}}
    return Snapshot.of(
        clusters=[{"name": "upstream", "type": "STATIC", "connect_timeout": "1s", "transport_socket": tls,
                   "load_assignment": {"cluster_name": "upstream", "endpoints": []}}],
        secrets=[{"name": "workload-cert", "tls_certificate": {
            "certificate_chain": {"inline_string": cert.cert_chain_pem},
            "private_key": {"inline_string": cert.private_key_pem}}}],
        revision=revision,
    )



def owner(tmp_path: Path, name: str) -> Supervised:
    return Supervised(name=name, argv=["envoy"], env={}, log_path=tmp_path / f"{name}.log")


def test_only_the_proxy_holding_the_token_is_served(
    authed_plane: ControlPlane, tokens: ProxyTokens, envoy: Callable[..., EnvoyProcess], tmp_path: Path,
) -> None:
    cp = authed_plane
    token = tokens.issue(NODE, owner(tmp_path, "reviews"))
    other_token = tokens.issue(OTHER, owner(tmp_path, "ratings"))  # a proxy that is not running
    snap = secured_snapshot("r1")
    cp.set(NODE, snap)
    cp.set(OTHER, secured_snapshot("r1-other"))
    proxy = envoy(node_id=NODE, xds_port=cp.port, token=token)
    assert cp.wait_converged(NODE, snap), cp.status(NODE)
    # Envoy asks for listeners only once its clusters have warmed, so the (empty) LDS ACK can land after
    # the snapshot's own types converged: wait for it, or it would look like something the attempts changed.
    wait_for("the proxy's LDS ACK", lambda: LISTENER in cp.status(NODE).acked, timeout=10)
    before = cp.status(NODE)
    assert before.connected and before.acked[SECRET_TYPE] == snap.version(SECRET_TYPE)
    address = f"127.0.0.1:{cp.port}"

    # (a) no token, (b) a token that is no one's: refused before anything is read or answered.
    assert ads_attempt(address, node_id=NODE, token=None) == ("UNAUTHENTICATED", [])
    assert ads_attempt(address, node_id=NODE, token="x" * 43) == ("UNAUTHENTICATED", [])
    # (c) the real proxy's token, claiming another node: that node's secret is not for this credential.
    assert ads_attempt(address, node_id=OTHER, token=token) == ("PERMISSION_DENIED", [])
    # (d) another proxy's token claiming the real one: the same.
    assert ads_attempt(address, node_id=NODE, token=other_token) == ("PERMISSION_DENIED", [])

    assert cp.status(NODE) == before  # nothing recorded: no ACK, no NACK, no disconnect
    assert cp.status(OTHER).connected is False and cp.status(OTHER).acked == {}
    assert proxy.proc.poll() is None
    assert proxy.stats("control_plane.connected_state")["control_plane.connected_state"] == 1

    # The client can succeed: with the right token for the node it names, it is served the secret.
    code, responses = ads_attempt(address, node_id=OTHER, token=other_token)
    assert code == "OPEN" and [(r.type_url, len(r.resources)) for r in responses] == [(SECRET_TYPE, 1)]

    # The real proxy still follows new snapshots.
    nxt = secured_snapshot("r2")
    cp.set(NODE, nxt)
    assert cp.wait_converged(NODE, nxt), cp.status(NODE)

