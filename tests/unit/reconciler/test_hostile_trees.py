"""Trees a hostile committer can craft (pygit2 writes them; git itself would refuse to), and work trees with
links out of the repository: every odd entry is refused as `path:0`, never skipped in silence, never followed,
and reading stays bounded in time and memory whatever the tree holds."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pygit2
import pytest
from pygit2.enums import ObjectType

from reconciler.load import MAX_DIRECTORY_DEPTH, MAX_ENTRIES, Tree, load, read_worktree
from reconciler.source.git import Pygit2Source
from tests.fixtures.git import commit_all, git

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
MiB = 1 << 20
BLOB, TREE, LINK, COMMIT = 0o100644, 0o040000, 0o120000, 0o160000


@contextmanager
def bounded(*, seconds: float = 10.0, mib: int = 100) -> Iterator[None]:
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.monotonic()
    yield
    assert time.monotonic() - started < seconds
    assert (process.memory_info().rss - before) / MiB < mib


class Crafted:
    """A repository whose trees are written byte by byte, so they can hold what git never writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repo = pygit2.init_repository(str(path), bare=True)

    def blob(self, data: bytes) -> pygit2.Oid:
        return self.repo.create_blob(data)

    def tree(self, entries: list[tuple[int, bytes, pygit2.Oid]]) -> pygit2.Oid:
        raw = b"".join(b"%o %s\0" % (mode, name) + bytes.fromhex(str(oid)) for mode, name, oid in entries)
        return self.repo.odb.write(ObjectType.TREE, raw)

    def template(self) -> list[tuple[int, bytes, pygit2.Oid]]:
        return [(BLOB, p.name.encode(), self.blob(p.read_bytes())) for p in sorted(TEMPLATE.glob("*.yaml"))]

    def commit(self, tree: pygit2.Oid) -> Pygit2Source:
        sig = pygit2.Signature("t", "t@t")
        self.repo.create_commit("refs/heads/main", sig, sig, "crafted", tree, [])
        return Pygit2Source.open(str(self.path), branch="main")


@pytest.fixture
def crafted(tmp_path: Path) -> Crafted:
    return Crafted(tmp_path / "crafted.git")


def refused_only(files: dict[str, bytes]) -> list[str]:
    """The problems of a revision that holds the template and the crafted entries."""
    loaded = load(files)
    assert loaded.intent is None
    return [str(p) for p in loaded.problems]


@pytest.mark.parametrize(("name", "why"), [
    (b"sub/../evil.yaml", "sub/../evil.yaml:0: a '..' in the path (it would leave its directory)"),
    (b"/abs.yaml", "/abs.yaml:0: an absolute path"),
    (b"a\\b.yaml", "a\\b.yaml:0: a backslash in the name (a Windows path separator, or an attempt to look like one)"),
    (b"\xff\xfe.yaml", "\\xff\\xfe.yaml:0: the name is not UTF-8"),
    (b"services/extra.yaml", "services/extra.yaml:0: a '/' inside one name (a crafted tree entry that would pass"),
    (b"..", "..:0: a '..' in the path (it would leave its directory)"),
])
def test_a_crafted_name_is_refused_not_skipped(crafted: Crafted, name: bytes, why: str) -> None:
    source = crafted.commit(crafted.tree([*crafted.template(), (BLOB, name, crafted.blob(b"kind: Evil\n"))]))
    files = source.read_tree("HEAD")
    assert isinstance(files, Tree) and set(files) == {p.name for p in TEMPLATE.glob("*.yaml")}
    problems = refused_only(files)
    assert len(problems) == 1 and problems[0].startswith(why), problems


def test_a_dot_dot_directory_is_refused(crafted: Crafted) -> None:
    inner = crafted.tree([(BLOB, b"evil.yaml", crafted.blob(b"kind: Evil\n"))])
    sub = crafted.tree([(TREE, b"..", inner)])
    source = crafted.commit(crafted.tree([*crafted.template(), (TREE, b"sub", sub)]))
    assert refused_only(source.read_tree("HEAD")) == ["sub/..:0: a '..' in the path (it would leave its directory)"]


def test_a_committed_symlink_is_refused(crafted: Crafted) -> None:
    link = crafted.blob(b"/etc/passwd")
    source = crafted.commit(crafted.tree([*crafted.template(), (LINK, b"passwd.yaml", link), (LINK, b"more", link)]))
    files = source.read_tree("HEAD")
    assert "passwd.yaml" not in files
    why = "a symbolic link (to '/etc/passwd'): intent must be plain files"
    problems = refused_only(files)
    assert [p.split(" (a checkout")[0] for p in problems] == [f"more:0: {why}", f"passwd.yaml:0: {why}"]


