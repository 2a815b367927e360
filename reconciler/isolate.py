"""Loading in a worker process, so that nothing a commit holds can freeze or bloat the process serving the mesh.

`load_isolated(files)` hands the files to a long-lived worker (`python -c 'from reconciler.isolate import
serve; serve()'`) that runs `reconciler.load.load` under an address-space limit (RLIMIT_AS, `memory` MiB)
and a CPU-time limit, and is killed when a load takes more than `timeout` seconds of wall time. A worker
that is killed, dies or runs out of memory is replaced (the next one starts at once, so it is warm by
the next commit), and the revision gets one Problem: `.:0: loading took more than Ns`, `.:0: loading used
more than N MiB`. The limits of `reconciler.load` refuse hostile input with located errors long before
these bounds; the bounds are what holds if that ever fails (a parser bug, a limit set too high).

The worker stays warm: its parse and model caches make an unchanged file cost nothing, as they would
in-process. And the result keeps object identity across revisions, which render's caches depend on (an
unchanged resource must be the very same object, or a one-line commit re-renders the mesh): the worker
sends each model and document once, then only its key while the caller still holds it, and the caller
keeps exactly what the last reply named. Both sides track the same set, so a reply is a few bytes per
unchanged resource; a model the caller already holds under the same key is reused even from a new worker.

Blocking and thread-safe (one load at a time; others wait for it): from asyncio, call it through
`asyncio.to_thread(load_isolated, files)`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh.intent import Intent, ResourceBase, is_intent_file
from reconciler import load as loader
from reconciler.load import Loaded, Problem, _Doc, refusals

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
"""Wall time for one load. The largest valid revision the limits admit (20,000 documents: 10,000 services
and their Routes, 4.9 MB) loads cold in 6-14 s on two busy cores, 0.5 s warm; 16 files of a megabyte of
unknown keys each take about as long to refuse."""
DEFAULT_MEMORY_MIB = 2048
"""Address space of the worker. That largest revision peaks at about 400 MiB."""

_HEADER = struct.Struct(">Q")
_MAX_REPLY_BYTES = 1 << 30
_ROOT = str(Path(__file__).resolve().parent.parent)


# --- the protocol (both sides import this module) -----------------------------------------------------


@dataclass(frozen=True)
class _Request:
    files: dict[str, bytes]
    refused: dict[str, str]
    cpu_seconds: int
    fresh: bool
    """Send everything: the caller holds nothing the worker may refer to."""


@dataclass
class _Reply:
    problems: list[Problem]
    warnings: list[Problem]
    hidden: int
    ok: bool
    resources: list[tuple[str, ResourceBase | None]] = field(default_factory=list)
    """(model key, the model, or None when the caller holds it under that key); key "" is never held."""
    origins: list[tuple[bytes, str, int, tuple[Any, dict[Any, int]] | None]] = field(default_factory=list)
    """(document key, path, line, (data, line map), or None when the caller holds that document)."""
    fatal: bool = False
    """The worker exits after this reply (it ran out of memory: whatever it holds now is suspect)."""


# --- the caller's side ---------------------------------------------------------------------------------


def load_isolated(files: Mapping[str, bytes], *, timeout: float = DEFAULT_TIMEOUT_S,
                  memory: int = DEFAULT_MEMORY_MIB) -> Loaded:
    """`reconciler.load.load(files)`, run in the warm worker within `timeout` seconds and `memory` MiB.

    Never raises for anything the files hold: a worker that times out, dies or runs out of memory gives a
    Loaded with that one Problem, and is replaced."""
    with _lock:
        return _loader.load(files, timeout=timeout, memory=memory)


def warm(*, memory: int = DEFAULT_MEMORY_MIB) -> None:
    """Start the worker now, so the first revision does not wait for its imports (about half a second)."""
    with _lock:
        _loader.process(memory)


def shutdown() -> None:
    """Stop the worker (also done at exit)."""
    with _lock:
        _loader.stop()


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


class _OutOfStep(Exception):
    """The reply names something the caller does not hold (cannot happen while both sides keep step)."""


class _Process:
    """One worker process and the two ends of its pipes (non-blocking: every wait has a deadline)."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from reconciler.isolate import serve; serve({int(memory)})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w = self.proc.stdin.fileno()
        self.r = self.proc.stdout.fileno()
        os.set_blocking(self.w, False)
        os.set_blocking(self.r, False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def death(self) -> str:
        """How it ended, once its output closed."""
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "its output closed"
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit status {code}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # unkillable (stopped under a debugger): left to init
            log.warning("the loader process %d did not exit after SIGKILL", self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class _Loader:
    """The worker process (replaced when it fails) and what the caller holds of its replies: the models
    and documents of the last reply, by key, exactly as the worker tracks them."""

    def __init__(self) -> None:
        self._process: _Process | None = None
        self._models: dict[str, ResourceBase] = {}
        self._docs: dict[bytes, tuple[Any, dict[Any, int]]] = {}
        self._before: dict[str, ResourceBase] = {}
        """The models of the reply before: only to keep identity across one revision that lacked them (an
        invalid one), never referred to by the worker."""

    def process(self, memory: int) -> _Process:
        if self._process is not None and self._process.memory != memory:
            self.stop()
        elif self._process is not None and not self._process.alive():
            self._replace("is gone", memory)
        if self._process is None:
            self._process = _Process(memory)
        return self._process

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def _replace(self, why: str, memory: int | None = None) -> None:
        """Stop the worker; the next starts at once, so it is warm by the next revision. It has sent
        nothing yet, so it sends everything; the caller's objects under the same keys are kept."""
        log.warning("the loader process %s; starting a new one", why)
        if self._process is not None:
            memory = self._process.memory if memory is None else memory
            self._process.stop()
            self._process = None
        if memory is None:
            return
        try:
            self._process = _Process(memory)
        except OSError as exc:
            log.error("cannot start the loader process: %s", exc)

    def load(self, files: Mapping[str, bytes], *, timeout: float, memory: int) -> Loaded:
        try:
            process = self.process(memory)
        except OSError as exc:
            return _refused(f"cannot start the loader process: {exc}")
        request = _Request(
            # Only intent is read; the other names are still checked (a `sub/../x` is refused whatever it is).
            files={p: (b if isinstance(p, str) and is_intent_file(p) else b"") for p, b in files.items()},
            refused=refusals(files), cpu_seconds=int(timeout) + 1, fresh=not self._models and not self._docs)
        deadline = time.monotonic() + timeout
        try:
            try:
                return self._ask(process, request, deadline=deadline, memory=memory)
            except _Died:  # it may have died of something else (killed while idle): once more, on a new one
                self._replace(f"died ({process.death()})", memory)
                if self._process is None:
                    raise
                process = self._process
                return self._ask(process, replace(request, fresh=True), deadline=deadline, memory=memory)
        except _Timeout:
            self._replace(f"took more than {timeout:g}s", memory)
            return _refused(f"loading took more than {timeout:g}s: the revision is refused")
        except _Died:
            how = process.death()
            self._replace(f"died ({how})", memory)
            if how == "SIGXCPU":
                return _refused(f"loading took more than {timeout:g}s of CPU: the revision is refused")
            return _refused(f"loading used more than {memory} MiB or crashed (the loader process died: {how}):"
                            " the revision is refused")
        except Exception as exc:  # a reply that does not unpickle, a pipe error: the worker is suspect
            self._replace(f"failed ({type(exc).__name__}: {exc})", memory)
            return _refused(f"loading failed: {type(exc).__name__}: {exc}")

    def _ask(self, process: _Process, request: _Request, *, deadline: float, memory: int) -> Loaded:
        for attempt in (request, replace(request, fresh=True)):
            reply = self._exchange(process, attempt, deadline)
            if reply.fatal:  # nothing of it to keep, and the worker is exiting
                self._replace(f"used more than {memory} MiB", memory)
                return Loaded(intent=None, problems=reply.problems)
            try:
                return self._rebuild(reply)
            except _OutOfStep:
                log.warning("the loader process referred to a model this process does not hold; asking again")
                self._models, self._docs = {}, {}
        raise _OutOfStep

    @staticmethod
    def _exchange(process: _Process, request: _Request, deadline: float) -> _Reply:
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        _send(process.w, _HEADER.pack(len(payload)) + payload, deadline)
        reply = pickle.loads(_receive(process.r, deadline))
        if not isinstance(reply, _Reply):
            raise _Died
        return reply

    def _rebuild(self, reply: _Reply) -> Loaded:
        """The Loaded the worker built, with the caller's own objects for everything it already holds."""
        models: dict[str, ResourceBase] = {}
        docs: dict[bytes, tuple[Any, dict[Any, int]]] = {}
        resources: list[ResourceBase] = []
        origins: list[_Doc] = []
        for (key, sent), (doc_key, path, line, payload) in zip(reply.resources, reply.origins, strict=True):
            if sent is None:
                if key not in self._models:
                    raise _OutOfStep
                model = self._models[key]
            else:
                model = (self._models.get(key) or self._before.get(key) or sent) if key else sent
            if payload is None:
                if doc_key not in self._docs:
                    raise _OutOfStep
                payload = self._docs[doc_key]
            if key:
                models[key] = model
            docs[doc_key] = payload
            resources.append(model)
            data, lines = payload
            origins.append(_Doc(path=path, line=line, data=data, lines=lines, key=doc_key, model_key=key))
        self._before, self._models, self._docs = self._models, models, docs
        intent: Intent | None = None
        problems = reply.problems
        if reply.ok:
            try:
                intent = Intent.from_resources(resources)
            except Exception as exc:
                problems = [Problem(".", 0, f"cannot assemble the intent: {type(exc).__name__}: {exc}")]
        return Loaded(intent=intent, resources=resources, problems=problems, warnings=reply.warnings,
                      origins=origins, hidden=reply.hidden)


_lock = threading.Lock()
_loader = _Loader()
atexit.register(shutdown)


def _refused(message: str) -> Loaded:
    return Loaded(intent=None, problems=[Problem(".", 0, message)])


def _send(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        _, ready, _ = select.select([], [fd], [], remaining)
        if not ready:
            continue
        try:
            view = view[os.write(fd, view[: 1 << 20]):]
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            raise _Died from None


def _receive(fd: int, deadline: float) -> bytes:
    header = _read_exactly(fd, _HEADER.size, deadline)
    (size,) = _HEADER.unpack(header)
    if size > _MAX_REPLY_BYTES:
        raise _Died
    return _read_exactly(fd, size, deadline)


def _read_exactly(fd: int, size: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, min(size - got, 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise _Died
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- the worker's side ---------------------------------------------------------------------------------


def serve(memory: int) -> None:
    """The worker: read requests on stdin, answer on stdout, until stdin closes. The address-space limit
    counts everything mapped, the interpreter and the loader's imports included."""
    limit = memory << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump core: nobody wants a 2 GiB core file
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, who stops this process itself
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies

    sent_models: set[str] = set()
    sent_docs: set[bytes] = set()
    while True:
        header = _read_blocking(requests, _HEADER.size)
        if header is None:
            return
        body = _read_blocking(requests, _HEADER.unpack(header)[0])
        if body is None:
            return
        request = pickle.loads(body)
        _limit_cpu(request.cpu_seconds)
        if request.fresh:
            sent_models, sent_docs = set(), set()
        before = loader.memory_errors()
        try:
            loaded = loader.load(request.files if not request.refused
                                 else loader.Tree(request.files, refused=request.refused))
            if loader.memory_errors() != before:
                reply = _Reply(problems=[Problem(".", 0, f"loading used more than {memory} MiB: the revision is "
                                                 "refused")], warnings=[], hidden=0, ok=False, fatal=True)
            else:
                reply = _reply(loaded, sent_models=sent_models, sent_docs=sent_docs)
            payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            reply = _Reply(problems=[Problem(".", 0, f"loading used more than {memory} MiB: the revision is refused")],
                           warnings=[], hidden=0, ok=False, fatal=True)
            payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        _write_blocking(replies, _HEADER.pack(len(payload)) + payload)
        if reply.fatal:
            return
        sent_models = {key for key, _ in reply.resources if key}
        sent_docs = {origin[0] for origin in reply.origins}


def _reply(loaded: Loaded, *, sent_models: set[str], sent_docs: set[bytes]) -> _Reply:
    resources: list[tuple[str, ResourceBase | None]] = []
    origins: list[tuple[bytes, str, int, tuple[Any, dict[Any, int]] | None]] = []
    for model, doc in zip(loaded.resources, loaded.origins, strict=True):
        key = doc.model_key or ""
        resources.append((key, None if key and key in sent_models else model))
        held = bool(doc.key) and doc.key in sent_docs
        origins.append((doc.key, doc.path, doc.line, None if held else (doc.data, doc.lines)))
    return _Reply(problems=loaded.problems, warnings=loaded.warnings, hidden=loaded.hidden,
                  ok=loaded.intent is not None, resources=resources, origins=origins)


def _limit_cpu(seconds: int) -> None:
    """This request may use `seconds` more of CPU (SIGXCPU then): the bound that holds even when the caller
    is gone and cannot kill us."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    now = int(used.ru_utime + used.ru_stime) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = now + seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _read_blocking(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.read(fd, min(size - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_blocking(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
