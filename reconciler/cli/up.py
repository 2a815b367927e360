"""The composition root of `lockgate up` (and the demo): the one place that picks implementations.

Git through pygit2, proxies and workloads as local processes; the reconcile loop itself knows only the
protocols (`Runtime`, the Git reader and writer).
"""

from __future__ import annotations

import asyncio
import logging

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


async def run_up(config: UpConfig) -> int:
    """Foreground: returns when SIGINT/SIGTERM arrives, after stopping every process it started."""
    with lock_state_dir(config.state_dir):  # StateDirBusy names the running lockgate
        await asyncio.to_thread(warm)  # the loading worker, started before the first commit needs it
        try:
            rec = await local_reconciler(config)
            stop = asyncio.Event()
            install_stop_signals(stop)
            return await serve(rec, stop)
        finally:
            if config.isolate_clusters:  # on every way out (close removed it already, unless it failed)
                await asyncio.to_thread(IsolatedNetwork.for_state_dir(config.state_dir).teardown)


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
