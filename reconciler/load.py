"""Load intent YAML from a tree of files and validate it, reporting every error as `path:line: message`.

All errors of a revision are reported at once; an Intent is produced only when there are none, so an
invalid commit can never reach render. "At once" includes the errors a schema error would hide: the
cross-resource checks also see a *partial* resource, the document minus the parts that failed, and
report what they find in it except where the removal itself may be the cause.

Whoever can commit can write anything, so what a revision may hold is bounded, and every bound is
checked before the Python objects it protects are built (sizes before reading or parsing; nesting and
aliases on the YAML event stream, before composing). A revision over a limit is invalid with a located
error; its other files are still checked. `load` never raises: whatever goes wrong in a file or a
document (a parser bug, RecursionError, MemoryError) becomes that file's or document's error.

| limit | value | refused as |
|---|---|---|
| one intent file | 1 MiB (`MAX_FILE_BYTES`) | `path:0: file is N bytes, more than the 1 MiB limit ...` (unread) |
| all intent files | 16 MiB (`MAX_TOTAL_BYTES`) | `path:0: not read: ...` for each file past it, in path order |
| intent files | 20,000 (`MAX_FILES`) | `.:0: ...` (no file read) |
| tree entries (files, directories) | 100,000 (`MAX_ENTRIES`) | `.:0: ...` (the walk stops) |
| directory depth | 32 (`MAX_DIRECTORY_DEPTH`) | `dir:0: ...` (not entered) |
| one Git tree object (a listing) | 16 MiB | `dir:0: ...` (not inflated) |
| documents in one file | 10,000 (`MAX_FILE_DOCUMENTS`) | `path:line: ...` at the first document too many |
| documents in the revision | 20,000 (`MAX_DOCUMENTS`) | the same, in the file where the count is passed |
| nesting (mappings and lists) | 64 levels (`MAX_DEPTH`), aliases included | `path:line: ...` where it is passed |
| YAML nodes, aliases expanded | 1,000,000 per revision (`MAX_NODES`) | `path:line: ...` where it is passed |
| alias uses (`*name`) | 100 per revision (`MAX_ALIASES`) | `path:line: ...` at the first alias too many |
| entries of one mapping or list | 10,000 (`MAX_ENTRIES_PER_COLLECTION`) | `path:line: ...` at the first one too many |
| errors listed | 100 (`MAX_PROBLEMS`) | the first in path order, then `.:0: N more error(s) not shown` |
| one error message | 1,000 characters | cut, `... (cut)` |

Aliases are allowed, bounded rather than refused: anchors and merge keys (`<<: *defaults`) are how
hand-written YAML avoids repeating itself, and 100 uses are plenty for that. Their cost is counted as
if expanded (an alias adds the whole size and depth of its anchor), so a "billion laughs" bomb of a
few hundred bytes is refused at the alias where its expanded size passes the node limit, without ever
being expanded; an alias inside its own anchor (a cycle) is refused. Tree entries that a checkout
would not reproduce as the plain file it claims to be (a `..` or absolute path, a backslash or NUL in
a name, a name that is not UTF-8, a symbolic link, a submodule, a FIFO or device in a work tree) are
refused as `path:0: ...` by whoever reads the tree (`read_worktree` here, `read_tree` in the Git
source) and travel to `load` in `Tree.refused`; hidden paths (`.github/`) are not intent and not
checked. Files that are not intent are left out of a tree past the same size limits, unread.

Parsing uses libyaml (PyYAML's C binding, in every PyYAML wheel; about 8x faster) when present, which also
bounds flow nesting itself. Without it the pure-Python parser gives the same results, but its scanner is
quadratic in flow nesting: only the process bounds of `reconciler.isolate` then hold against that.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Mapping
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

MiB = 1 << 20
MAX_FILE_BYTES = 1 * MiB
MAX_TOTAL_BYTES = 16 * MiB
MAX_FILES = 20_000
MAX_ENTRIES = 100_000
MAX_DIRECTORY_DEPTH = 32
MAX_FILE_DOCUMENTS = 10_000
MAX_DOCUMENTS = 20_000
MAX_DEPTH = 64
MAX_NODES = 1_000_000
MAX_ALIASES = 100
MAX_ENTRIES_PER_COLLECTION = 10_000
"""Keys of one mapping, or items of one list. Intent has no mapping that wide (a big mesh spreads over
many resources), and counting it stops 20 MB of one-line keys at the first 10,000 of each file instead of
parsing all of them before the schema refuses them."""
MAX_PROBLEMS = 100
_KEEP = 10 * MAX_PROBLEMS
_MESSAGE_MAX = 1000
"""Problems kept in full while loading (the rest only counted); the first MAX_PROBLEMS of them in path
order are reported."""


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class Tree(dict[str, bytes]):
    """A revision's files (posix path -> content) and the entries refused while reading it (path -> why).

    What `read_worktree` and `Pygit2Source.read_tree` return: a dict to every caller that expects one, and
    `load` reports each refusal as `path:0: why`, which makes the revision invalid. Pickles with both."""

    refused: dict[str, str]

    def __init__(self, files: Mapping[str, bytes] | None = None, *, refused: Mapping[str, str] | None = None) -> None:
        super().__init__(files or {})
        self.refused = dict(refused or {})


def refusals(files: Mapping[str, bytes]) -> dict[str, str]:
    """The refused entries a mapping of files carries (a `Tree`), or none (a plain dict)."""
    refused = getattr(files, "refused", None)
    if not isinstance(refused, Mapping):
        return {}
    return {str(k): str(v) for k, v in refused.items()}


def path_problem(path: str) -> str | None:
    """Why a tree path is refused (it could not be checked out as the file it names), or None."""
    if "\0" in path:
        return "a NUL byte in the name"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not UTF-8"
    if "\\" in path:
        return "a backslash in the name (a Windows path separator, or an attempt to look like one): use /"
    if path.startswith("/"):
        return "an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "a '..' in the path (it would leave its directory)"
    if any(p in ("", ".") for p in parts):
        return "an empty or '.' part in the path"
    return None


def printable(path: str) -> str:
    """A path with any undecodable bytes (surrogate escapes) shown as \\xNN, so it can be printed."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class _Doc:
    path: str
    line: int
    data: Any
    lines: dict[Loc, int]
    """Line of each location, counted from the document's first line (0): an unchanged document that
    moved keeps its map, so a worker process need not send it again (reconciler.isolate)."""
    key: bytes = b""
    """The document's text (with what precedes it since the previous one), hashed with its path."""
    model_key: str | None = field(default=None, compare=False)
    """Memo: `kind:digest` of `data` once computed; "" when data cannot be digested (a date)."""

    def line_of(self, loc: Loc) -> int:
        """The line of the deepest part of `loc` present in the YAML (a missing field -> its parent)."""
        for n in range(len(loc), -1, -1):
            if (hit := self.lines.get(tuple(loc[:n]))) is not None:
                return self.line + hit
        return self.line


