"""The CLI around rollouts without a running mesh: status from the state dir, commands refused when
`lockgate up` is not running, a missing Prometheus named with its install command, discovery targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.runtime.local import prometheus
from reconciler.runtime.local.prometheus import PrometheusMissing, scrape_targets
from reconciler.state import write_json

RECORD = {
    "namespace": "shop", "name": "reviews", "service": "reviews",
    "spec": {"service": "reviews", "stable": "v1", "canary": "v2", "strategy": "canary", "steps": [10, 50, 100],
             "iterations": 5, "interval": "10s", "analysis": {"failureThreshold": 2}},
    "state": {"phase": "progressing", "stable": "v1", "canary": "v2", "observedCanary": "v2", "step": 1,
              "weight": 50, "failedChecks": 1, "startedAt": 100.0, "nextAnalysisAt": 4e9},
    "lastDecision": {"action": "hold", "at": 110.0, "reasons": ["analysis failed (1/2): success-rate 97 < min 99"],
                     "checks": [{"metric": "success-rate", "cluster": "east", "value": 97.0, "requests": 300.0,
                                 "min": 99.0, "max": None, "result": "fail", "effective": "fail",
                                 "detail": "success-rate 97 < min 99"}]},
}


def test_rollout_status_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(tmp_path / "rollouts" / "shop.reviews.json", RECORD)
    assert main(["rollout", "status", "reviews", "--json", "--state-dir", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["phase"], s["step"], s["weight"]) == ("progressing", 2, 50)
    assert (s["failedChecks"], s["failureThreshold"]) == (1, 2)
    assert s["secondsToNextAnalysis"] > 0 and s["lastDecision"]["checks"][0]["value"] == 97.0
    assert main(["rollout", "status", "reviews", "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "weight 50%  step 2/3" in text and "success-rate@east: 97 (min 99) -> fail" in text
    assert main(["rollout", "status", "nope", "--state-dir", str(tmp_path)]) == 1
    assert "known: shop/reviews" in capsys.readouterr().err


def test_commands_need_a_running_lockgate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(tmp_path / "rollouts" / "shop.reviews.json", RECORD)
    write_json(tmp_path / "status.json", {"lockgate": {"pid": None}})
    assert main(["rollout", "promote", "reviews", "--state-dir", str(tmp_path)]) == 1
    assert "is not running" in capsys.readouterr().err
    assert not (tmp_path / "rollouts" / "commands").exists()


def test_missing_prometheus_names_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr("reconciler.runtime.local.prometheus.shutil.which", lambda _name: None)
    monkeypatch.setattr(prometheus, "CANDIDATES", ())
    with pytest.raises(PrometheusMissing, match="apt-get install --no-install-recommends prometheus"):
        prometheus.prometheus_binary()
    (tmp_path / "repo").mkdir()
    assert main(["up", "--repo", str(tmp_path / "repo"), "--state-dir", str(tmp_path / "st")]) == 1
    err = capsys.readouterr().err
    assert "prometheus" in err and "--prometheus-url" in err


def test_discovery_targets_label_every_proxy_of_the_cluster() -> None:
    from reconciler.runtime.base import ProxyProcess, RuntimeStatus, WorkloadInstance

    status = RuntimeStatus(
        proxies={"east/ingress": ProxyProcess(stats="127.0.1.1:1"), "east/shop/reviews-v2-0": ProxyProcess(
            stats="127.0.1.1:2"), "west/ingress": ProxyProcess(stats="127.0.2.1:3"),
            "east/eastwest": ProxyProcess(admin="unix:/run/x.sock")},
        workloads=[WorkloadInstance(id="east/shop/reviews-v2-0", cluster="east", namespace="shop", service="reviews",
                                    version="v2", workload="reviews-v2", ready=True, address="", endpoint="",
                                    http_proxy="")])
    assert scrape_targets(status, "east") == [
        {"targets": ["127.0.1.1:1"], "labels": {"__metrics_path__": "/stats/prometheus", "cluster": "east",
                                                "node": "east/ingress", "kind": "ingress"}},
        {"targets": ["127.0.1.1:2"], "labels": {"__metrics_path__": "/stats/prometheus", "cluster": "east",
                                                "node": "east/shop/reviews-v2-0", "kind": "sidecar",
                                                "service": "reviews", "version": "v2", "namespace": "shop"}},
    ]
