"""Every golden snapshot is configuration a real Envoy accepts (`envoy --mode validate`).

Golden files pin what render produces; this pins that Envoy takes it: regex limits, enum names, field
constraints that only Envoy checks (a NACK in production). The snapshot is turned into a static
bootstrap: RDS inlined into each listener, EDS clusters made STATIC with their endpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mesh.render  # noqa: F401 - registers the Any types render emits, as in every process that serves them
from mesh.xds import wire as xds
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.fixtures.envoy import envoy_validate, static_bootstrap

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).parent / "golden"
CASES = sorted((p.name, node) for p in GOLDEN.iterdir() if (p / "xds.json").exists()
               for node in json.loads((p / "xds.json").read_text()))


@pytest.mark.parametrize(("case", "node"), CASES)
def test_envoy_accepts(case: str, node: str, tmp_path: Path) -> None:
    snap = json.loads((GOLDEN / case / "xds.json").read_text())[node]
    for key, type_url in (("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER),
                          ("endpoints", ENDPOINT)):
        for res in snap.get(key, []):
            xds.check(type_url, res)  # what the ADS server will have to pack
    out = envoy_validate(static_bootstrap(snap), tmp_path / "envoy.json")
    assert out.returncode == 0, out.stdout + out.stderr