@dataclass
class Loaded:
    intent: Intent | None
    resources: list[ResourceBase] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    """Sorted; at most MAX_PROBLEMS, then `.:0: N more error(s) not shown` when there were more."""
    warnings: list[Problem] = field(default_factory=list)
    """Reported (`path:line: warning: ...`) but they do not make the revision invalid."""
    origins: list[_Doc] = field(default_factory=list, repr=False)
    """Where each of `resources` was written (same order)."""
    hidden: int = 0
    """Errors counted but not listed in `problems` (the cap)."""

    def where(self, resource: ResourceBase, loc: Loc = ()) -> tuple[str, int]:
        """File and line of a field of a loaded resource."""
        for r, doc in zip(self.resources, self.origins, strict=True):
            if r is resource:
                return doc.path, doc.line_of(loc)
        return ".", 0

    @property
    def ok(self) -> bool:
        return self.intent is not None and not self.problems

    @property
    def error_count(self) -> int:
        """Every error found, listed or not."""
        return len(self.problems) - (1 if self.hidden else 0) + self.hidden


def intent_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The YAML files that hold intent: *.yaml / *.yml outside hidden directories."""
    return {p: b for p, b in files.items() if is_intent_file(p)}


# --- reading a work tree --------------------------------------------------------------------------------


def read_worktree(root: Path) -> Tree:
    """Intent files from a directory on disk (for `validate` as a pre-commit check), read as a commit's.

    Hidden directories are not entered. A symbolic link is never followed (it could point anywhere on
    the machine, and a commit would hold the link, not the file): it is refused, and so are FIFOs and
    devices named as intent, paths a commit could not hold, and files past the size limits (unread)."""
    out = Tree()
    total = entries = 0
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            with os.scandir(directory) as listing:
                items = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            out.refused[printable(prefix.rstrip("/") or ".")] = f"cannot list this directory: {exc.strerror or exc}"
            continue
        for item in items:
            entries += 1
            if entries > MAX_ENTRIES:
                out.refused["."] = f"more than {MAX_ENTRIES} files and directories: not read further"
                return out
            if item.name.startswith("."):
                continue
            rel = prefix + item.name
            why = _worktree_entry(item, rel, depth)
            if why is not None:
                out.refused[printable(rel)] = why
                continue
            if item.is_dir(follow_symlinks=False):
                stack.append((Path(item.path), f"{rel}/", depth + 1))
                continue
            if not is_intent_file(rel) or not item.is_file(follow_symlinks=False):
                continue
            data, why = _read_regular(item.path, budget=MAX_TOTAL_BYTES - total)
            if data is None:
                out.refused[rel] = why
            else:
                out[rel] = data
                total += len(data)
    return out


def _worktree_entry(item: os.DirEntry[str], rel: str, depth: int) -> str | None:
    """Why a work-tree entry is refused, before anything is opened."""
    if (why := path_problem(rel)) is not None:
        return why
    if item.is_symlink():
        try:
            target = os.readlink(item.path)
        except OSError:
            target = "?"
        return (f"a symbolic link (to {printable(target)!r}): not followed; intent must be plain files (a commit "
                "holds the link, not what it points at)")
    if item.is_dir(follow_symlinks=False):
        return f"directories nested more than {MAX_DIRECTORY_DEPTH} deep" if depth + 1 > MAX_DIRECTORY_DEPTH else None
    if is_intent_file(rel) and not item.is_file(follow_symlinks=False):
        return "not a regular file (a FIFO, socket or device): not read"
    return None


def _read_regular(path: str, *, budget: int) -> tuple[bytes | None, str]:
    """The content of a regular file within the limits, or None and why; never blocks on a FIFO that
    replaced the file since it was listed, never follows a link that did."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file (a FIFO, socket or device): not read"
        if info.st_size > MAX_FILE_BYTES:
            return None, _too_big(info.st_size)
        if info.st_size > budget:
            return None, _past_total()
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:  # it grew since fstat
                return None, _too_big(size)
        data = b"".join(chunks)
        return (data, "") if size <= budget else (None, _past_total())
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    finally:
        os.close(fd)


