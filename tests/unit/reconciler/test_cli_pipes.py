"""A lockgate command whose reader goes away early (`lockgate status | head -1`) stops quietly with exit
141, as `git log | head` does: no BrokenPipeError traceback, no "Exception ignored" at exit.

Each command runs as `python -m reconciler.cli` with stdout into a pipe the test closes after one line.
The outputs are made larger than a pipe holds (64 KiB), so the command is still writing when the
reader closes; the last case closes before anything is written, the exit-time flush path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pygit2
import pytest

from reconciler.state import write_json

ROOT = Path(__file__).resolve().parents[3]
SIGPIPE_EXIT = 141


def run_closing_early(args: list[str], tmp_path: Path, *, lines: int = 1) -> tuple[int, str]:
    """Run the CLI, read `lines` lines of its stdout, close the pipe; its exit code and stderr."""
    read_fd, write_fd = os.pipe()
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler.cli", *args], cwd=ROOT, stdout=write_fd,
                                stderr=err)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb", buffering=0) as out:
        for _ in range(lines):
            while out.read(1) not in (b"\n", b""):
                pass
    code = proc.wait(timeout=60)
    return code, (tmp_path / "stderr").read_text()


def status_dir(tmp_path: Path, proxies: int = 3000) -> Path:
    """A state dir whose status.json lists enough proxies to overflow a pipe, text or JSON."""
    state = tmp_path / "state"
    write_json(state / "status.json", {
        "lockgate": {"pid": None, "repo": str(tmp_path / "repo")},
        "revision": {"head": "a" * 40, "applied": "a" * 40},
        "clusters": [{"name": "east", "ingress": "127.0.1.1:8080", "appliedRevision": "a" * 40,
                      "convergedRevision": "a" * 40,
                      "proxies": [{"kind": "sidecar", "id": f"east/shop/reviews-v1-{i}", "ackedRevision": "a" * 40,
                                   "state": "ready"} for i in range(proxies)]}],
    })
    return state


def history_repo(tmp_path: Path, commits: int = 600) -> Path:
    """`lockgate init`, then enough commits that `history --json` overflows a pipe."""
    repo_dir = tmp_path / "repo"
    init = subprocess.run([sys.executable, "-m", "reconciler.cli", "init", str(repo_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    repo = pygit2.Repository(str(repo_dir))
    sig = pygit2.Signature("dev", "dev@example.com")
    head = repo.head.peel(pygit2.Commit)
    for i in range(commits):
        oid = repo.create_commit("HEAD", sig, sig, f"change {i}: shift a little traffic", head.tree.id, [head.id])
        head = repo.get(oid)
    return repo_dir


def assert_quiet(code: int, stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr
    assert code == SIGPIPE_EXIT, stderr


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path, json_flag: list[str]) -> None:
    state = status_dir(tmp_path)
    assert_quiet(*run_closing_early(["status", *json_flag, "--state-dir", str(state)], tmp_path))


def test_history_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    repo = history_repo(tmp_path)
    args = ["history", "--json", "--repo", str(repo), "--limit", "1000", "--state-dir", str(tmp_path / "state")]
    assert_quiet(*run_closing_early(args, tmp_path))


def test_a_reader_gone_before_any_output_exits_quietly(tmp_path: Path) -> None:
    """Small output sits in Python's buffer until exit; the flush must happen where main() catches it."""
    state = status_dir(tmp_path, proxies=1)
    assert_quiet(*run_closing_early(["status", "--json", "--state-dir", str(state)], tmp_path, lines=0))


def test_a_reader_that_reads_everything_still_gets_exit_0(tmp_path: Path) -> None:
    state = status_dir(tmp_path, proxies=1)
    done = subprocess.run([sys.executable, "-m", "reconciler.cli", "status", "--state-dir", str(state)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("lockgate not running"), done.stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(tmp_path: Path) -> None:
    """A dropped connection inside a command (a socket, not the reader of stdout) must not pass for `| head`."""
    code = ("import sys, reconciler.cli.main as m\n"
            "def boom(args): raise BrokenPipeError(32, 'Broken pipe (a peer socket)')\n"
            "m.cmd_status = boom\n"
            "sys.exit(m.main(['status']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "BrokenPipeError: [Errno 32] Broken pipe (a peer socket)" in done.stderr
