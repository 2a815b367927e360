"""`lockgate validate` asks the real Envoy (`--mode validate`) and points at the intent line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reconciler.envoycheck import check_with_envoy, locate
from reconciler.load import load, read_worktree

pytestmark = pytest.mark.integration
TEMPLATE = Path(__file__).resolve().parents[2] / "repo-template"

# Valid RE2 (our own check passes it), but larger than Envoy's default max program size (100).
BIG_REGEX = """\
  http:
    - name: big
      match: [{uri: {regex: "/(a|b|c|d){300}x{300}"}}]
      route: [{version: v2}]
    - name: default"""


def test_template_passes_envoy_itself() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.intent is not None
    assert asyncio.run(check_with_envoy(loaded.intent)) == []


def test_envoy_rejection_is_located_at_the_rule() -> None:
    files = read_worktree(TEMPLATE)
    routes = files["routes.yaml"].decode()
    marker = "  hosts: [reviews.example.com]\n  http:\n    - name: default"
    assert marker in routes
    files["routes.yaml"] = routes.replace(marker, "  hosts: [reviews.example.com]\n" + BIG_REGEX).encode()
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems  # our own checks accept it...
    rejections = asyncio.run(check_with_envoy(loaded.intent))
    assert {r.kind for r in rejections} == {"route"}
    assert {r.name.split(" > ", 1)[1] for r in rejections} == {"reviews.shop > big"}
    [problem] = locate(rejections, loaded)  # ...Envoy does not, and the error names the rule's line
    assert (problem.path, problem.line) == ("routes.yaml", 24)
    assert "RE2 program size" in problem.message and "'reviews.shop > big'" in problem.message