def _too_big(size: int) -> str:
    return f"file is {size} bytes, more than the {MAX_FILE_BYTES // MiB} MiB limit for one intent file: split it"


def _past_total() -> str:
    return f"not read: the revision's intent files total more than {MAX_TOTAL_BYTES // MiB} MiB"


# --- loading --------------------------------------------------------------------------------------------


def load(files: Mapping[str, bytes]) -> Loaded:
    """Every error of the revision at once, or its Intent. Never raises: a failure anywhere becomes a
    Problem, located as closely as what failed allows (`.:0:` for the revision as a whole)."""
    with _loading:
        try:
            return _load(files)
        except Exception as exc:  # a check's bug, MemoryError: the revision is refused, the caller lives on
            _note(exc)
            return Loaded(intent=None, problems=[Problem(".", 0, f"cannot load this revision: {_describe(exc)}")])
        finally:
            _files.turn()
            _models.turn()


_loading = threading.Lock()
"""One load at a time: the caches below are shared."""


def _load(files: Mapping[str, bytes]) -> Loaded:
    report = _Report()
    for entry, reason in sorted(refusals(files).items()):
        report.add(Problem(entry, 0, reason))
    paths: list[str] = []
    for path in files:
        if not isinstance(path, str):
            report.add(Problem(".", 0, f"a file name that is not text: {_short(path)}"))
        elif (why := path_problem(path)) is not None:
            report.add(Problem(printable(path), 0, why))
        elif is_intent_file(path):
            paths.append(path)
    docs: list[_Doc] = []
    if len(paths) > MAX_FILES:
        report.add(Problem(".", 0, f"{len(paths)} intent files, more than the limit of {MAX_FILES}: none was read"))
        paths = []
    budget = _Usage(documents=MAX_DOCUMENTS, nodes=MAX_NODES, aliases=MAX_ALIASES)
    total = 0
    for path in sorted(paths):
        raw = files[path]
        if not isinstance(raw, bytes):
            report.add(Problem(path, 0, f"content is a {type(raw).__name__}, not bytes"))
            continue
        if len(raw) > MAX_FILE_BYTES:
            report.add(Problem(path, 0, _too_big(len(raw))))
            continue
        if total + len(raw) > MAX_TOTAL_BYTES:
            report.add(Problem(path, 0, _past_total()))
            continue
        total += len(raw)
        parsed = _parse_yaml(path, raw, budget)
        if parsed.cacheable:  # a refused file builds nothing, so it leaves the others their budget
            budget = budget.minus(parsed.usage)
        docs += parsed.docs
        report.extend(parsed.problems, more=parsed.more)

    resources: list[ResourceBase] = []
    origin: list[_Doc] = []
    checked: list[tuple[_Doc, ResourceBase | _Partial]] = []
    """What the cross-resource checks see: the valid resources and the partial ones, in file order."""
    for doc in docs:
        res, errs, more, partial = _to_resource_guarded(doc, room=report.room())
        report.extend(errs, more=more)
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
    report.extend(p for p, warning in found if not warning)
    cautions = _Report()
    cautions.extend(Problem(p.path, p.line, f"warning: {p.message}") for p, warning in found if warning)
    warnings, _ = cautions.listed("warning: {} more warning(s) not shown")
    if report.kept or report.more:
        problems, hidden = report.listed("{} more error(s) not shown")
        return Loaded(intent=None, resources=resources, problems=problems, warnings=warnings, origins=origin,
                      hidden=hidden)
    try:
        intent = Intent.from_resources(resources)
    except Exception as exc:
        _note(exc)
        return Loaded(intent=None, resources=resources, warnings=warnings, origins=origin,
                      problems=[Problem(".", 0, f"cannot assemble the intent: {_describe(exc)}")])
    return Loaded(intent=intent, resources=resources, warnings=warnings, origins=origin)


