"""Commands that only read the state dir start without the reconcile loop, gRPC or Envoy's protos.

The e2e harness and scripts call `lockgate status --json` many times a second; importing the whole loop
made each call cost 0.8 s of CPU (1.2-1.4 s wall on this machine), spent competing with the mesh it watched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("reconciler.loop", "grpc", "mesh.render", "pygit2", "kopf")

PROBE = """
import json, sys
from reconciler.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {'reconciler', 'grpc', 'mesh', 'pygit2', 'kopf'})))
"""


@pytest.mark.parametrize("argv", [
    ["status", "--json"],
    ["rollout", "status", "shop/reviews", "--json"],
    ["suspend"],
])
def test_a_read_only_command_imports_no_heavy_module(tmp_path: Path, argv: list[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    out = subprocess.run([sys.executable, "-c", PROBE, *argv, "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[3])
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], (argv, heavy)
    assert "reconciler.cli.main" in modules  # the probe did run the CLI
