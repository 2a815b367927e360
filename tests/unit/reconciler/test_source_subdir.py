"""GitSource.spec.path: one folder of a repository is the whole intent; write-back lands in it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.source.git import Pygit2Source
from reconciler.source.subdir import SubdirSource, normalise
from tests.fixtures.git import git, new_repo


def test_reads_see_only_the_folder_and_commits_land_in_it(tmp_path: Path) -> None:
    root = new_repo(tmp_path / "repo", {"README.md": "hi\n", "clusters/east/mesh.yaml": "kind: Mesh\n",
                                        "clusters/east/routes/r.yaml": "kind: Route\n",
                                        "clusters/eastern/mesh.yaml": "kind: Other\n"})
    source = SubdirSource(Pygit2Source.open(str(root)), normalise("./clusters/east/"))
    head = source.head()
    assert head is not None
    assert source.read_tree(head) == {"mesh.yaml": b"kind: Mesh\n", "routes/r.yaml": b"kind: Route\n"}
    sha = source.commit(files={"routes/r.yaml": b"kind: Route # promoted\n"}, message="write-back", parent=head)
    assert git(root, "show", f"{sha}:clusters/east/routes/r.yaml") == "kind: Route # promoted"
    assert git(root, "show", f"{sha}:README.md") == "hi"  # the rest of the repository is untouched


@pytest.mark.parametrize(("path", "expected"), [(".", ""), ("./", ""), ("a/b/", "a/b"), ("./a//b", "a/b")])
def test_normalise(path: str, expected: str) -> None:
    assert normalise(path) == expected


@pytest.mark.parametrize("path", ["/etc", "a/../../b", ".."])
def test_normalise_refuses_what_leaves_the_repository(path: str) -> None:
    with pytest.raises(ValueError):
        normalise(path)
