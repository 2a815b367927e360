"""Load intent YAML from a tree of files and validate it, reporting every error as `path:line: message`.

All errors of a revision are reported at once; an Intent is produced only when there are none, so an
invalid commit can never reach render. "At once" includes the errors a schema error would hide: the
cross-resource checks also see a *partial* resource, the document minus the parts that failed, and
report what they find in it except where the removal itself may be the cause.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from mesh.intent import API_VERSION, Intent, ResourceBase, is_intent_file
from mesh.validate import Loc
from mesh.xds.snapshot import digest
from reconciler.kinds import KINDS, VALIDATORS


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
    return {p: b for p, b in files.items() if is_intent_file(p)}


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
    checked: list[tuple[_Doc, ResourceBase | _Partial]] = []
    """What the cross-resource checks see: the valid resources and the partial ones, in file order."""
    for doc in docs:
        res, errs, partial = _to_resource(doc)
        problems += errs
        if res is not None:
            resources.append(res)
            origin.append(doc)
            checked.append((doc, res))
        elif partial is not None:
            checked.append((doc, partial))

    found = _cross_check(checked)
    if any(isinstance(x, _Partial) and x.coarse is not None for _, x in checked):
        coarser = [(doc, x.coarse if isinstance(x, _Partial) and x.coarse is not None else x) for doc, x in checked]
        confirmed = set(_cross_check(coarser))
        found = [f for f in found if f in confirmed]
    problems += [p for p, warning in found if not warning]
    warnings = [Problem(p.path, p.line, f"warning: {p.message}") for p, warning in found if warning]
    if problems:
        return Loaded(intent=None, resources=resources, problems=sorted(set(problems)), warnings=sorted(warnings),
                      origins=origin)
    return Loaded(intent=Intent.from_resources(resources), resources=resources, warnings=sorted(warnings),
                  origins=origin)


def _cross_check(checked: list[tuple[_Doc, ResourceBase | _Partial]]) -> list[tuple[Problem, bool]]:
    """The cross-resource findings at the document's lines, each with whether it is a warning; those of a
    partial resource that its removals may have caused are left out."""
    resources = [x.resource if isinstance(x, _Partial) else x for _, x in checked]
    out: list[tuple[Problem, bool]] = []
    for f in (f for check in VALIDATORS for f in check(resources)):
        if f.index < 0:
            out.append((Problem(".", 0, f.message), f.warning))
            continue
        doc, x = checked[f.index]
        loc = x.original(f.loc) if isinstance(x, _Partial) else f.loc
        if isinstance(x, _Partial) and x.touches(loc):
            continue
        message = f"{_dotted(loc)}: {f.message}" if loc else f.message
        out.append((Problem(doc.path, doc.line_of(loc), message), f.warning))
    return out


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


def _to_resource(doc: _Doc) -> tuple[ResourceBase | None, list[Problem], _Partial | None]:
    """The resource, or the schema errors and (when one can be built) a partial resource."""
    def at(loc: Loc, message: str) -> Problem:
        return Problem(doc.path, doc.line_of(loc), message)

    data = doc.data
    if not isinstance(data, dict):
        return None, [at((), f"expected a resource (a mapping with apiVersion, kind, metadata, spec), "
                             f"got {type(data).__name__}")], None
    if data.get("apiVersion") != API_VERSION:
        got = data.get("apiVersion")
        return None, [at(("apiVersion",), f"apiVersion: expected {API_VERSION!r}, got {got!r}")], None
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None, [at(("kind",), f"kind: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")], None
    try:
        key: str | None = f"{kind}:{digest(data)}"
    except TypeError:  # a YAML value JSON cannot hold (a date): validate it, just do not remember it
        key = None
    if key is not None and (known := _models.get(key)) is not None:
        return known, [], None
    try:
        resource = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        return None, [at(tuple(e["loc"]), _message(e, model)) for e in errors], _partial(model, data, errors)
    if key is not None:
        if len(_models) >= _MODELS_MAX:
            _models.clear()
        _models[key] = resource
    return resource, [], None


_MODELS_MAX = 50_000
_models: dict[str, ResourceBase] = {}
"""Validated models by (kind, content): models are immutable, so a document unchanged since the last
revision yields the very same object. Render compares its inputs with `==`, which is instant for the
same object, so a one-line commit costs one model, not a thousand."""


# --- partial resources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Partial:
    """What validated of an invalid document, so the cross-resource checks can still find its other errors.

    Its findings are in its own coordinates: `kept` maps each shortened list (by its location in the
    document) to the document indexes of the items left, so `original` can point back at the YAML."""

    resource: ResourceBase
    removed: frozenset[Loc]
    """Document locations taken out."""
    changed: frozenset[Loc]
    """Document locations whose meaning the removals changed (see `_changed`)."""
    kept: Mapping[Loc, tuple[int, ...]]
    coarse: _Partial | None = None
    """The same without every list item holding a changed part (a rule that lost its `match`), when that
    validates: a finding elsewhere that it does not confirm came from the item's new meaning (that rule
    now taken for the default one), not from what the user wrote."""

    def original(self, loc: Loc) -> Loc:
        """A location in the partial resource -> the same place in the document."""
        return _original_loc(loc, self.kept)

    def touches(self, loc: Loc) -> bool:
        """Whether a finding at `loc` (document coordinates) may be the removal's doing rather than the
        user's: it is at or inside a changed part (a reference to a removed version, a rule that lost its
        redirect and now seems to lack an answer), or it encloses one (a weight sum missing a weight)."""
        return any(loc[:len(c)] == c or c[:len(loc)] == loc for c in self.changed)


_PARTIAL_ROUNDS = 10
"""Removing a part can make its parent fail (an emptied list, a model left with nothing): each round goes
one level up at least, and intent nests less deep than this."""


def _partial(model: type[ResourceBase], data: dict[str, Any], errors: list[Any]) -> _Partial | None:
    """The document without the parts that failed, validated, with its coarser twin; None when that is
    no use: an identity field failed, or the failure reaches the document itself."""
    first = _targets(model, data, errors, kept={})
    fine = None if first is None else _settle(model, data, first)
    if fine is None:
        return None
    holders = {item for c in fine.changed - fine.removed if (item := _list_item(c)) is not None}
    coarse = _settle(model, data, fine.removed | holders) if holders else None
    return replace(fine, coarse=coarse)


def _list_item(loc: Loc) -> Loc | None:
    """The innermost list item at or above `loc` (`spec.http[0]` for `spec.http[0].match`), if any."""
    for n in range(len(loc), 0, -1):
        if type(loc[n - 1]) is int:
            return loc[:n]
    return None


def _settle(model: type[ResourceBase], data: dict[str, Any], removed: frozenset[Loc]) -> _Partial | None:
    """`data` without `removed`, and without whatever that leaves invalid, once it validates.

    A later round fails only where a removal left an enclosing part invalid (pydantic checks a model as a
    whole only once its fields passed): that says nothing about what the user wrote, so its errors are
    never reported (the caller reports the first round's), they only steer the next removal."""
    for _ in range(_PARTIAL_ROUNDS):
        pruned, kept, emptied = _prune(data, removed)
        try:
            resource = model.model_validate(pruned)
        except ValidationError as exc:
            more = _targets(model, pruned, exc.errors(), kept=kept)
            if more is None or more <= removed:  # no progress (a removed part cannot fail again)
                return None
            removed |= more
            continue
        return _Partial(resource=resource, removed=removed, kept=kept,
                        changed=_changed(model, removed=removed, emptied=emptied))
    return None


def _targets(model: type[BaseModel], pruned: Any, errors: list[Any], *, kept: Mapping[Loc, tuple[int, ...]]
             ) -> frozenset[Loc] | None:
    """The document locations to remove for these errors (of `pruned`), or None when one cannot be."""
    out: set[Loc] = set()
    for e in errors:
        loc = tuple(e["loc"])
        if _is_identity(_original_loc(loc, kept)):
            return None
        target = _removable(model, _original_loc(_present(pruned, loc), kept))
        if target is None:
            return None
        out.add(target)
    return frozenset(out)


def _changed(model: type[BaseModel], *, removed: frozenset[Loc], emptied: frozenset[Loc]) -> frozenset[Loc]:
    """Where the removals changed the meaning of what is left. An unknown key meant nothing: only its own
    place. A list item or map entry: itself. A field: the model holding it (a rule without its redirect
    seems to lack an answer). A container the removals left empty changes the one holding it (a rule
    whose match list went empty would match everything)."""
    out: set[Loc] = set()
    for loc in removed:
        container = _optional(_annotation_at(model, loc[:-1]))
        is_model = isinstance(container, type) and issubclass(container, BaseModel)
        if is_model and _field(container, loc[-1]) is None:
            out.add(loc)
            continue
        at = loc[:-1]
        if not is_model:  # a list item or a map entry
            if at not in emptied:
                out.add(loc)
                continue
            at = at[:-1]
        while at and at in emptied:
            at = at[:-1]
        out.add(at)
    return frozenset(out)


def _is_identity(loc: Loc) -> bool:
    """apiVersion, kind, metadata.name/namespace: what other resources refer to a resource by, so a
    partial without them would leave references dangling (or collide with another resource)."""
    if loc[:1] in (("apiVersion",), ("kind",)):
        return True
    return loc[:1] == ("metadata",) and (len(loc) == 1 or loc[1] in ("name", "namespace"))


def _removable(model: type[BaseModel], loc: Loc) -> Loc | None:
    """The smallest part at or above `loc` that may be left out: a list item, a map entry, an unknown or
    optional field. None when only the whole document would do."""
    for n in range(len(loc), 0, -1):
        container = _optional(_annotation_at(model, loc[:n - 1]))
        if getattr(container, "__origin__", None) in (list, tuple, dict):
            return loc[:n]
        if isinstance(container, type) and issubclass(container, BaseModel):
            info = _field(container, loc[n - 1])
            if info is None or not info.is_required():
                return loc[:n]
    return None


def _present(data: Any, loc: Loc) -> Loc:
    """The longest start of `loc` that is in `data` (a missing field -> its parent; pydantic's markers
    such as `[key]` are not data)."""
    node = data
    for n, part in enumerate(loc):
        in_map = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and type(part) is int and 0 <= part < len(node)
        if not (in_map or in_list):
            return loc[:n]
        node = node[part]
    return loc


def _prune(
    data: Any, removed: frozenset[Loc]
) -> tuple[Any, dict[Loc, tuple[int, ...]], frozenset[Loc]]:
    """A copy of `data` without the `removed` locations; the kept document indexes of each list that lost
    items; and the mappings and lists the removals left empty (all keyed by document location)."""
    kept: dict[Loc, tuple[int, ...]] = {}
    emptied: set[Loc] = set()

    def walk(node: Any, loc: Loc) -> Any:
        out: Any = node
        if isinstance(node, dict):
            out = {k: walk(v, (*loc, k)) for k, v in node.items() if (*loc, k) not in removed}
        elif isinstance(node, list):
            keep = tuple(i for i in range(len(node)) if (*loc, i) not in removed)
            if len(keep) < len(node):
                kept[loc] = keep
            out = [walk(node[i], (*loc, i)) for i in keep]
        if isinstance(node, dict | list) and node and not out:
            emptied.add(loc)
        return out

    return walk(data, ()), kept, frozenset(emptied)


def _original_loc(loc: Loc, kept: Mapping[Loc, tuple[int, ...]]) -> Loc:
    """A location in pruned data -> the same place in the document it was pruned from."""
    out: list[str | int] = []
    for part in loc:
        index = kept.get(tuple(out))
        if index is not None and type(part) is int and 0 <= part < len(index):
            part = index[part]
        out.append(part)
    return tuple(out)


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
    current = _optional(_annotation_at(model, loc))
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _annotation_at(model: type[BaseModel], loc: Loc) -> Any:
    """The type found at `loc` inside `model`; None once `loc` leaves the schema (an unknown field)."""
    current: Any = model
    for part in loc:
        current = _optional(current)
        if getattr(current, "__origin__", None) in (list, tuple, dict):
            current = current.__args__[-1]  # list element or dict value
        elif isinstance(current, type) and issubclass(current, BaseModel):
            info = _field(current, part)
            if info is None:
                return None
            current = info.annotation
        else:
            return None
    return current


def _field(model: type[BaseModel], name: str | int) -> FieldInfo | None:
    """The field a YAML key names: its alias, its Python name, or one of its alias choices."""
    for n, f in model.model_fields.items():
        names: set[object] = {n, f.alias}
        if isinstance(f.validation_alias, str):
            names.add(f.validation_alias)
        elif isinstance(f.validation_alias, AliasChoices):
            names.update(c for c in f.validation_alias.choices if isinstance(c, str))
        if name in names:
            return f
    return None


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
