"""The rollout controller: the I/O around `rollouts.advance`.

Each tick (0.2 s, or at once after a new revision) and for every Rollout of the applied intent it takes
one manual command if any, queries Prometheus when an analysis is due, calls the pure `advance`, and
then acts: persists the state atomically (state dir, before anything else, so a SIGKILL resumes at the
same step), re-renders when the weights changed, commits the outcome to Git (write-back, retried onto a
new tip on StaleParent) and records the decision as a git note on the commit that started the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from mesh.intent import Intent
from reconciler.rollout.commands import COMMANDS_DIR, DECISIONS_FILE, ROLLOUTS_DIR, state_path, summary
from reconciler.rollout.hooks import call_hooks
from reconciler.rollout.notify import Notifier, SinkStats
from reconciler.runtime.base import Runtime
from reconciler.source.base import DEFAULT_AUTHOR, GitError, GitReader, GitWriter, StaleParent
from reconciler.source.signatures import SignaturePolicy
from reconciler.source.worker import GitWorker
from reconciler.state import read_json, write_json
from rollouts.advance import (
    Command,
    Decision,
    HookAnswer,
    Observations,
    RolloutState,
    advance,
    analysis_due,
    hooks_due,
    judged_clusters,
    judged_wave,
    needs_metrics,
)
from rollouts.analysis import observe
from rollouts.intent import Rollout, RolloutSpec
from rollouts.notify import event, sinks_for
from rollouts.provider import MetricProvider, PrometheusProvider
from rollouts.waves import is_waved, label
from rollouts.writeback import commit_message, edit_rollout

log = logging.getLogger("lockgate.rollouts")
TICK = 0.2
WRITE_BACK_TIMEOUT = 60.0
"""Seconds a write-back or a note may take (a push to a remote that does not answer) before it is retried."""
WRITE_BACK_RETRY = 5.0
"""Seconds between attempts to commit an outcome that could not be committed (Git error, crash)."""
COMMANDS: tuple[Command, ...] = ("promote", "abort", "pause", "resume", "approve")
_NOTED = ("start", "step", "promote", "rollback", "pause", "resume", "reset", "wave", "approve")

Key = tuple[str, str]


class GitSource(GitReader, GitWriter, Protocol):
    """The write-back reads the tip it commits onto: reader and writer of one repository."""

    @property
    def branch(self) -> str:
        """The branch followed and written to."""


def read_states(state_dir: Path) -> tuple[dict[Key, RolloutState], dict[Key, dict[str, Any]]]:
    """Every persisted rollout state (and its record) under the state dir: what a restart resumes and
    what `plan` overlays."""
    states: dict[Key, RolloutState] = {}
    records: dict[Key, dict[str, Any]] = {}
    for path in sorted((state_dir / ROLLOUTS_DIR).glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = read_json(path)
            key = (record["namespace"], record["name"])
            states[key] = RolloutState.model_validate(record["state"])
            records[key] = record
    return states, records


@dataclass
class RolloutController:
    state_dir: Path
    source: GitSource
    runtime: Runtime
    """Where each cluster's metrics are queried (`Runtime.metrics`)."""
    on_change: Callable[[], None]
    """Re-render: the weights changed."""
    states: dict[Key, RolloutState] = field(default_factory=dict)
    records: dict[Key, dict[str, Any]] = field(default_factory=dict)
    providers: dict[str, MetricProvider] = field(default_factory=dict)
    """By Prometheus URL: one client (and connection pool) per server."""
    git: GitWorker = field(default_factory=GitWorker)
    """Where every Git operation runs (shared with the loop: one repository, one thread)."""
    trust: SignaturePolicy | None = None
    """With a policy, lockgate never signs a write-back on top of a head the policy does not trust."""
    _notes: set[asyncio.Task[None]] = field(default_factory=set)
    intent: Intent | None = None
    revision: str | None = None
    rollouts: dict[Key, Rollout] = field(default_factory=dict)
    """The applied revision's Rollouts by (namespace, name), found once per revision (`on_revision`): a tick
    runs five times a second and must not scan every resource of a big mesh each time."""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    notifier: Notifier = field(default_factory=Notifier)
    """Sends every decision to the Mesh-wide sinks and the Rollout's, off the tick (a sink that is down never
    holds a run)."""
    suspended: bool = False
    """`lockgate suspend`: no run advances on its own (commands from the CLI still act) until resumed."""

    def __post_init__(self) -> None:
        """Resume: every persisted rollout state is back before the first render."""
        self.states, self.records = read_states(self.state_dir)
        self.notifier.on_result = self._notified

    def _provider(self, cluster: str) -> MetricProvider | None:
        metrics = self.runtime.metrics(cluster)
        if metrics is None:
            return None
        if metrics.url not in self.providers:
            self.providers[metrics.url] = PrometheusProvider(metrics.url)
        return self.providers[metrics.url]

    def on_revision(self, intent: Intent, sha: str) -> None:
        """A new applied revision: its Rollouts are found here, the one scan of its resources."""
        self.intent, self.revision = intent, sha
        self.rollouts = {(r.metadata.namespace, r.metadata.name): r for r in intent.of_kind(Rollout)}
        self._wake.set()

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives as the
            # wake-up does, and this loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("rollout controller tick failed; retrying")

    async def tick(self) -> None:
        if self.intent is None:
            return
        rollouts = self.rollouts  # with none (and no state left to drop), only the command folder is read
        for key in set(self.states) - set(rollouts):
            self.states.pop(key)
            self.records.pop(key, None)
            self.notifier.forget(key)
            state_path(self.state_dir, *key).unlink(missing_ok=True)
            self.on_change()
        for key in sorted(rollouts):
            await self._retry_write_back(key)
        commands = self._commands()
        for key, ro in sorted(rollouts.items()):
            pending = commands.get(key, [])
            await self._step(key, ro, pending[0] if pending else None)
            for cmd in pending[1:]:
                await self._step(key, ro, cmd)
        for cmd_list in commands.values():  # commands for unknown rollouts: answered, then dropped
            for cmd in cmd_list:
                if (cmd["namespace"], cmd["name"]) not in rollouts:
                    self._ack_unknown(cmd)

    async def _step(self, key: Key, ro: Rollout, cmd: dict[str, Any] | None) -> None:
        if self.suspended and cmd is None:  # held where it is: no analysis, no step, no timeout
            return
        spec, before = ro.spec, self.states.get(key)
        command = cast(Command, cmd["command"]) if cmd and cmd.get("command") in COMMANDS else None
        obs = None
        now = time.time()
        answers: dict[str, HookAnswer] = {}
        if before is not None and command is None and spec.canary == before.observed_canary \
                and analysis_due(spec, before, now=now) and before.canary:
            due = set(hooks_due(spec, before))
            hooks = [h for h in spec.webhooks if h.name in due]
            if needs_metrics(before):
                judged = judged_clusters(spec, before)  # with waves: only the wave's own Prometheus
                clusters = self._canary_clusters(ro, before.canary) if judged is None else judged
                providers = {c: p for c in clusters if (p := self._provider(c)) is not None}
                svc = self.intent.services.get((key[0], spec.service)) if self.intent is not None else None
                observing = asyncio.to_thread(observe, spec=spec, namespace=key[0], canary=before.canary,
                                              stable=before.stable, providers=providers,
                                              protocol=svc.spec.protocol if svc is not None else "HTTP")
                if hooks:  # called beside the queries, each in its own thread
                    obs, answers = await asyncio.gather(observing, asyncio.to_thread(
                        call_hooks, hooks, namespace=key[0], name=key[1], state=before))
                    obs = obs.model_copy(update={"hooks": answers})
                else:
                    obs = await observing
            else:  # before traffic moves, or after the run: only hooks, nothing to measure
                if hooks:
                    answers = await asyncio.to_thread(call_hooks, hooks, namespace=key[0], name=key[1], state=before)
                obs = Observations(hooks=answers)
            now = time.time()
        decision = advance(spec, before, obs, now=now, revision=self.revision, command=command)
        if decision.state == before and decision.action in ("wait", "none") and cmd is None:
            return
        record = self.records.get(key, {})
        record = {**record, "namespace": key[0], "name": key[1], "service": spec.service,
                  "spec": spec.model_dump(mode="json", by_alias=True),
                  "state": decision.state.model_dump(mode="json", by_alias=True), "updatedAt": time.time()}
        if decision.action not in ("wait", "none"):
            record["lastDecision"] = decision.model_dump(mode="json", by_alias=True)
        if decision.checks:  # per cluster, the last checks judged there (a wave's stay when the next one runs)
            record["clusters"] = _cluster_checks(record.get("clusters", {}), decision)
        if decision.state.canary:
            record["canaryClusters"] = self._canary_clusters(ro, decision.state.canary)
        if decision.outcome is not None:  # what the write-back's subject names
            record["outcomeWave"] = label(spec, judged_wave(spec, before)) \
                if is_waved(spec) and before is not None else None
        if answers:
            record["webhooks"] = _count_calls(record.get("webhooks", {}), spec, answers)
            if before is not None and before.post_rollout_due and decision.reasons:
                log.log(logging.WARNING if any(not a.ok for a in answers.values()) else logging.INFO,
                        "rollout %s/%s: %s", key[0], key[1], "; ".join(decision.reasons))
        write_back = decision.outcome is not None and spec.write_back == "commit" and before is not None
        if write_back:
            assert before is not None
            record["writeBackPending"] = {"stableBefore": before.stable}  # survives a crash before the commit
        if cmd is not None:
            record["lastCommand"] = {"id": cmd["id"], "command": cmd.get("command"), "at": time.time(),
                                     "action": decision.action, "reasons": list(decision.reasons)}
        self.states[key] = decision.state
        self.records[key] = record
        write_json(state_path(self.state_dir, *key), record)  # persisted before anything acts on it
        if cmd is not None:
            (self.state_dir / ROLLOUTS_DIR / COMMANDS_DIR / f"{cmd['id']}.json").unlink(missing_ok=True)
        if before is None or decision.state.weight != before.weight or decision.state.phase != before.phase \
                or decision.state.stable != before.stable or decision.state.canary != before.canary \
                or decision.state.weights != before.weights:
            self.on_change()
        if decision.action not in ("wait", "none"):
            self._record(key, decision)
            assert self.intent is not None
            if sinks := sinks_for(self.intent.mesh.spec.notifications, spec.notifications):
                clusters = self._canary_clusters(ro, decision.state.canary) if decision.state.canary else []
                self.notifier.send(key, sinks, event(namespace=key[0], name=key[1], decision=decision,
                                                     clusters=clusters))
        if write_back:
            await self._retry_write_back(key, force=True)

    async def _retry_write_back(self, key: Key, *, force: bool = False) -> None:
        """Commit a pending outcome: right after the decision, and again after a crash or a Git error."""
        record = self.records.get(key, {})
        pending = record.get("writeBackPending")
        if not pending or not record.get("lastDecision"):
            return
        if not force and time.time() - pending.get("triedAt", 0.0) < WRITE_BACK_RETRY:
            return
        decision = Decision.model_validate(record["lastDecision"])
        try:  # off the loop: a commit onto a remote pushes over the network
            sha = await self.git.call(self._write_back, key, decision, stable_before=pending["stableBefore"],
                                      wave=record.get("outcomeWave"), timeout=WRITE_BACK_TIMEOUT)
        except GitError as exc:
            log.error("rollout %s/%s: write-back failed: %s", key[0], key[1], exc)
            sha = None
        if sha is None:
            record["writeBackPending"] = {**pending, "triedAt": time.time()}
        else:
            record.pop("writeBackPending")
            if sha:
                record["writeBack"] = sha
        write_json(state_path(self.state_dir, *key), record)

    def _canary_clusters(self, ro: Rollout, canary: str) -> list[str]:
        assert self.intent is not None
        return sorted({c for w in self.intent.workloads.values()
                       if w.metadata.namespace == ro.metadata.namespace and w.spec.service == ro.spec.service
                       and w.spec.version == canary and w.spec.replicas > 0 for c in w.spec.clusters})

    # --- commands -----------------------------------------------------------------------------------

    def _commands(self) -> dict[Key, list[dict[str, Any]]]:
        out: dict[Key, list[dict[str, Any]]] = {}
        folder = self.state_dir / ROLLOUTS_DIR / COMMANDS_DIR
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                cmd = read_json(path)
                out.setdefault((cmd["namespace"], cmd["name"]), []).append(cmd)
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return out

    def _ack_unknown(self, cmd: dict[str, Any]) -> None:
        write_json(self.state_dir / ROLLOUTS_DIR / COMMANDS_DIR / f"{cmd['id']}.done",
                   {"id": cmd["id"], "error": f"no Rollout {cmd['namespace']}/{cmd['name']} in the applied revision"})
        (self.state_dir / ROLLOUTS_DIR / COMMANDS_DIR / f"{cmd['id']}.json").unlink(missing_ok=True)

    # --- audit --------------------------------------------------------------------------------------

    def _notified(self, key: Key, sink: str, stats: SinkStats) -> None:
        """A delivery ended (or an event was dropped): its counters into the rollout's status."""
        record = self.records.get(key)
        if record is None:
            return
        record["notifications"] = {**record.get("notifications", {}), sink: stats.as_json()}
        write_json(state_path(self.state_dir, *key), record)

    def _record(self, key: Key, d: Decision) -> None:
        """Every decision in decisions.jsonl; the ones that matter also as a git note on the run's commit."""
        st = d.state
        entry = {"at": d.at, "rollout": f"{key[0]}/{key[1]}", "action": d.action, "phase": st.phase,
                 "step": st.step, "weight": st.weight, "iteration": st.iteration, "stable": st.stable,
                 "canary": st.canary, "failedChecks": st.failed_checks, "canaryRevision": st.canary_revision,
                 "reasons": list(d.reasons),
                 "checks": [c.model_dump(mode="json", by_alias=True) for c in d.checks],
                 "wave": st.wave if st.weights is not None else None, "weights": st.weights,
                 "bakeUntil": st.bake_until, "waitingForApproval": st.waiting_for_approval}
        path = self.state_dir / ROLLOUTS_DIR / DECISIONS_FILE
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("rollout %s/%s: %s: %s", key[0], key[1], d.action, "; ".join(d.reasons))
        noted = d.action in _NOTED or (d.action == "hold" and any(c.effective == "fail" for c in d.checks))
        if noted and st.canary_revision:
            self._note(st.canary_revision, "rollout " + json.dumps(
                {k: entry[k] for k in ("at", "rollout", "action", "step", "weight", "canary", "reasons", "wave",
                                       "weights")}))

    def _note(self, sha: str, message: str) -> None:
        """A git note on `sha`, added (and pushed, for a remote) on the Git worker: nothing waits for it."""
        async def add() -> None:
            try:
                await self.git.call(self.source.add_note, sha, message=message, timeout=WRITE_BACK_TIMEOUT)
            except (GitError, ValueError, KeyError) as exc:
                log.warning("could not note %s on %s: %s", message.split(" ", 1)[0], sha[:12], exc)

        task = asyncio.get_running_loop().create_task(add(), name=f"git note {sha[:12]}")
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

    def note_applied(self, sha: str, clusters: list[str]) -> None:
        """Applied revisions, as a git note on the applied commit: when, and which clusters."""
        self._note(sha, "applied " + json.dumps({"at": time.time(), "clusters": clusters}))

    def _write_back(self, key: Key, d: Decision, *, stable_before: str, wave: str | None = None,
                    attempts: int = 5) -> str | None:
        """Commit the outcome; on StaleParent re-read the new tip and re-apply (the human commit stays).
        The new sha; "" when there is nothing to write (Git already moved on); None on failure."""
        assert d.state.canary is not None
        outcome = cast(Literal["promoted", "rolled-back"], d.outcome)
        message = commit_message(namespace=key[0], name=key[1], decision=d, stable_before=stable_before, wave=wave)
        for _ in range(attempts):
            try:
                head = self.source.refresh()
                if head is None:
                    return ""
                if self.trust is not None and (why := self.trust.verify(self.source, head)) is not None:
                    # Signing on top would make lockgate vouch for that commit's tree: wait for a trusted head.
                    log.error("rollout %s/%s: not writing back onto %s, which is not trusted (%s)", key[0], key[1],
                              head[:12], why)
                    return None
                edited = edit_rollout(self.source.read_tree(head), namespace=key[0], name=key[1], outcome=outcome,
                                      canary=d.state.canary)
                if edited is None:
                    log.info("rollout %s/%s: nothing to write back (the Rollout changed in Git)", *key)
                    return ""
                sha = self.source.commit(files=edited, message=message, parent=head, author=DEFAULT_AUTHOR)
                log.info("rollout %s/%s: committed %s: %s", key[0], key[1], sha[:12], message.splitlines()[0])
                return sha
            except StaleParent:
                continue
            except GitError as exc:
                log.error("rollout %s/%s: write-back failed: %s", key[0], key[1], exc)
                return None
        log.error("rollout %s/%s: write-back gave up after %d concurrent commits", key[0], key[1], attempts)
        return None

    # --- status -------------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for key, ro in sorted(self.rollouts.items()):
            out.append(summary(ro.spec.model_dump(mode="json", by_alias=True), self.records.get(key, {}),
                               namespace=key[0], name=key[1]))
        return out

    async def close(self) -> None:
        await self.notifier.close()
        if self._notes:  # notes already on their way get a moment; a stuck remote does not hold the stop
            await asyncio.wait(set(self._notes), timeout=2.0)
        for provider in self.providers.values():
            if isinstance(provider, PrometheusProvider):
                provider.close()


def _cluster_checks(was: dict[str, Any], d: Decision) -> dict[str, Any]:
    """The rollout's per-cluster record: each cluster judged by `d` gets its checks (the rest keep theirs)."""
    out = dict(was)
    by: dict[str, list[dict[str, Any]]] = {}
    for c in d.checks:
        if c.cluster != "*":  # a webhook's check belongs to the run, not to a cluster
            by.setdefault(c.cluster, []).append(c.model_dump(mode="json", by_alias=True))
    for cluster, checks in by.items():
        out[cluster] = {"at": d.at, "checks": checks}
    return out


def _count_calls(counts: dict[str, Any], spec: RolloutSpec, answers: dict[str, HookAnswer]) -> dict[str, Any]:
    """Per webhook, in the rollout's status: calls, the ones not answered 2xx, and the last answer."""
    types = {h.name: h.type for h in spec.webhooks}
    out = dict(counts)
    for name, a in answers.items():
        was = out.get(name, {})
        out[name] = {"type": types.get(name), "calls": was.get("calls", 0) + 1,
                     "not2xx": was.get("not2xx", 0) + (not a.ok), "last": a.detail, "lastAt": time.time()}
    return out
