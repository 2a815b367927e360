"""The composition root of `lockgate up` (and the demo): the one place that picks implementations.

Git through pygit2, proxies and workloads as local processes; the reconcile loop itself knows only the
protocols (`Runtime`, the Git reader and writer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.cli.control import serve_commands
from reconciler.isolate import warm
from reconciler.loop import Reconciler, UpConfig, install_stop_signals
from reconciler.runtime.local.lock import lock_state_dir
from reconciler.runtime.local.netns import IsolatedNetwork
from reconciler.runtime.local.prometheus import prometheus_binary
from reconciler.runtime.local.runtime import LocalRuntime
from reconciler.source.base import DEFAULT_AUTHOR, GitError
from reconciler.source.git import Pygit2Source
from reconciler.source.signatures import SignaturePolicy, ssh_sign

log = logging.getLogger("lockgate")


async def local_reconciler(config: UpConfig, *, announced: bool = False) -> Reconciler:
    """A reconciler over a pygit2 source and the local runtime, for `up` and the demo. The caller holds
    the state dir's lock (`lock_state_dir`): two runs on one state dir would stop each other's Envoys."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if config.prometheus_url is None:
        prometheus_binary()  # PrometheusMissing names the install command before anything starts
    trust = None
    if config.verify_signatures is not None or config.verify_gpg_keyring is not None:
        trust = SignaturePolicy(allowed_signers=config.verify_signatures, keyring=config.verify_gpg_keyring)
    if config.signing_key is not None:  # a key that cannot sign (passphrase, not trusted) fails now, not mid-rollout
        if trust is not None:
            problem = await asyncio.to_thread(trust.check_signer, key=config.signing_key, principal=DEFAULT_AUTHOR[1])
            if problem is not None:
                raise GitError(problem)
        else:
            await asyncio.to_thread(ssh_sign, b"lockgate: can this key sign?\n", key=config.signing_key)
    elif trust is not None:
        log.warning("signatures are verified but lockgate has no --signing-key: its own write-back commits will be "
                    "unsigned and refused")
    # Opening a remote clones it: network I/O, off the event loop.
    source = await asyncio.to_thread(Pygit2Source.open, config.repo, branch=config.branch,
                                     cache_dir=config.state_dir / "git", signing_key=config.signing_key,
                                     fetch_deadline=config.fetch_timeout)
    # --isolate-clusters: a network namespace per cluster, made here (NetworkError without root).
    network = IsolatedNetwork.for_state_dir(config.state_dir) if config.isolate_clusters else None
    runtime = LocalRuntime(state_dir=config.state_dir, envoy_log_level=config.envoy_log_level,
                           prometheus_url=config.prometheus_url, network=network)
    return Reconciler(config=config, source=source, runtime=runtime, announced=announced, trust=trust)


async def run_up(config: UpConfig, *, web: tuple[str, int] | None = ("127.0.0.1", 0),
                 webhook_secret: Path | None = None) -> int:
    """Foreground: returns when SIGINT/SIGTERM arrives, after stopping every process it started. `web` is
    where the web view listens (None: no view); with `webhook_secret`, it takes Git webhooks too."""
    secret = None
    if webhook_secret is not None:
        from reconciler.web.hooks import load_secret

        try:
            secret = load_secret(webhook_secret)
        except (OSError, ValueError) as exc:
            raise GitError(f"--webhook-secret: {exc}") from None
    with lock_state_dir(config.state_dir):  # StateDirBusy names the running lockgate
        print(f"lockgate: starting (state {config.state_dir}, repo {config.repo})", flush=True)
        await asyncio.to_thread(warm)  # the loading worker, started before the first commit needs it
        try:
            rec = await local_reconciler(config)
            rec.status_listeners.append(StartupProgress())
            stop = asyncio.Event()
            install_stop_signals(stop)
            view = await start_web(rec, web, webhook_secret=secret) if web is not None else None
            # lockgate rollback|suspend|resume reach this run as command files (reconciler.cli.control)
            desk = asyncio.create_task(serve_commands(rec), name="lockgate control commands")
            try:
                return await serve(rec, stop)
            finally:
                desk.cancel()
                await asyncio.gather(desk, return_exceptions=True)
                if view is not None:
                    await view.close()
        finally:
            if config.isolate_clusters:  # on every way out (close removed it already, unless it failed)
                await asyncio.to_thread(IsolatedNetwork.for_state_dir(config.state_dir).teardown)


