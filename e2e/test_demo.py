"""`make demo` is the README's first command: the whole tour must run and tell the truth."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_the_demo_tour_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "reconciler.cli", "demo", "--dir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    text = out.stdout
    assert out.returncode == 0, f"{text}\n{out.stderr[-3000:]}"
    assert re.search(r"v1 only: +v1: +100 \(100%\)", text), text
    split = re.search(r"50/50: +v1: +(\d+) .* v2: +(\d+) ", text)
    assert split and 140 <= int(split.group(2)) <= 260, text  # 400 requests, about half each
    assert "routes.yaml:25: spec.http[0].route: weights must sum to 100, got 70 + 50 = 120" in text
    assert re.search(r"promote +promoted v2: 100%", text), text
    assert re.search(r"rollback +rolled back: 100% to v2", text), text
    # The second cluster is created in the same commit that moves v2 there: its east-west gateway's
    # listener and the other cluster's new endpoint arrive in one push, so a request or two in the first
    # moment may find the gateway not yet listening (a known gap, in the README). Nearly all must pass.
    moved = re.search(r"from east: +(?:HTTP 502: +(\d+) .*)?v2@west: +(\d+) ", text)
    assert moved and int(moved.group(2)) >= 95, text
    assert "lockgate   rollout shop/reviews: roll back v3" in text
