"""Regression tests for what a new user found at the CLI: a busy state dir, bare repositories, an
unreachable remote in status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.source.git import init_repo
from tests.fixtures.intents import TEMPLATE


def lockgate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    init_repo(work, template=TEMPLATE)
    target = tmp_path / "mesh.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(target)], check=True)
    return target


def test_a_second_up_on_a_busy_state_dir_refuses_and_names_the_running_pid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from reconciler.runtime.local.lock import lock_state_dir\n"
         f"lock = lock_state_dir(Path({str(state)!r}))\nprint('held', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        repo = tmp_path / "repo"
        init_repo(repo, template=TEMPLATE)
        t0 = time.monotonic()
        out = lockgate("up", "--repo", str(repo), "--state-dir", str(state), timeout=60)
        assert out.returncode == 1, out.stdout + out.stderr
        assert str(holder.pid) in out.stderr and "busy" in out.stderr, out.stderr
        assert time.monotonic() - t0 < 30  # refused before starting anything (generous bound)
        assert not (state / "processes.json").exists()  # nothing of the first one's was touched
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


@pytest.mark.parametrize("as_url", [False, True])
def test_plan_and_validate_read_a_bare_repository(bare: Path, as_url: bool) -> None:
    location = f"file://{bare}" if as_url else str(bare)
    out = lockgate("plan", "--repo", location, "--json", "--state-dir", str(bare.parent / "nostate"))
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["from"] is None and len(plan["to"]) == 40
    assert [c["name"] for c in plan["clusters"]] == ["east"]
    assert any(ch["kind"] == "proxy" and ch["op"] == "add" for ch in plan["clusters"][0]["changes"])
    out = lockgate("validate", location, "--no-envoy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("valid: "), out.stdout
    assert "no Mesh resource" not in out.stderr


def test_plan_of_a_worktree_needs_a_work_tree(bare: Path) -> None:
    out = lockgate("plan", "--repo", str(bare), "--worktree")
    assert out.returncode == 1 and "work tree" in out.stderr, out.stderr


def test_status_shows_an_unreachable_remote(tmp_path: Path) -> None:
    status = {"revision": {"head": "a" * 40, "applied": "a" * 40, "failed": None, "lastError": []},
              "clusters": [], "workloads": [], "rollouts": [],
              "lockgate": {"pid": None, "repo": "https://git.example.org/mesh.git", "branch": "main"},
              "source": {"remote": True, "reachable": False, "lastFetchAt": None, "lastAttemptAt": 1.0,
                         "lastError": "fetching https://git.example.org/mesh.git failed: timed out"}}
    (tmp_path / "status.json").write_text(json.dumps(status))
    out = lockgate("status", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "UNREACHABLE" in out.stdout and "timed out" in out.stdout, out.stdout
