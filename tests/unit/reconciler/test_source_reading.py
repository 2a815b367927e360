"""Reading bare repositories and URLs for one command (`lockgate validate --rev`, `lockgate plan`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import reconciler.source
from reconciler.source import git as gitsource
from reconciler.source.git import GitError, Pygit2Source, reading
from tests.fixtures.git import git, mesh_repo


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work tree on main with two commits."""
    return mesh_repo(tmp_path / "work", "services/reviews.yaml")


@pytest.fixture
def bare(tmp_path: Path, work: Path) -> Path:
    """`git clone --bare`: HEAD names main, which exists."""
    path = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(path))
    return path


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory reading() mirrors into, so a test can see what is left behind."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


FILES = {"mesh.yaml": b"kind: Mesh\n", "services/reviews.yaml": b"kind: Service\n"}


def test_open_reads_a_bare_repository_at_its_head_branch(bare: Path, work: Path) -> None:
    source = Pygit2Source.open(str(bare))
    tip = git(work, "rev-parse", "HEAD")
    assert source.branch == "main" and source.head() == tip
    assert source.resolve("HEAD") == tip and source.resolve("HEAD~1") == git(work, "rev-parse", "HEAD~1")
    assert source.read_tree("HEAD") == FILES
    assert source.workdir is None  # nothing checked out: the CLI must read a revision, not the directory
    assert Pygit2Source.open(str(work)).workdir == work


def test_open_honours_a_bare_repositorys_head_branch(tmp_path: Path, work: Path) -> None:
    path = tmp_path / "trunk.git"
    git(tmp_path, "init", "-q", "--bare", str(path), default_branch="trunk")
    git(work, "push", "-q", str(path), "main", "HEAD~1:refs/heads/trunk")
    source = Pygit2Source.open(str(path))
    assert source.branch == "trunk"
    assert source.read_tree("HEAD") == {"mesh.yaml": b"kind: Mesh\n"}


def test_open_of_a_bare_repository_whose_head_names_a_branch_never_pushed(tmp_path: Path, work: Path) -> None:
    """`git init --bare` names master (or init.defaultBranch); people then push main. Read main, as the same
    repository read through a file:// URL does, not an empty branch."""
    path = tmp_path / "stale.git"
    git(tmp_path, "init", "-q", "--bare", str(path), default_branch="master")
    git(work, "push", "-q", str(path), "main")
    assert (path / "HEAD").read_text().strip() == "ref: refs/heads/master"
    source = Pygit2Source.open(str(path))
    assert source.branch == "main"
    assert source.read_tree("HEAD") == FILES
    with reading(f"file://{path}") as remote:
        assert remote.branch == "main" and remote.head() == source.head()


def test_resolving_an_empty_branch_names_the_branches_there(tmp_path: Path, work: Path) -> None:
    path = tmp_path / "many.git"
    git(tmp_path, "init", "-q", "--bare", str(path), default_branch="master")
    git(work, "push", "-q", str(path), "main:alpha", "main:beta")
    source = Pygit2Source.open(str(path))  # neither main, master nor a single branch: HEAD's, though empty
    assert source.branch == "master" and source.head() is None
    with pytest.raises(GitError, match="no commit yet; branches here: alpha, beta"):
        source.resolve("HEAD")
    assert Pygit2Source.open(str(path), branch="beta").read_tree("HEAD") == FILES


def test_a_commit_to_a_bare_repository_moves_the_branch(bare: Path) -> None:
    source = Pygit2Source.open(str(bare))
    parent = source.head()
    assert parent is not None
    sha = source.commit(files={"bot.yaml": b"b"}, message="bot", parent=parent)
    assert git(bare, "rev-parse", "main") == sha
    assert not (bare.parent / "bot.yaml").exists()  # no work tree next to the repository was invented


def test_reading_a_path_opens_it_in_place(bare: Path, work: Path, scratch: Path) -> None:
    for location in (bare, work):
        with reading(str(location)) as source:
            assert source.read_tree("HEAD") == FILES
            assert not source.is_remote
            assert source.git_dir in (location, location / ".git")
    assert list(scratch.iterdir()) == []  # nothing was copied


def test_reading_a_file_url_mirrors_it_into_a_temporary_directory_removed_afterwards(
    bare: Path, work: Path, scratch: Path
) -> None:
    with reading(f"file://{bare}") as source:
        assert source.is_remote and source.branch == "main"
        assert source.head() == git(work, "rev-parse", "HEAD")
        assert source.read_tree(source.resolve("HEAD~1")) == {"mesh.yaml": b"kind: Mesh\n"}
        mirror = source.git_dir
        assert scratch in mirror.parents and mirror.is_dir()
        assert source.health().reachable is True and source.health().last_fetch_at is not None
    assert not mirror.exists()
    assert list(scratch.iterdir()) == []
    assert (bare / "HEAD").is_file()  # the original is untouched


def test_reading_a_url_cleans_up_after_an_error_inside_and_a_failed_fetch(
    bare: Path, tmp_path: Path, scratch: Path
) -> None:
    with pytest.raises(RuntimeError, match="boom"), reading(f"file://{bare}", branch="main") as source:
        assert source.head() is not None
        raise RuntimeError("boom")
    assert list(scratch.iterdir()) == []
    with pytest.raises(GitError, match=r"fetching file://.*missing\.git"), reading(f"file://{tmp_path}/missing.git"):
        pass
    assert list(scratch.iterdir()) == []


def test_reading_a_url_takes_the_remotes_head_branch_or_the_one_asked_for(tmp_path: Path, work: Path) -> None:
    path = tmp_path / "trunk.git"
    git(tmp_path, "init", "-q", "--bare", str(path), default_branch="trunk")
    git(work, "push", "-q", str(path), "main", "HEAD~1:refs/heads/trunk")
    with reading(f"file://{path}") as source:
        assert source.branch == "trunk" and source.read_tree("HEAD") == {"mesh.yaml": b"kind: Mesh\n"}
    with reading(f"file://{path}", branch="main") as source:
        assert source.read_tree("HEAD") == FILES


def test_every_name_other_code_imports_is_still_there() -> None:
    names = (
        "GitError", "Pygit2Source", "StaleParent", "DEFAULT_AUTHOR", "NOTES_REF", "CommitInfo", "GitReader",
        "GitWriter", "init_repo",
    )
    for name in names:
        assert getattr(gitsource, name) is getattr(reconciler.source, name), name
    assert {*names, "SourceHealth", "reading"} <= set(reconciler.source.__all__)
