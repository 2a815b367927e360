"""Signed commits end to end: `lockgate up --verify-signatures` applies only commits signed by an allowed key,
refuses the rest like an invalid commit (status names the commit and why), and its own write-back, signed with
`--signing-key`, is applied like a person's. `lockgate validate --verify-signatures` says the same offline.
Real git, ssh-keygen, Envoys and demo apps; no Prometheus (a manual promote needs no analysis).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import GIT_ENV, git, lockgate, running, wait_for

pytestmark = pytest.mark.e2e

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{name: http, port: 9080}], versions: [v1, v2]}
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  hosts: [reviews.example.com]
  http:
    - name: default          # weights come from the Rollout
""" + "".join(f"""---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: reviews-{v}, namespace: shop}}
spec: {{service: reviews, version: {v}, clusters: [east], command: [lockgate, demo-app]}}
""" for v in ("v1", "v2"))


def rollout(canary: str | None) -> str:
    return f"""\
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata: {{name: reviews, namespace: shop}}
spec:
  service: reviews
  stable: v1
{f"  canary: {canary}" + chr(10) if canary else ""}  steps: [20, 50, 100]
  interval: 60s
"""


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return path


def public(key: Path) -> str:
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def commit(repo: Path, path: str, text: str, message: str, *, key: Path | None) -> str:
    """A commit as a person makes it: signed by git itself (`commit -S`, SSH format) when ``key`` is given."""
    (repo / path).write_text(text)
    git(repo, "add", "-A")
    sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"] if key else []
    git(repo, *sign, "commit", "-q", "--allow-empty", *(["-S"] if key else []), "-m", message)
    return git(repo, "rev-parse", "HEAD")


def test_only_trusted_commits_are_applied_and_lockgates_own_write_back_is_one(tmp_path: Path) -> None:
    dev, stranger, bot = keygen(tmp_path / "dev"), keygen(tmp_path / "stranger"), keygen(tmp_path / "lockgate")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"{GIT_ENV['GIT_COMMITTER_EMAIL']} {public(dev)}\n")
    repo, state = tmp_path / "repo", tmp_path / "state"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.yaml").write_text(MESH)
    first = commit(repo, "rollout.yaml", rollout(None), "reviews on v1, with a Rollout", key=dev)

    # lockgate's key is not in the file yet: `up` refuses to start and names the line to add.
    out = lockgate("up", "--repo", str(repo), "--state-dir", str(tmp_path / "refused"), "--prometheus-url",
                   "http://127.0.0.1:9", "--verify-signatures", str(allowed), "--signing-key", str(bot), check=False)
    assert out.returncode == 1 and f"lockgate@localhost {public(bot)}" in out.stderr, out.stderr
    with allowed.open("a") as f:
        f.write(f"lockgate@localhost {public(bot)}\n")

    flags = ("--prometheus-url", "http://127.0.0.1:9", "--verify-signatures", str(allowed), "--signing-key", str(bot))
    with running(repo=repo, state_dir=state, extra=flags) as up:
        up.wait_converged(first)

        def refused(sha: str) -> list[str] | None:
            rev: dict[str, Any] = up.status()["revision"]
            return rev["lastError"] if rev["failed"] == sha and rev["applied"] == first else None

        unsigned = commit(repo, "rollout.yaml", rollout("v2"), "canary v2, unsigned", key=None)
        assert wait_for("the unsigned head refused", lambda: refused(unsigned), timeout=20) == [
            f".:0: commit {unsigned[:12]} is not trusted: unsigned"]
        foreign = commit(repo, "rollout.yaml", rollout("v2"), "canary v2, signed by a stranger", key=stranger)
        assert wait_for("the stranger's head refused", lambda: refused(foreign), timeout=20) == [
            f".:0: commit {foreign[:12]} is not trusted: signed by a key not in {allowed.resolve()}:"
            f" {fingerprint(stranger)}"]
        assert up.status()["clusters"][0]["appliedRevision"] == first  # nothing reached the control plane

        canary = commit(repo, "rollout.yaml", rollout("v2"), "canary v2, signed", key=dev)
        up.wait_converged(canary)
        wait_for("the canary run started", lambda: up.status()["rollouts"][0]["canary"] == "v2", timeout=20)
        promote = lockgate("rollout", "promote", "reviews", "--state-dir", str(state), check=False)
        assert promote.returncode == 0, promote.stderr
        written = wait_for("lockgate's write-back commit", lambda: (
            git(repo, "rev-parse", "HEAD") if git(repo, "log", "-1", "--format=%an") == "lockgate" else None),
            timeout=30)
        up.wait_converged(written)  # signed with --signing-key, so trusted like a person's commit
        said = subprocess.run(["git", "-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit", written],
                              cwd=repo, capture_output=True, text=True, env={**os.environ, **GIT_ENV}, timeout=30)
        assert said.returncode == 0 and 'Good "git" signature for lockgate@localhost' in said.stderr, said.stderr

    # Offline, the same verdicts.
    check = ("--verify-signatures", str(allowed), "--no-envoy")
    bad = lockgate("validate", str(repo), "--rev", unsigned, *check, check=False)
    assert bad.returncode == 1 and f"commit {unsigned[:12]} is not trusted: unsigned" in bad.stderr, bad.stderr
    good = lockgate("validate", str(repo), "--rev", written, *check, check=False)
    assert good.returncode == 0, good.stderr
