"""`lockgate validate` asks the real Envoy (`--mode validate`) and points at the intent line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh.render import Extension, Proxy
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


def test_envoy_rejection_is_narrowed_to_the_resource_and_located() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    rejections = asyncio.run(check_with_envoy(loaded.intent, extensions=[BreakOneCluster()]))
    assert {(r.kind, r.name) for r in rejections} == {("cluster", "outbound|reviews.shop|v2")}
    assert all("duration" in r.message.lower() for r in rejections), rejections
    [problem] = locate(rejections, loaded)  # one culprit, though every proxy has the cluster
    assert (problem.path, problem.line) == ("services.yaml", 17)  # the reviews Service's spec
    assert problem.message.startswith("Envoy would reject cluster 'outbound|reviews.shop|v2': ")