def _cross_check(checked: list[tuple[_Doc, ResourceBase | _Partial]]) -> list[tuple[Problem, bool]]:
    """The cross-resource findings at the document's lines, each with whether it is a warning; those of a
    partial resource that its removals may have caused are left out. A check that fails is reported as
    the revision's error rather than taking the caller down."""
    resources = [x.resource if isinstance(x, _Partial) else x for _, x in checked]
    out: list[tuple[Problem, bool]] = []
    for check in VALIDATORS:
        try:
            findings = list(check(resources))
        except Exception as exc:
            _note(exc)
            name = getattr(check, "__qualname__", repr(check))
            out.append((Problem(".", 0, f"the check {name} failed on this revision: {_describe(exc)}"), False))
            continue
        for f in findings:
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


class _Report:
    """Problems with a bounded list: the first _KEEP in full, the rest only counted, so a file of a
    million unknown keys costs a count, not a million messages (nor a status file of them)."""

    def __init__(self) -> None:
        self.kept: list[Problem] = []
        self.more = 0

    def room(self) -> int:
        return max(0, _KEEP - len(self.kept))

    def add(self, problem: Problem) -> None:
        if len(self.kept) >= _KEEP:
            self.more += 1
            return
        if len(problem.message) > _MESSAGE_MAX:  # a key of a megabyte is named, not repeated
            problem = replace(problem, message=f"{problem.message[:_MESSAGE_MAX]}... (cut)")
        self.kept.append(problem)

    def extend(self, problems: Iterable[Problem], *, more: int = 0) -> None:
        for p in problems:
            self.add(p)
        self.more += more

    def listed(self, summary: str) -> tuple[list[Problem], int]:
        """The first MAX_PROBLEMS in path order, then `.:0: <summary>` with how many more there were."""
        unique = sorted(set(self.kept))
        shown = unique[:MAX_PROBLEMS]
        hidden = len(unique) - len(shown) + self.more
        if hidden:
            shown.append(Problem(".", 0, summary.format(hidden)))
        return shown, hidden


_memory_errors = 0
"""MemoryErrors turned into Problems so far: a worker process (reconciler.isolate) reports its own
memory bound rather than a partial result when this moves."""


def memory_errors() -> int:
    return _memory_errors


def _note(exc: BaseException) -> None:
    global _memory_errors
    if isinstance(exc, MemoryError):
        _memory_errors += 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to read (RecursionError)"
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}" if text else type(exc).__name__