def test_a_symlink_committed_with_git_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    git(root, "init", "-q")
    for p in TEMPLATE.glob("*.yaml"):
        (root / p.name).write_bytes(p.read_bytes())
    (root / "outside.yaml").symlink_to("../../etc/shadow")
    commit_all(root, "a link out")
    problems = refused_only(Pygit2Source.open(str(root)).read_tree("HEAD"))
    assert problems == ["outside.yaml:0: a symbolic link (to '../../etc/shadow'): intent must be plain files (a "
                        "checkout would follow it, the commit holds only the link)"]


def test_a_submodule_is_refused(crafted: Crafted) -> None:
    commit = pygit2.Oid(hex="1" * 40)
    source = crafted.commit(crafted.tree([*crafted.template(), (COMMIT, b"vendor", commit)]))
    assert refused_only(source.read_tree("HEAD")) == [
        "vendor:0: a submodule (commit 111111111111): its files are not in this repository; copy the intent in"]


def test_hidden_entries_are_neither_read_nor_refused(crafted: Crafted) -> None:
    link = crafted.blob(b"/etc/passwd")
    github = crafted.tree([(LINK, b"ci.yaml", link), (BLOB, b"x.yaml", crafted.blob(b"not: [yaml"))])
    source = crafted.commit(crafted.tree([(TREE, b".github", github), *crafted.template(), (COMMIT, b".x", link)]))
    files = source.read_tree("HEAD")
    assert not files.refused and not any(p.startswith(".") for p in files)  # type: ignore[attr-defined]
    assert load(files).ok


def test_ten_thousand_nested_directories_are_bounded(crafted: Crafted) -> None:
    tree = crafted.tree([(BLOB, b"deep.yaml", crafted.blob(b"kind: Deep\n"))])
    for _ in range(10_000):
        tree = crafted.tree([(TREE, b"d", tree)])
    source = crafted.commit(crafted.tree([*crafted.template(), (TREE, b"d", tree)]))
    with bounded():
        files = source.read_tree("HEAD")
    path = "/".join(["d"] * (MAX_DIRECTORY_DEPTH + 1))
    assert refused_only(files) == [f"{path}:0: directories nested more than {MAX_DIRECTORY_DEPTH} deep: not read"]


def test_a_tree_of_shared_subtrees_is_bounded(crafted: Crafted) -> None:
    """Twenty levels of two names for the same tree: a million paths from twenty small objects."""
    tree = crafted.tree([(BLOB, b"x.yaml", crafted.blob(b"a: 1\n"))])
    for _ in range(20):
        tree = crafted.tree([(TREE, b"a", tree), (TREE, b"b", tree)])
    source = crafted.commit(crafted.tree([*crafted.template(), (TREE, b"bomb", tree)]))
    with bounded(seconds=20):
        files = source.read_tree("HEAD")
    problems = refused_only(files)
    assert f".:0: more than {MAX_ENTRIES} files and directories: not read further" in problems


def test_a_huge_blob_is_refused_without_being_inflated(crafted: Crafted) -> None:
    zeros = crafted.blob(b"\0" * (256 * MiB))  # compresses to a few hundred KiB
    source = crafted.commit(crafted.tree([*crafted.template(), (BLOB, b"big.yaml", zeros), (BLOB, b"big.bin", zeros)]))
    with bounded(mib=64):
        files = source.read_tree("HEAD")
    assert "big.bin" not in files  # not intent: left out, unread
    assert refused_only(files) == [
        f"big.yaml:0: file is {256 * MiB} bytes, more than the 1 MiB limit for one intent file: split it"]


def test_a_missing_object_is_refused(crafted: Crafted) -> None:
    missing = pygit2.Oid(hex="2" * 40)
    source = crafted.commit(crafted.tree([*crafted.template(), (BLOB, b"gone.yaml", missing), (TREE, b"dir", missing)]))
    problems = refused_only(source.read_tree("HEAD"))
    assert [p.split(":0: ")[0] for p in problems] == ["dir", "gone.yaml"]
    assert all("cannot read this " in p and "from the repository" in p for p in problems)


def test_a_binary_file_in_a_commit_is_refused_at_its_line(crafted: Crafted) -> None:
    blob = crafted.blob(b"apiVersion: x\n\x00\x01binary")
    source = crafted.commit(crafted.tree([*crafted.template(), (BLOB, b"bin.yaml", blob)]))
    assert refused_only(source.read_tree("HEAD")) == [
        "bin.yaml:2: a NUL byte (at byte 14): this is a binary file, not YAML text"]


# --- work trees (`lockgate validate DIR`) -----------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for p in TEMPLATE.glob("*.yaml"):
        (root / p.name).write_bytes(p.read_bytes())
    return root


