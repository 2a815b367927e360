"""A remote that wants credentials (a GitSource's secretRef): fetched and pushed to with them, refused
without, and never sent in clear to another machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.source.git import GitError, HttpCredentials, Pygit2Source, credentials_problem
from tests.fixtures.git import bare_remote, git, new_repo
from tests.fixtures.githttp import git_http

pytestmark = pytest.mark.integration


def test_a_remote_behind_basic_auth_is_fetched_and_pushed_to_with_the_credentials(tmp_path: Path) -> None:
    work = new_repo(tmp_path / "work", {"mesh.yaml": "kind: Mesh\n"})
    (tmp_path / "srv").mkdir()
    bare_remote(work, tmp_path / "srv" / "mesh.git")
    git(tmp_path / "srv" / "mesh.git", "config", "http.receivepack", "true")
    with git_http(tmp_path / "srv", username="lockgate", password="s3cret") as base:
        url = f"{base}/mesh.git"
        source = Pygit2Source.open(url, cache_dir=tmp_path / "cache", credentials=HttpCredentials("lockgate", "s3cret"))
        head = source.head()
        assert head == git(work, "rev-parse", "HEAD")
        sha = source.commit(files={"routes.yaml": b"kind: Route\n"}, message="write-back", parent=head)
        assert git(tmp_path / "srv" / "mesh.git", "rev-parse", "main") == sha  # pushed with the credentials
        for wrong in (None, HttpCredentials("lockgate", "guess")):
            with pytest.raises(GitError):
                Pygit2Source.open(url, cache_dir=tmp_path / f"cache-{wrong is None}", credentials=wrong)


def test_credentials_never_travel_in_clear_to_another_machine() -> None:
    creds = HttpCredentials("u", "hunter2")
    assert credentials_problem("https://git.example.org/mesh.git", creds) is None
    assert credentials_problem("http://127.0.0.1:8080/mesh.git", creds) is None
    assert credentials_problem("http://git.example.org/mesh.git", creds) is not None
    assert credentials_problem("http://git.example.org/mesh.git", None) is None
    with pytest.raises(GitError, match="only over https"):
        Pygit2Source.open("http://git.example.org/mesh.git", cache_dir=Path("/nonexistent"), credentials=creds)
    assert "hunter2" not in repr(creds)  # the secret is not in logs or tracebacks