async def start_web(rec: Reconciler, listen: tuple[str, int], *, webhook_secret: bytes | None) -> Any:
    """The web view on `listen`, reading history through the reconciler's Git worker (never on the loop)."""
    from reconciler.loop import READ_TIMEOUT
    from reconciler.source.history import history
    from reconciler.web.server import WebView, started_line

    source = rec.source
    assert isinstance(source, Pygit2Source)

    async def read_history(limit: int) -> list[dict[str, Any]]:
        return await rec.git.call(history, source, limit=limit, timeout=READ_TIMEOUT)

    view = WebView(rec, history=read_history, webhook_secret=webhook_secret)
    url = await view.start(*listen)
    print(started_line(url, webhooks=webhook_secret is not None), flush=True)
    return view


@dataclass
class StartupProgress:
    """Short lines on the terminal while `up` starts: each cluster's control plane, proxies and workloads
    getting ready, then the first convergence. A status listener; silent once the mesh has converged."""

    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    started: float = field(default_factory=time.monotonic)
    every: float = 1.0
    """Seconds between two progress lines of one cluster (the counts in between are skipped)."""
    done: bool = False
    _shown: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    _at: dict[str, float] = field(default_factory=dict)

    def __call__(self, status: dict[str, Any]) -> None:
        if self.done:
            return
        for line in self.lines(status, now=time.monotonic()):
            self.out(line)

    def lines(self, status: dict[str, Any], *, now: float) -> list[str]:
        out = []
        applied = status.get("revision", {}).get("applied")
        workloads = status.get("workloads", [])
        clusters = status.get("clusters", [])
        for c in clusters:
            name = c["name"]
            if name not in self._shown:
                out.append(f"lockgate: cluster {name}: control plane {c.get('controlPlane')}")
                self._shown[name] = ()
            proxies = c.get("proxies", [])
            acked = sum(1 for p in proxies if p.get("ackedRevision") == applied and p.get("connected"))
            mine = [w for w in workloads if w.get("cluster") == name]
            counts = (acked, len(proxies), sum(1 for w in mine if w.get("ready")), len(mine))
            complete = counts[0] == counts[1] and counts[2] == counts[3]
            if counts != self._shown[name] and (complete or now - self._at.get(name, 0.0) >= self.every):
                self._shown[name], self._at[name] = counts, now
                out.append(f"lockgate: cluster {name}: {counts[0]}/{counts[1]} proxies ready, "
                           f"{counts[2]}/{counts[3]} workloads ready")
        if applied and clusters and all(c.get("convergedRevision") == applied for c in clusters) \
                and all(w.get("ready") for w in workloads):
            proxies = sum(len(c.get("proxies", [])) for c in clusters)
            out.append(f"lockgate: converged at {applied[:12]} in {now - self.started:.1f}s: every proxy "
                       f"({proxies}) ACKed it, {len(workloads)} workloads ready")
            self.done = True
        return out


async def serve(rec: Reconciler, stop: asyncio.Event) -> int:
    """Run until `stop`; then stop everything (0). Only an explicit stop tears down the data plane: after an
    internal error lockgate exits (1) and Envoys and workloads keep serving, to be adopted next time."""
    try:
        await rec.run(stop)
    except Exception:
        if rec.config.isolate_clusters:  # the network goes with lockgate: nothing could be adopted from it
            log.exception("lockgate stopped on an internal error; stopping every process and the isolated network")
            await rec.close()
            return 1
        log.exception("lockgate stopped on an internal error; Envoys and workloads keep serving and the next "
                      "`lockgate up --state-dir %s` adopts them", rec.config.state_dir)
        await rec.detach()
        return 1
    except BaseException:
        await rec.close()  # cancelled: as good as a stop
        raise
    await rec.close()
    log.info("stopped every process lockgate started")
    return 0
