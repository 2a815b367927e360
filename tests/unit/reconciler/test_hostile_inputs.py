"""A hostile committer's files: each is refused with a located error, in bounded time and memory, and
`load` never raises (reconciler/load.py, "Whoever can commit can write anything")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler import kinds
from reconciler import load as loader
from reconciler.load import MAX_ALIASES, MAX_NODES, MAX_PROBLEMS, Loaded, Problem, Tree, load, read_worktree

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
MiB = 1 << 20


def template() -> dict[str, bytes]:
    return dict(read_worktree(TEMPLATE))


@contextmanager
def bounded(*, seconds: float = 10.0, mib: int = 300) -> Iterator[None]:
    """The block takes less than `seconds` and leaves this process less than `mib` MiB bigger."""
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    grew = (process.memory_info().rss - before) / MiB
    assert took < seconds, f"took {took:.1f}s"
    assert grew < mib, f"grew by {grew:.0f} MiB"


def refused(files: dict[str, bytes], **bounds: Any) -> Loaded:
    with bounded(**bounds):
        loaded = load(files)
    assert loaded.intent is None and loaded.problems
    assert all(isinstance(p, Problem) and p.path and isinstance(p.line, int) for p in loaded.problems)
    return loaded


def only(loaded: Loaded) -> str:
    assert len(loaded.problems) == 1, [str(p) for p in loaded.problems]
    return str(loaded.problems[0])


def unknown_keys(count: int) -> bytes:
    head = b"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {name: junk, namespace: shop}\nspec:\n"
    return head + b"".join(b"  k%07d: 1\n" % i for i in range(count))


# --- the attacks that took the control plane down ----------------------------------------------------


def test_ten_thousand_levels_of_nesting_are_refused_not_a_recursion_error() -> None:
    text = b"apiVersion: lockgate.io/v1alpha1\nspec: " + b"[" * 10_000 + b"]" * 10_000 + b"\n"
    assert len(text) < 21_000
    loaded = refused({**template(), "deep.yaml": text})
    assert only(loaded) == "deep.yaml:2: nested more than 64 levels deep (mappings and lists)"


def test_deep_block_nesting_is_refused_where_it_passes_the_limit() -> None:
    text = "".join(f"{' ' * i}k{i}:\n" for i in range(1_000)).encode()
    assert len(text) < MiB
    loaded = refused({**template(), "deep.yaml": text})
    assert only(loaded) == "deep.yaml:65: nested more than 64 levels deep (mappings and lists)"


def test_deep_nesting_through_aliases_is_refused() -> None:
    text = b"a: &a " + b"[" * 40 + b"]" * 40 + b"\nb: " + b"[" * 40 + b"*a" + b"]" * 40 + b"\n"
    assert only(refused({**template(), "deep.yaml": text})) == "deep.yaml:2: alias *a nests more than 64 levels deep"


def billion_laughs() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


def test_a_billion_laughs_is_refused_without_being_expanded() -> None:
    bomb = billion_laughs()
    assert len(bomb) < 700
    loaded = refused({**template(), "bomb.yaml": bomb}, seconds=5, mib=50)
    assert only(loaded).startswith(f"bomb.yaml:7: this alias expands the revision past {MAX_NODES} YAML nodes")


def test_the_bomb_in_a_resource_field_is_refused_too() -> None:
    bomb = billion_laughs().decode().replace("\n", "\n  ")
    text = (f"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {{name: x, namespace: shop}}\n"
            f"spec:\n  {bomb}").encode()
    assert only(refused({**template(), "bomb.yaml": text}, seconds=5, mib=50)).startswith("bomb.yaml:11: ")


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    loaded = refused({**template(), "loop.yaml": b"a: &x [1, [2, *x]]\n"})
    assert only(loaded) == "loop.yaml:1: alias *x inside its own anchor &x (a cycle)"


def test_aliases_are_bounded_per_revision() -> None:
    uses = MAX_ALIASES // 2 + 1
    one = b"a: &a 1\nb: [" + b"*a, " * uses + b"1]\n"
    messages = [str(p) for p in refused({**template(), "one.yaml": one, "two.yaml": one}).problems]
    assert messages == ["one.yaml:1: apiVersion: expected 'lockgate.io/v1alpha1', got None",  # read, within the bound
                        f"two.yaml:2: more than {MAX_ALIASES} alias uses (*name) in the revision"]


def test_a_few_aliases_are_fine() -> None:
    files = template()
    files["services.yaml"] = files["services.yaml"].replace(
        b"    - {name: http, port: 9080, protocol: HTTP}",
        b"    - &http {name: http, port: 9080, protocol: HTTP}\n    - {<<: *http, name: admin, port: 9081}")
    loaded = load(files)
    assert loaded.ok, loaded.problems
    assert loaded.intent is not None
    ports = loaded.intent.services[("shop", "reviews")].spec.ports
    assert [(p.name, p.port, p.protocol) for p in ports] == [("http", 9080, "HTTP"), ("admin", 9081, "HTTP")]


def test_twenty_megabytes_of_unknown_keys_are_refused_unread() -> None:
    junk = unknown_keys(1_700_000)
    assert len(junk) > 20 * MiB
    loaded = refused({**template(), "junk.yaml": junk}, seconds=5, mib=100)
    assert only(loaded) == (f"junk.yaml:0: file is {len(junk)} bytes, more than the 1 MiB limit for one intent "
                            "file: split it")


def test_a_megabyte_of_unknown_keys_is_refused_at_the_first_key_past_the_width_limit() -> None:
    """70,000 keys in one mapping: refused where the 10,001st begins, before anything is composed (the
    rest of the megabyte is never parsed: 20 MB of such files cost seconds, not a minute)."""
    junk = unknown_keys(70_000)
    assert len(junk) < MiB
    loaded = refused({**template(), "junk.yaml": junk}, seconds=10, mib=300)
    assert [str(p) for p in loaded.problems] == ["junk.yaml:10005: more than 10000 keys in one mapping"]


def test_a_mapping_as_wide_as_allowed_costs_a_count_not_ten_thousand_messages() -> None:
    junk = unknown_keys(9_000)
    loaded = refused({**template(), "junk.yaml": junk}, seconds=10, mib=300)
    assert len(loaded.problems) == MAX_PROBLEMS + 1
    assert loaded.error_count == 9_002  # every unknown key, and the two required fields
    assert str(loaded.problems[-1]) == f".:0: {9_002 - MAX_PROBLEMS} more error(s) not shown"
    assert str(loaded.problems[2]) == \
        "junk.yaml:5: spec.k0000000: unknown field 'k0000000'; allowed here: ports, versions"


def test_a_list_past_the_width_limit_is_refused_where_it_passes_it() -> None:
    items = b"".join(b"  - %d\n" % i for i in range(10_001))
    text = b"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {name: w, namespace: shop}\nspec:\n" \
        b" versions:\n" + items
    loaded = refused({**template(), "wide.yaml": text})
    assert [str(p) for p in loaded.problems] == ["wide.yaml:10006: more than 10000 items in one list"]


def test_many_files_of_unknown_keys_stay_bounded() -> None:
    files = {**template(), **{f"junk{i}.yaml": unknown_keys(10_000) for i in range(4)}}
    loaded = refused(files, seconds=10, mib=300)
    assert len(loaded.problems) == MAX_PROBLEMS + 1 and loaded.error_count == 4 * 10_002


def test_the_node_limit_counts_the_whole_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_NODES", 100_000)  # the same code at a tenth of the size, for speed
    monkeypatch.setattr(loader, "MAX_ENTRIES_PER_COLLECTION", 1_000_000)  # wide lists: the node count is tested
    flat = b"[" + b"1," * 45_000 + b"1]\n"
    loaded = refused({**template(), "a.yaml": flat, "b.yaml": flat, "c.yaml": flat})
    assert [str(p) for p in loaded.problems] == [
        "a.yaml:1: expected a resource (a mapping with apiVersion, kind, metadata, spec), got list",
        "b.yaml:1: expected a resource (a mapping with apiVersion, kind, metadata, spec), got list",
        "c.yaml:1: the revision holds more than 100000 YAML nodes (values, mappings and lists, aliases counted "
        "expanded)",
    ]


def test_a_megabyte_of_values_is_within_bounds() -> None:
    """Half a million nodes, the most one file can hold, in lists as wide as allowed: composed within the
    worker's time and memory, then refused for what it is."""
    inner = b"[" + b"1," * 8_999 + b"1]"
    wide = b"[" + b",".join([inner] * 55) + b"]\n"
    assert len(wide) < MiB
    loaded = refused({**template(), "wide.yaml": wide}, seconds=20, mib=400)
    assert only(loaded) == \
        "wide.yaml:1: expected a resource (a mapping with apiVersion, kind, metadata, spec), got list"
    flat = b"[" + b"1," * (MiB // 2 - 8) + b"1]\n"  # the same values in one list: refused before composing
    assert only(refused({**template(), "flat.yaml": flat})) == "flat.yaml:1: more than 10000 items in one list"


def test_the_total_size_is_bounded() -> None:
    files = {**template(), **{f"big{i:02}.yaml": b"# " + b"x" * (MiB - 10) + b"\n" for i in range(17)}}
    loaded = refused(files, seconds=10, mib=200)
    why = "not read: the revision's intent files total more than 16 MiB"
    assert [str(p) for p in loaded.problems] == [
        ".:0: no Mesh resource: add one (kind: Mesh) naming the trust domain and clusters",
        *(f"{name}:0: {why}" for name in ("big16.yaml", "mesh.yaml", "routes.yaml", "services.yaml", "workloads.yaml"))]


def test_documents_are_bounded_per_file() -> None:
    loaded = refused({**template(), "many.yaml": b"---\n" * 10_001})
    assert only(loaded) == "many.yaml:10001: more than 10000 documents in one file"


def test_a_binary_file_is_refused_at_its_first_nul() -> None:
    loaded = refused({**template(), "blob.yaml": b"apiVersion: x\nkind: y\n\x00\x01\x02\xff" * 100})
    assert only(loaded) == "blob.yaml:3: a NUL byte (at byte 22): this is a binary file, not YAML text"


def test_invalid_utf8_is_refused_at_its_line() -> None:
    loaded = refused({**template(), "latin1.yaml": "a: 1\nb: caf\u00e9\n".encode("latin-1")})
    assert only(loaded) == "latin1.yaml:2: not UTF-8 text (invalid continuation byte at byte 11)"


def test_a_path_that_leaves_its_directory_is_refused_not_ignored() -> None:
    loaded = refused({**template(), "sub/../evil.yaml": b"kind: Anything\n"})
    assert only(loaded) == "sub/../evil.yaml:0: a '..' in the path (it would leave its directory)"


def test_refusals_carried_by_a_tree_make_the_revision_invalid() -> None:
    files = Tree(template(), refused={"link.yaml": "a symbolic link (to '/etc/passwd')"})
    loaded = refused(files)
    assert only(loaded) == "link.yaml:0: a symbolic link (to '/etc/passwd')"


def test_a_value_the_constructor_refuses_is_that_documents_error() -> None:
    text = b"a: 1\n---\nb: " + b"9" * 10_000 + b"\n"
    loaded = refused({**template(), "num.yaml": text})
    messages = [str(p) for p in loaded.problems]
    assert messages[0] == "num.yaml:1: apiVersion: expected 'lockgate.io/v1alpha1', got None"
    assert messages[1].startswith("num.yaml:3: cannot read this document: ValueError: Exceeds the limit")


def test_a_long_message_is_cut() -> None:
    name = "k" * 100_000
    text = ("apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {name: x, namespace: shop}\n"
            f"spec:\n  {name}: 1\n")
    loaded = refused({**template(), "long.yaml": text.encode()})
    assert all(len(p.message) < 1100 for p in loaded.problems)


# --- load never raises ---------------------------------------------------------------------------------


def test_a_failing_check_is_a_problem_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(resources: list[Any]) -> list[Any]:
        raise RuntimeError("a bug in a check")

    monkeypatch.setattr(loader, "VALIDATORS", [*kinds.VALIDATORS, broken])
    loaded = load(template())
    assert only(loaded).startswith(".:0: the check ")
    assert "RuntimeError: a bug in a check" in only(loaded)


@pytest.mark.parametrize("error", [RecursionError(), MemoryError(), KeyError("x"), ValueError("odd")])
def test_any_error_while_reading_a_file_is_that_files_problem(monkeypatch: pytest.MonkeyPatch,
                                                               error: Exception) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(loader, "_compose", failing)
    loaded = load({**template(), "odd.yaml": b"a: 1\n"})  # the template's files are remembered: not read again
    assert loaded.intent is None
    assert [(p.path, p.line) for p in loaded.problems] == [("odd.yaml", 0)]
    assert loaded.problems[0].message.startswith("cannot read this file: ")


def test_a_model_failing_oddly_is_that_documents_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    service = kinds.KINDS["Service"]

    def odd(data: Any) -> Any:
        raise RecursionError

    monkeypatch.setattr(service, "model_validate", odd)
    monkeypatch.setattr(loader, "_models", loader._Cache())
    loaded = load(template())
    assert "services.yaml:2: cannot validate this document: nested too deeply to read (RecursionError)" in [
        str(p) for p in loaded.problems]


def test_anything_else_is_the_revisions_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(files: Any) -> Any:
        raise MemoryError

    before = loader.memory_errors()
    monkeypatch.setattr(loader, "_load", failing)
    assert only(load(template())) == ".:0: cannot load this revision: out of memory (MemoryError)"
    assert loader.memory_errors() == before + 1


def test_odd_mappings_do_not_crash_it() -> None:
    files: Any = {**template(), 7: b"x", "str.yaml": "not bytes"}
    messages = [str(p) for p in load(files).problems]
    assert messages == [".:0: a file name that is not text: 7", "str.yaml:0: content is a str, not bytes"]