class _Cache:
    """A memo that keeps what the last two loads used: each revision is mostly the one before, and the
    memory held stays bounded by two revisions however many were loaded."""

    def __init__(self) -> None:
        self._data: dict[Any, Any] = {}
        self._now: set[Any] = set()
        self._before: set[Any] = set()

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._now.add(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._now.add(key)

    def turn(self) -> None:
        """After a load: forget what neither it nor the one before used, once that is much."""
        keep = self._now | self._before
        if len(self._data) > 2 * len(keep) + 64:
            self._data = {k: self._data[k] for k in keep if k in self._data}
        self._before, self._now = self._now, set()


# --- YAML with line numbers, within the limits -----------------------------------------------------------

try:
    from yaml import CSafeLoader as _YAMLLoader
except ImportError:  # PyYAML built without libyaml: the same results, several times slower
    from yaml import SafeLoader as _YAMLLoader  # type: ignore[assignment]


@dataclass(frozen=True)
class _Usage:
    """What a file costs (or, as a budget, what the revision has left)."""

    documents: int = 0
    nodes: int = 0
    aliases: int = 0

    def fits(self, budget: _Usage) -> bool:
        return (self.documents <= budget.documents and self.nodes <= budget.nodes
                and self.aliases <= budget.aliases)

    def minus(self, used: _Usage) -> _Usage:
        return _Usage(documents=self.documents - used.documents, nodes=self.nodes - used.nodes,
                      aliases=self.aliases - used.aliases)


@dataclass(frozen=True)
class _Parsed:
    docs: list[_Doc]
    problems: list[Problem]
    more: int = 0
    usage: _Usage = _Usage()
    cacheable: bool = True
    """False for a refusal that depends on what the revision's other files used."""


def _parse_yaml(path: str, raw: bytes, budget: _Usage) -> _Parsed:
    """Documents with their line maps; a file unchanged since the last revision is not parsed again
    (unless the revision's other files now leave it less than it used)."""
    key = (path, hashlib.sha256(raw).digest())
    hit: _Parsed | None = _files.get(key)
    if hit is not None and hit.usage.fits(budget):
        return hit
    try:
        parsed = _parse_uncached(path, raw, budget)
    except Exception as exc:
        _note(exc)
        return _Parsed([], [Problem(path, 0, f"cannot read this file: {_describe(exc)}")], cacheable=False)
    if parsed.cacheable:
        _files.put(key, parsed)
    return parsed


_files = _Cache()
"""_Parsed by (path, sha256 of the content)."""


def _parse_uncached(path: str, raw: bytes, budget: _Usage) -> _Parsed:
    nul = raw.find(b"\0")
    if nul >= 0:
        return _Parsed([], [Problem(path, raw.count(b"\n", 0, nul) + 1,
                                    f"a NUL byte (at byte {nul}): this is a binary file, not YAML text")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Parsed([], [Problem(path, raw.count(b"\n", 0, exc.start) + 1,
                                    f"not UTF-8 text ({exc.reason} at byte {exc.start})")])
    usage, refusal = _scan(path, text, budget)
    if refusal is not None:
        return _Parsed([], [refusal], usage=usage, cacheable=False)
    report = _Report()
    docs = _compose(path, text, report)
    return _Parsed(docs, report.kept, report.more, usage)


def _scan(path: str, text: str, budget: _Usage) -> tuple[_Usage, Problem | None]:
    """What composing `text` would build, counted on the event stream with every alias expanded (it adds
    its anchor's nodes and levels), and the first limit passed. Nothing is composed or constructed, so a
    bomb costs what its text costs. A syntax error ends the count: composing stops there too."""
    loader = _YAMLLoader(text)
    documents = nodes = aliases = 0
    anchors: dict[str, tuple[int, int]] = {}
    """Each finished anchor of this document: (its nodes, its levels), aliases inside expanded."""
    stack: list[list[Any]] = []
    """Each open mapping or list: [its nodes so far, the levels below it, its anchor, its direct children
    (events: a mapping's keys and values both count), the most children it may have]."""
    max_documents = min(MAX_FILE_DOCUMENTS, budget.documents)

    def refuse(event: Any, message: str) -> tuple[_Usage, Problem]:
        return (_Usage(documents=documents, nodes=nodes, aliases=aliases),
                Problem(path, event.start_mark.line + 1, message))

    get_event, scalar, node_budget = loader.get_event, yaml.ScalarEvent, budget.nodes
    try:
        while True:
            event: Any = get_event()
            kind = type(event)
            if kind is scalar:  # most events: the short way
                nodes += 1
                if nodes > node_budget:
                    return refuse(event, _too_many_nodes())
                if event.anchor is not None:
                    anchors[event.anchor] = (1, 0)
                if stack:
                    top = stack[-1]
                    top[0] += 1
                    top[3] += 1
                    if top[3] > top[4]:
                        return refuse(event, _too_wide(top))
                continue
            if kind is yaml.AliasEvent:
                aliases += 1
                if aliases > budget.aliases:
                    return refuse(event, f"more than {MAX_ALIASES} alias uses (*name) in the revision")
                name = event.anchor
                if any(frame[2] == name for frame in stack):
                    return refuse(event, f"alias *{name} inside its own anchor &{name} (a cycle)")
                size, levels = anchors.get(name, (1, 0))  # an undefined alias is the composer's error
                nodes += size
                if nodes > node_budget:
                    return refuse(event, _too_many_nodes(alias=True))
                if len(stack) + levels > MAX_DEPTH:
                    return refuse(event, f"alias *{name} nests more than {MAX_DEPTH} levels deep")
                if stack:
                    stack[-1][0] += size
                    stack[-1][1] = max(stack[-1][1], levels)
                    stack[-1][3] += 1
                    if stack[-1][3] > stack[-1][4]:
                        return refuse(event, _too_wide(stack[-1]))
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                nodes += 1
                if nodes > node_budget:
                    return refuse(event, _too_many_nodes())
                if len(stack) >= MAX_DEPTH:
                    return refuse(event, _too_deep())
                if stack:
                    stack[-1][3] += 1
                    if stack[-1][3] > stack[-1][4]:
                        return refuse(event, _too_wide(stack[-1]))
                wide = MAX_ENTRIES_PER_COLLECTION * (2 if kind is yaml.MappingStartEvent else 1)
                stack.append([1, 0, event.anchor, 0, wide])
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                size, below, anchor, _, _ = stack.pop()
                levels = below + 1
                if anchor is not None:
                    anchors[anchor] = (size, levels)
                if stack:
                    stack[-1][0] += size
                    stack[-1][1] = max(stack[-1][1], levels)
            elif kind is yaml.DocumentStartEvent:
                documents += 1
                anchors.clear()
                if documents > max_documents:
                    limit = (f"more than {MAX_FILE_DOCUMENTS} documents in one file" if documents > MAX_FILE_DOCUMENTS
                             else f"more than {MAX_DOCUMENTS} documents in the revision")
                    return refuse(event, limit)
            elif kind is yaml.StreamEndEvent:
                break
    except yaml.MarkedYAMLError as exc:  # composing stops at the same place and reports it
        if "nesting depth" in str(exc.problem) and exc.problem_mark is not None:  # libyaml's own bound (1000)
            return (_Usage(documents=documents, nodes=nodes, aliases=aliases),
                    Problem(path, exc.problem_mark.line + 1, _too_deep()))
    except yaml.YAMLError:
        pass
    finally:
        loader.dispose()
    return _Usage(documents=documents, nodes=nodes, aliases=aliases), None


def _too_wide(frame: list[Any]) -> str:
    what = "keys in one mapping" if frame[4] > MAX_ENTRIES_PER_COLLECTION else "items in one list"
    return f"more than {MAX_ENTRIES_PER_COLLECTION} {what}"


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep (mappings and lists)"


def _too_many_nodes(*, alias: bool = False) -> str:
    why = "this alias expands the revision past" if alias else "the revision holds more than"
    return f"{why} {MAX_NODES} YAML nodes (values, mappings and lists, aliases counted expanded)"


def _compose(path: str, text: str, report: _Report) -> list[_Doc]:
    """Each document's data and line map, once _scan found it within the limits. An error in one document
    (a value the constructor refuses) leaves the others; a syntax error ends the file."""
    loader = _YAMLLoader(text)
    docs: list[_Doc] = []
    start = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            try:
                doc = _document(loader, path=path, text=text, node=node, start=start, report=report)
            except yaml.MarkedYAMLError as exc:
                report.add(_yaml_problem(path, exc, text))
            except Exception as exc:
                _note(exc)
                report.add(Problem(path, node.start_mark.line + 1, f"cannot read this document: {_describe(exc)}"))
            else:
                if doc is not None:
                    docs.append(doc)
            start = node.end_mark.index
    except yaml.MarkedYAMLError as exc:
        report.add(_yaml_problem(path, exc, text))
    except yaml.YAMLError as exc:
        report.add(Problem(path, 1, f"YAML error: {exc}"))
    finally:
        loader.dispose()
    return docs


def _document(loader: Any, *, path: str, text: str, node: yaml.Node, start: int, report: _Report) -> _Doc | None:
    base = node.start_mark.line
    lines: dict[Loc, int] = {}
    _walk(node, (), lines, report, path, base)
    data = loader.construct_document(node)
    if data is None:
        return None
    source = f"{path}\0{text[start:node.end_mark.index]}".encode("utf-8", "surrogatepass")
    key = hashlib.blake2b(source, digest_size=16).digest()
    return _Doc(path=path, line=base + 1, data=data, lines=lines, key=key)


def _yaml_problem(path: str, exc: yaml.MarkedYAMLError, text: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
    if what.endswith("found character that cannot start any token") and mark is not None \
            and 0 <= mark.index < len(text):  # libyaml does not say which (most often a tab)
        what = what.replace("found character that", f"found character {text[mark.index]!r} that")
    return Problem(path, line, f"YAML syntax error: {what}")


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], report: _Report, path: str, base: int) -> None:
    """Lines (from the document's first, `base`) of every location; duplicate keys are reported. The
    nesting was bounded by _scan, so the recursion is too."""
    lines.setdefault(loc, node.start_mark.line - base)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else f"<a {key.id} as a key>"
            if name in seen:
                report.add(Problem(path, key.start_mark.line + 1, f"{_dotted((*loc, name))}: duplicate key {name!r}"))
            seen.add(name)
            lines[(*loc, name)] = key.start_mark.line - base
            _walk(value, (*loc, name), lines, report, path, base)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), lines, report, path, base)


