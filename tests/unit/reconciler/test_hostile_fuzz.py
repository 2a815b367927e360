"""Generated intent, valid and not: the template's resources mutated (fields dropped, renamed, retyped;
deep nesting, huge strings, unicode, aliases), random YAML, random bytes, odd file names. `load` never
raises; what it calls valid renders consistent snapshots; what it refuses is refused at a path and a line."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from multicluster.issuer import WorkloadIssuer
from reconciler.load import MAX_PROBLEMS, Loaded, load, read_worktree
from reconciler.pipeline import ephemeral_certificates, render_planned

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
BASE: dict[str, list[Any]] = {
    path: list(yaml.safe_load_all(text)) for path, text in read_worktree(TEMPLATE).items()
}
"""Each template file as the documents it holds."""

SETTINGS = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["v1", "v2", "east", "west", "shop", "reviews", "frontend", "100", "0", "1s", "http", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
yaml_chars = st.text(alphabet="[]{}:,-&*!|>'\"#%@? \n\tab01.", max_size=200)


def paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*at, i))
    return out


def parent_of(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


def nested(depth: int, leaf: Any, *, as_map: bool) -> Any:
    for _ in range(depth):
        leaf = {"k": leaf} if as_map else [leaf]
    return leaf


@st.composite
def mutated_doc(draw: st.DrawFn, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        targets = [p for p in paths(doc) if p]
        if not targets:
            break
        path = draw(st.sampled_from(targets))
        holder, last = parent_of(doc, path), path[-1]
        op = draw(st.sampled_from(["drop", "rename", "retype", "deep", "huge", "unicode", "share", "number"]))
        if op == "drop":
            del holder[last]
        elif op == "rename" and isinstance(holder, dict):
            name = str(last)
            holder[draw(st.sampled_from([name + "s", name.upper(), name[::-1], name[:-1] or "x", f"x-{name}"]))] = \
                holder.pop(last)
        elif op == "retype":
            holder[last] = draw(values)
        elif op == "deep":
            depth = draw(st.integers(min_value=1, max_value=120))
            holder[last] = nested(depth, holder[last], as_map=draw(st.booleans()))
        elif op == "huge":
            holder[last] = draw(st.sampled_from("xé\u4e2d ")) * draw(st.integers(min_value=1_000, max_value=200_000))
        elif op == "unicode":
            holder[last] = draw(st.text(min_size=1, max_size=40))
        elif op == "share":  # the same object in two places: PyYAML writes an anchor and an alias
            other = draw(st.sampled_from(targets))
            if other[:len(path)] != path and path[:len(other)] != other:
                parent_of(doc, other)[other[-1]] = holder[last]
        elif op == "number":
            holder[last] = draw(st.integers(min_value=-5, max_value=300))
    return doc


@st.composite
def revisions(draw: st.DrawFn) -> dict[str, bytes]:
    files = {path: yaml.safe_dump_all(docs, sort_keys=False).encode() for path, docs in BASE.items()}
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        path = draw(st.sampled_from(sorted(BASE)))
        kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "yaml", "bytes", "bomb", "name"]))
        if kind == "mutate":
            docs = [draw(mutated_doc(d)) if draw(st.booleans()) else d for d in BASE[path]]
            try:
                files[path] = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=draw(st.booleans())).encode()
            except (yaml.YAMLError, RecursionError):  # the dumper's limits, not the loader's
                continue
        elif kind == "yaml":
            files[path] = draw(yaml_chars).encode()
        elif kind == "bytes":
            files[path] = draw(st.binary(max_size=200))
        elif kind == "bomb":
            width, depth = draw(st.integers(2, 12)), draw(st.integers(1, 12))
            lines = ["l0: &l0 [x]"]
            lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
            files[path] = "\n".join(lines).encode()
        elif kind == "name":
            name = draw(st.sampled_from(["../x.yaml", "a/../b.yaml", "/abs.yaml", "a\\b.yaml", ".hidden.yaml",
                                         "d\u00e9j\u00e0.yaml", "x.yml", "sub/dir/y.yaml", "a//b.yaml"]))
            if path in files:
                files[name] = files.pop(path)
    return files


@functools.lru_cache(maxsize=8)
def certificates(clusters: tuple[str, ...]) -> WorkloadIssuer:
    return ephemeral_certificates(list(clusters))


def check(loaded: Loaded) -> str:
    """What became of the revision, once the property holds."""
    if loaded.ok:
        assert loaded.intent is not None
        clusters = tuple(c.name for c in loaded.intent.mesh.spec.clusters)
        rendered = render_planned(loaded.intent, states={}, certs=certificates(clusters))
        assert set(rendered) == set(clusters)
        for result in rendered.values():
            assert result.error is None, result.error
            for snapshot in result.snapshots.values():
                snapshot.consistent()
    else:
        assert loaded.intent is None and loaded.problems
        assert len(loaded.problems) <= MAX_PROBLEMS + 1
        for p in loaded.problems:
            assert isinstance(p.path, str) and p.path and isinstance(p.line, int) and p.line >= 0, p
            assert str(p).startswith(f"{p.path}:{p.line}: ")
    return "valid" if loaded.ok else "refused"


def test_the_template_itself_passes_the_check() -> None:
    loaded = load(read_worktree(TEMPLATE))
    assert loaded.ok
    check(loaded)


@SETTINGS
@given(revisions())
def test_any_revision_is_loaded_or_refused_at_a_line(files: dict[str, bytes]) -> None:
    event(check(load(files)))


@SETTINGS
@given(st.dictionaries(st.sampled_from(["a.yaml", "b.yml", "c/d.yaml"]), st.binary(max_size=300), max_size=3))
def test_random_bytes_never_crash_it(files: dict[str, bytes]) -> None:
    event(check(load({**read_worktree(TEMPLATE), **files})))
