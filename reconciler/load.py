"""Load intent YAML from a tree of files and validate it, reporting every error as `path:line: message`.

All errors of a revision are reported at once; an Intent is produced only when there are none, so an
invalid commit can never reach render.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mesh.intent import API_VERSION, Intent, ResourceBase
from mesh.validate import Loc
from mesh.xds.snapshot import digest
from reconciler.kinds import KINDS, VALIDATORS

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class _Doc:
    path: str
    line: int
    data: Any
    lines: dict[Loc, int]

    def line_of(self, loc: Loc) -> int:
        """The line of the deepest part of `loc` present in the YAML (a missing field -> its parent)."""
        for n in range(len(loc), -1, -1):
            if (hit := self.lines.get(tuple(loc[:n]))) is not None:
                return hit
        return self.line


@dataclass
class Loaded:
    intent: Intent | None
    resources: list[ResourceBase] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    """Reported (`path:line: warning: ...`) but they do not make the revision invalid."""
    origins: list[_Doc] = field(default_factory=list, repr=False)
    """Where each of `resources` was written (same order)."""

    def where(self, resource: ResourceBase, loc: Loc = ()) -> tuple[str, int]:
        """File and line of a field of a loaded resource."""
        for r, doc in zip(self.resources, self.origins, strict=True):
            if r is resource:
                return doc.path, doc.line_of(loc)
        return ".", 0

    @property
    def ok(self) -> bool:
        return self.intent is not None and not self.problems


def intent_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The YAML files that hold intent: *.yaml / *.yml outside hidden directories."""
    return {
        p: b for p, b in files.items()
        if p.endswith(YAML_SUFFIXES) and not any(part.startswith(".") for part in p.split("/"))
    }


def read_worktree(root: Path) -> dict[str, bytes]:
    """Intent files from a directory on disk (for `validate` as a pre-commit check)."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return intent_files(out)


def load(files: Mapping[str, bytes]) -> Loaded:
    docs: list[_Doc] = []
    problems: list[Problem] = []
    for path in sorted(intent_files(files)):
        parsed, errs = _parse_yaml(path, files[path])
        docs += parsed
        problems += errs

    resources: list[ResourceBase] = []
    origin: list[_Doc] = []
    for doc in docs:
        res, errs = _to_resource(doc)
        problems += errs
        if res is not None:
            resources.append(res)
            origin.append(doc)

    warnings: list[Problem] = []
    for f in (f for check in VALIDATORS for f in check(resources)):
        if f.index < 0:
            found = Problem(".", 0, f.message)
        else:
            doc = origin[f.index]
            found = Problem(doc.path, doc.line_of(f.loc), f"{_dotted(f.loc)}: {f.message}" if f.loc else f.message)
        if f.warning:
            warnings.append(Problem(found.path, found.line, f"warning: {found.message}"))
        else:
            problems.append(found)
    if problems:
        return Loaded(intent=None, resources=resources, problems=sorted(set(problems)), warnings=sorted(warnings),
                      origins=origin)
    return Loaded(intent=Intent.from_resources(resources), resources=resources, warnings=sorted(warnings),
                  origins=origin)


# --- YAML with line numbers ---------------------------------------------------------------------------


def _parse_yaml(path: str, raw: bytes) -> tuple[list[_Doc], list[Problem]]:
    """Documents with their line maps; a file unchanged since the last revision is not parsed again."""
    key = (path, hashlib.sha256(raw).digest())
    hit = _files.get(key)
    if hit is None:
        hit = _parse_yaml_uncached(path, raw)
        if len(_files) >= _MODELS_MAX:
            _files.clear()
        _files[key] = hit
    return hit


_files: dict[tuple[str, bytes], tuple[list[_Doc], list[Problem]]] = {}


def _parse_yaml_uncached(path: str, raw: bytes) -> tuple[list[_Doc], list[Problem]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [Problem(path, 1, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]
    loader = yaml.SafeLoader(text)
    docs: list[_Doc] = []
    problems: list[Problem] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[Loc, int] = {}
            dup: list[Problem] = []
            _walk(node, (), lines, dup, path)
            problems += dup
            data = loader.construct_document(node)
            if data is None:
                continue
            docs.append(_Doc(path=path, line=node.start_mark.line + 1, data=data, lines=lines))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        problems.append(Problem(path, line, f"YAML syntax error: {what}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(path, 1, f"YAML error: {exc}"))
    finally:
        loader.dispose()
    return docs, problems


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[Problem], path: str) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                problems.append(Problem(path, key.start_mark.line + 1,
                                        f"{_dotted((*loc, name))}: duplicate key {name!r}"))
            seen.add(name)
            lines[(*loc, name)] = key.start_mark.line + 1
            _walk(value, (*loc, name), lines, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), lines, problems, path)


# --- models ---------------------------------------------------------------------------------------------


def _to_resource(doc: _Doc) -> tuple[ResourceBase | None, list[Problem]]:
    def at(loc: Loc, message: str) -> Problem:
        return Problem(doc.path, doc.line_of(loc), message)

    data = doc.data
    if not isinstance(data, dict):
        return None, [at((), f"expected a resource (a mapping with apiVersion, kind, metadata, spec), "
                             f"got {type(data).__name__}")]
    if data.get("apiVersion") != API_VERSION:
        got = data.get("apiVersion")
        return None, [at(("apiVersion",), f"apiVersion: expected {API_VERSION!r}, got {got!r}")]
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None, [at(("kind",), f"kind: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")]
    try:
        key: str | None = f"{kind}:{digest(data)}"
    except TypeError:  # a YAML value JSON cannot hold (a date): validate it, just do not remember it
        key = None
    if key is not None and (known := _models.get(key)) is not None:
        return known, []
    try:
        resource = model.model_validate(data)
    except ValidationError as exc:
        return None, [at(tuple(e["loc"]), _message(e, model)) for e in exc.errors()]
    if key is not None:
        if len(_models) >= _MODELS_MAX:
            _models.clear()
        _models[key] = resource
    return resource, []


_MODELS_MAX = 50_000
_models: dict[str, ResourceBase] = {}
"""Validated models by (kind, content): models are immutable, so a document unchanged since the last
revision yields the very same object. Render compares its inputs with `==`, which is instant for the
same object, so a one-line commit costs one model, not a thousand."""


def _message(error: Any, model: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    kind = error["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        allowed = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed here: {', '.join(allowed)}"
        return f"{_dotted(loc)}: unknown field {name!r}{hint}"
    if kind == "missing":
        return f"{_dotted(loc)}: required field is missing"
    if kind == "literal_error" and loc == ("kind",):
        return f"kind: {msg}"
    return f"{_dotted(loc)}: {msg}" if loc else msg


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The field names (as written in YAML) of the model found at `loc` inside `model`."""
    current: Any = model
    for part in loc:
        current = _optional(current)
        origin = getattr(current, "__origin__", None)
        if origin in (list, tuple, dict):
            current = current.__args__[-1]  # list element or dict value
        elif isinstance(current, type) and issubclass(current, BaseModel):
            info = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
            if info is None:
                return []
            current = info.annotation
        else:
            return []
    current = _optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _optional(annotation: Any) -> Any:
    """`X | None` -> X (when X is the only model in the union)."""
    if getattr(annotation, "__origin__", None) in (list, tuple, dict):
        return annotation
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