# --- models ---------------------------------------------------------------------------------------------

_PARTIAL_MAX_ERRORS = 100
"""A document with more errors than this gets no partial resource: the pruning is there to find the
errors its schema errors would hide, and this many are enough to fix first."""


def _to_resource_guarded(doc: _Doc, *, room: int) -> tuple[ResourceBase | None, list[Problem], int, _Partial | None]:
    try:
        return _to_resource(doc, room=room)
    except Exception as exc:  # pydantic or a validator failing in a way it should not: this document's error
        _note(exc)
        return None, [Problem(doc.path, doc.line, f"cannot validate this document: {_describe(exc)}")], 0, None


def _to_resource(doc: _Doc, *, room: int = _KEEP) -> tuple[ResourceBase | None, list[Problem], int, _Partial | None]:
    """The resource, or the schema errors (the first `room` of them, and how many more) and, when one can
    be built, a partial resource."""
    def at(loc: Loc, message: str) -> Problem:
        return Problem(doc.path, doc.line_of(loc), message)

    data = doc.data
    if not isinstance(data, dict):
        return None, [at((), f"expected a resource (a mapping with apiVersion, kind, metadata, spec), "
                             f"got {type(data).__name__}")], 0, None
    if data.get("apiVersion") != API_VERSION:
        got = data.get("apiVersion")
        return None, [at(("apiVersion",), f"apiVersion: expected {API_VERSION!r}, got {_short(got)}")], 0, None
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None, [at(("kind",), f"kind: unknown kind {_short(kind)}; known kinds: {', '.join(KINDS)}")], 0, None
    if doc.model_key is None:
        try:
            doc.model_key = f"{kind}:{digest(data)}"
        except (TypeError, ValueError):  # a YAML value JSON cannot hold (a date): validate it, just do not remember it
            doc.model_key = ""
    key = doc.model_key
    if key and (known := _models.get(key)) is not None:
        return known, [], 0, None
    try:
        resource = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        shown = [at(tuple(e["loc"]), _message(e, model)) for e in errors[:room]]
        partial = None
        if len(errors) <= _PARTIAL_MAX_ERRORS:
            try:
                partial = _partial(model, data, errors)
            except Exception as failure:  # the errors stand; only what they might hide is not looked for
                _note(failure)
        return None, shown, len(errors) - len(shown), partial
    if key:
        _models.put(key, resource)
    return resource, [], 0, None


def _short(value: Any) -> str:
    """repr() of a value a document holds where a name was expected, cut to a readable length."""
    text = repr(value) if not isinstance(value, dict | list) else f"a {type(value).__name__}"
    return text if len(text) <= 80 else f"{text[:77]}..."


_models = _Cache()
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
