"""Istio YAML in, served by real Envoys: `lockgate import istio` on the Bookinfo-style inputs of
tests/unit/importers/istio/bookinfo, plus a Mesh and Workloads, passes `lockgate validate` (Envoy's check
included); `lockgate up` serves it, and the ingress shows what Istio's semantics say: productpage on the
gateway (only its matched paths), reviews split 50/50 between v1 and v3, and `end-user: jason` always to v2.
The same mesh's Prometheus answers the Grafana dashboard's request-rate query per service and version, and
scrapes lockgate's own /metrics."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Client, git, lockgate, reviews_version, running, wait_for

pytestmark = pytest.mark.e2e

BOOKINFO = Path(__file__).parents[1] / "tests" / "unit" / "importers" / "istio" / "bookinfo"
WORKLOADS = """\
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: productpage-v1}
spec:
  service: productpage
  version: v1
  clusters: [east]
  command: [lockgate, demo-app, --call, "http://reviews.default:9080/reviews"]
"""
for _version in ("v1", "v2", "v3"):
    WORKLOADS += f"""---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: reviews-{_version}}}
spec: {{service: reviews, version: {_version}, clusters: [east], command: [lockgate, demo-app]}}
"""
WORKLOADS += """---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: ratings-v1}
spec: {service: ratings, version: v1, clusters: [east], command: [lockgate, demo-app]}
"""
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _query(url: str, expr: str) -> dict[str, Any]:
    with _OPENER.open(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as resp:
        answer: dict[str, Any] = json.load(resp)
    return answer


def test_imported_istio_intent_is_served_with_istios_splits_and_header_routes(tmp_path: Path) -> None:
    repo = tmp_path / "mesh-repo"
    lockgate("init", str(repo))
    git(repo, "rm", "-q", "routes.yaml", "services.yaml", "workloads.yaml")  # the template's mesh.yaml stays
    files = [str(p) for p in sorted(BOOKINFO.glob("*.yaml"))]
    strict = lockgate("import", "istio", *files, "--out", str(repo), "--trust-domain", "example.org", check=False)
    assert strict.returncode == 3, strict.stderr  # the gateway-only VirtualService: a warning (files written)
    assert re.search(r"gateway\.yaml:\d+: warning: VirtualService bookinfo gateways: ", strict.stderr)
    assert (repo / "routes.yaml").exists()
    lossy = lockgate("import", "istio", *files, "--out", str(repo), "--trust-domain", "example.org", "--allow-loss",
                     "--force", check=False)
    assert lossy.returncode == 0, lossy.stderr
    assert "warning" in lossy.stderr
    (repo / "workloads.yaml").write_text(WORKLOADS)
    checked = lockgate("validate", str(repo), check=False)  # lockgate's checks and Envoy's own
    assert checked.returncode == 0, checked.stderr
    assert "3 Route" in checked.stdout and "1 TrafficPolicy" in checked.stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bookinfo, imported from Istio YAML")
    head = git(repo, "rev-parse", "HEAD")

    with running(repo=repo, state_dir=tmp_path / "state") as up:
        st = up.wait_converged(head, timeout=90)
        assert all(p["nack"] is None for p in st["clusters"][0]["proxies"])
        client = Client(up.ingress())

        # productpage at the ingress under the VirtualService's host, only on its matched paths.
        seen: Counter[str] = Counter()
        for _ in range(400):
            status, body = client.get("bookinfo.example.com", "/productpage")
            seen[reviews_version(body) if status == 200 else f"HTTP {status}"] += 1
        assert set(seen) == {"v1", "v3"}, seen  # no subset-less leak to v2
        assert 160 <= seen["v1"] <= 240, seen  # 50/50 within 40-60%
        assert client.get("bookinfo.example.com", "/elsewhere")[0] == 404
        status, body = client.get("bookinfo.example.com", "/productpage")
        assert status == 200 and body["service"] == "productpage" and body["namespace"] == "default"

        # reviews is bound to the gateway too: jason's header routes to v2, always; others split.
        jason = Counter(client.get("reviews.example.com", "/", {"end-user": "jason"})[1]["version"] for _ in range(60))
        assert jason == {"v2": 60}, jason
        others = Counter(client.get("reviews.example.com", "/", {"end-user": "alice"})[1]["version"]
                         for _ in range(200))
        assert set(others) == {"v1", "v3"} and 80 <= others["v1"] <= 120, others

        # The Grafana dashboard's request-rate query, against this mesh's Prometheus.
        from reconciler.observe import expressions

        url = up.status()["clusters"][0]["prometheus"]["url"]
        rate = next(e for w, e in expressions() if w.startswith("panel 1 "))
        rate = re.sub(r"\$\{?(\w+)\}?", lambda m: "1m" if m.group(1) == "__rate_interval" else ".*", rate)

        def series() -> set[tuple[str, str]]:
            client.get("bookinfo.example.com", "/productpage")
            result = _query(url, rate)["data"]["result"]
            return {(s["metric"]["service"], s["metric"]["version"]) for s in result if float(s["value"][1]) > 0}

        wait_for("the dashboard's request rate per service and version",
                 lambda: {("productpage", "v1"), ("reviews", "v1"), ("reviews", "v3")} <= series(), timeout=60,
                 interval=0.5)
        wait_for("lockgate's own /metrics scraped", lambda: _query(url, 'up{kind="lockgate"} == 1')["data"]["result"],
                 timeout=30, interval=0.5)
        client.close()
