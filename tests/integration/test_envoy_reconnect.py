"""Fast reconvergence: after its control plane was gone for a while (a lockgate restart), a real Envoy is
back on the new one within a second of it listening, not after Envoy's default backoff (0.5 s doubling to
30 s: 7.6-16 s measured after a restart of a few seconds). With authentication on, as in `lockgate up`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mesh.xds.snapshot import Snapshot
from reconciler.runtime.local.runtime import ProxyTokens
from reconciler.runtime.local.supervisor import Supervised

if TYPE_CHECKING:
    from conftest import ControlPlane, EnvoyProcess

pytestmark = pytest.mark.integration

NODE = "east/ingress"
BOUND = 3.0
"""Seconds from the new control plane listening to the re-ACK: generous (measured: 0.01-0.4 s; the
retry interval is at most 0.5 s), and still far below what Envoy's default backoff costs after a
several-second outage."""


def snapshot(revision: str) -> Snapshot:
    return Snapshot.of(clusters=[{"name": f"c-{revision}", "type": "STATIC", "connect_timeout": "1s"}],
                       revision=revision)



def test_envoy_is_back_within_a_second_of_a_control_plane_restart(
    authed_plane: ControlPlane, tokens: ProxyTokens, envoy: Callable[..., EnvoyProcess], tmp_path: Path,
) -> None:
    cp = authed_plane
    token = tokens.issue(NODE, Supervised(name="ingress", argv=["envoy"], env={}, log_path=tmp_path / "x.log"))
    proxy = envoy(node_id=NODE, xds_port=cp.port, token=token)
    first = snapshot("r0")
    cp.set(NODE, first)
    assert cp.wait_converged(NODE, first)
    took = {}
    for i, down in enumerate((1.0, 3.0, 6.0), start=1):  # long outages are where the default backoff hurt
        listening = cp.restart(down=down)
        snap = snapshot(f"r{i}")
        cp.set(NODE, snap)
        assert cp.wait_converged(NODE, snap, timeout=40), cp.status(NODE)
        took[down] = time.monotonic() - listening
    print("re-ACK after the new control plane listened: "
          + ", ".join(f"{s:.2f} s (down {d:g} s)" for d, s in took.items()))
    assert all(s < BOUND for s in took.values()), took
    assert proxy.proc.poll() is None