def test_a_symlink_out_of_the_work_tree_is_not_followed(tmp_path: Path, tree: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2\n")
    (tree / "secret.yaml").symlink_to(secret)
    files = read_worktree(tree)
    assert b"hunter2" not in b"".join(files.values())
    assert refused_only(files) == [f"secret.yaml:0: a symbolic link (to {str(secret)!r}): not followed; intent "
                                   "must be plain files (a commit holds the link, not what it points at)"]


def test_a_symlinked_directory_is_refused(tmp_path: Path, tree: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "more.yaml").write_text("kind: Elsewhere\n")
    (tree / "services").symlink_to(elsewhere)
    files = read_worktree(tree)
    assert not any(p.startswith("services/") for p in files)
    assert [p.split(" (to")[0] for p in refused_only(files)] == ["services:0: a symbolic link"]


def test_a_fifo_named_as_intent_is_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "pipe.yaml")
    with bounded(seconds=5):
        files = read_worktree(tree)
    assert refused_only(files) == ["pipe.yaml:0: not a regular file (a FIFO, socket or device): not read"]


def test_a_big_work_tree_file_is_refused_unread(tree: Path) -> None:
    with open(tree / "big.yaml", "wb") as f:
        f.truncate(64 * MiB)  # sparse: costs no disk
    with bounded(mib=32):
        files = read_worktree(tree)
    assert refused_only(files) == [
        f"big.yaml:0: file is {64 * MiB} bytes, more than the 1 MiB limit for one intent file: split it"]


def test_a_name_that_is_not_utf8_is_refused(tree: Path) -> None:
    os.close(os.open(os.path.join(os.fsencode(tree), b"caf\xe9.yaml"), os.O_CREAT | os.O_WRONLY))
    assert refused_only(read_worktree(tree)) == ["caf\\xe9.yaml:0: the name is not UTF-8"]


def test_deep_work_tree_directories_are_bounded(tree: Path) -> None:
    deep = tree.joinpath(*["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "x.yaml").write_text("kind: Deep\n")
    path = "/".join(["d"] * (MAX_DIRECTORY_DEPTH + 1))
    assert refused_only(read_worktree(tree)) == [
        f"{path}:0: directories nested more than {MAX_DIRECTORY_DEPTH} deep"]


def test_hidden_work_tree_entries_are_skipped(tmp_path: Path, tree: Path) -> None:
    (tree / ".git").mkdir()
    (tree / ".git" / "x.yaml").write_text("not: [yaml")
    (tree / ".link.yaml").symlink_to(tmp_path)
    files = read_worktree(tree)
    assert not files.refused and load(files).ok


def test_a_second_read_takes_known_blobs_from_the_last_one_with_the_same_limits(crafted: Crafted) -> None:
    """Blobs are kept by id between reads (reconciler.source.git `_blobs`): a read after a commit inflates only
    what changed, and gives what a fresh source gives, byte for byte and refusal for refusal, the total
    budget counted again over every kept file (20 paths of one 1 MiB blob pass the 16 MiB limit)."""
    big = crafted.blob(b"# " + b"x" * (MiB - 3) + b"\n")
    shared = [(BLOB, b"f%02d.yaml" % k, big) for k in range(20)]
    source = crafted.commit(crafted.tree([*crafted.template(), *shared]))
    first = source.read_tree("HEAD")
    assert len(first.refused) == 5 and all("total more than 16 MiB" in why for why in first.refused.values())
    assert set(source._blobs) == {big, *(oid for _, _, oid in crafted.template())}  # one for 15 paths of `big`

    changed = crafted.blob(b"# changed\n")
    sig = pygit2.Signature("t", "t@t")
    tip = crafted.repo.references["refs/heads/main"].target
    crafted.repo.create_commit("refs/heads/main", sig, sig, "one file", crafted.tree(
        [*crafted.template(), (BLOB, b"f00.yaml", changed), *shared[1:]]), [tip])
    inflated: list[pygit2.Oid] = []
    repo = source._repo

    class Counting:
        """The repository, counting the blobs looked up (inflated) by id."""
        odb = repo.odb

        def __getitem__(self, oid: pygit2.Oid) -> object:
            obj = repo[oid]
            if isinstance(obj, pygit2.Blob):
                inflated.append(oid)
            return obj

        def __getattr__(self, name: str) -> object:
            return getattr(repo, name)

    source._repo = Counting()  # type: ignore[assignment]
    second = source.read_tree("HEAD")
    assert inflated == [changed]
    fresh = Pygit2Source.open(str(crafted.path), branch="main").read_tree("HEAD")
    assert second == fresh and second.refused == fresh.refused
    assert second["f00.yaml"] == b"# changed\n" and len(second.refused) == 4
