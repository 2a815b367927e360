"""A render that starts from the last one's cache (`build.changed_services`: only the changed services'
parts are rebuilt) gives exactly what a render from nothing gives: every proxy's resources, byte for
byte, and every version. Checked over random commit sequences through the loader (which keeps unchanged
documents' objects, as in `up`) and the real pipeline (rollout overlay, security, east-west)."""

from __future__ import annotations

import random
from typing import Any

import pytest

import mesh.render.build as build
from mesh.intent import Intent
from mesh.render import RenderCache
from reconciler.load import load
from reconciler.pipeline import ephemeral_certificates, planned_topology, render_mesh

HEAD = "apiVersion: lockgate.io/v1alpha1\n"
SERVICES = 24
NAMESPACES = 3


def service_files(i: int, state: dict[Any, Any]) -> str:
    ns = f"ns{i % NAMESPACES}"
    s = state[i]
    fault = ("      fault: {abort: {httpStatus: 503, percentage: 10}}\n" if s["fault"] else "")
    docs = [
        f"kind: Service\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
        f"spec: {{ports: [{{name: http, port: 80}}], versions: [{s['versions']}]}}\n",
        f"kind: Route\nmetadata: {{name: s{i}, namespace: {ns}}}\nspec:\n  service: s{i}\n"
        + (f"  hosts: [{s['host']}]\n" if s["host"] else "") +
        "  http:\n"
        f"    - name: testers\n      match: [{{headers: {{x-tester: {{exact: '{s['tester']}'}}}}}}]\n"
        "      route: [{version: v2}]\n"
        f"    - name: default\n{fault}"
        f"      route: [{{version: v1, weight: {100 - s['w']}}}, {{version: v2, weight: {s['w']}}}]\n",
        f"kind: Workload\nmetadata: {{name: s{i}-v1, namespace: {ns}}}\n"
        f"spec: {{service: s{i}, version: v1, replicas: {s['replicas']}, clusters: [east], command: [app]"
        + (f", egress: [s{(i + 1) % SERVICES}.ns{(i + 1) % NAMESPACES}]" if i % 5 == 0 else "") + "}\n",
    ]
    if s["tp"] is not None:
        docs.append(f"kind: TrafficPolicy\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
                    f"spec: {{service: s{i}, connectionPool: {{http: {{maxRequestsPerConnection: {s['tp']}}}}}}}\n")
    return "---\n".join(HEAD + d for d in docs)


def files(state: dict[Any, Any]) -> dict[str, bytes]:
    out = {"mesh.yaml": (HEAD + "kind: Mesh\nmetadata: {name: m}\n"
                         "spec: {trustDomain: example.org, clusters: [{name: east}]}\n").encode()}
    for i in range(SERVICES):
        out[f"ns{i % NAMESPACES}/s{i}.yaml"] = service_files(i, state).encode()
    if state["limit"]:
        out["limits.yaml"] = (HEAD + "kind: RateLimit\nmetadata: {name: l, namespace: ns1}\n"
                              "spec: {service: s1, rule: default, requestsPerUnit: 5, unit: minute}\n").encode()
    return out


def initial() -> dict[Any, Any]:
    state: dict[Any, Any] = {
        i: {"w": 0, "fault": i == 4, "tester": "yes", "host": f"s{i}.example.com" if i % 2 else None,
            "versions": "v1, v2", "replicas": 1 + i % 2, "tp": 1 if i % 3 == 0 else None}
        for i in range(SERVICES)}
    state["limit"] = False
    return state


def mutate(state: dict[Any, Any], rng: random.Random) -> str:
    """One commit: mostly what a route change or a rollout step is, sometimes a change of something else."""
    i = rng.randrange(SERVICES)
    s = state[i]
    kind = rng.choice(["weight", "weight", "weight", "fault", "tester", "tp", "tp-add", "host", "service",
                       "replicas", "limit", "none", "two"])
    if kind == "weight":
        s["w"] = rng.choice([0, 10, 50, 100])
    elif kind == "fault":
        s["fault"] = not s["fault"]
    elif kind == "tester":
        s["tester"] = rng.choice(["yes", "no", "maybe"])
    elif kind == "tp":  # a TrafficPolicy changed in place: the same keys, that service's clusters differ
        with_tp = [j for j in range(SERVICES) if state[j]["tp"] is not None]
        t = state[rng.choice(with_tp)] if with_tp else s
        t["tp"] = rng.choice([v for v in (1, 2, 3) if v != t["tp"]])
    elif kind == "tp-add":
        s["tp"] = 2 if s["tp"] is None else None
    elif kind == "host":
        s["host"] = None if s["host"] else f"s{i}.example.com"
    elif kind == "service":
        s["versions"] = "v1, v2, v3" if s["versions"] == "v1, v2" else "v1, v2"
    elif kind == "replicas":
        s["replicas"] = 1 + (s["replicas"] % 3)
    elif kind == "limit":
        state["limit"] = not state["limit"]
    elif kind == "two":
        state[(i + 7) % SERVICES]["w"] = rng.choice([0, 30, 100])
        s["w"] = rng.choice([0, 20, 100])
    return kind


def intent_of(state: dict[Any, Any]) -> Intent:
    loaded = load(files(state))
    assert loaded.intent is not None, loaded.problems[:3]
    return loaded.intent


def as_json(renders: Any) -> dict[str, Any]:
    return {node: (snap.to_json(), dict(snap.versions)) for node, snap in renders["east"].snapshots.items()}


def plain(intent: Intent, cache: RenderCache, revision: str) -> dict[str, Any]:
    """Render alone, without the pipeline's extensions (whose per-proxy cluster hooks rebuild every
    proxy's clusters, so a stale shared cluster would not show through them)."""
    from mesh.render import render

    snaps = render(intent=intent, topology=planned_topology(intent, "east"), revision=revision, cache=cache)
    return {node: (snap.to_json(), dict(snap.versions)) for node, snap in snaps.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_incremental_plain_render_is_the_render_from_nothing(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.render.routes as routes

    monkeypatch.setattr(routes, "BUCKET_SIZE", 2)
    monkeypatch.setattr(build, "DIRTY_SHARE", 2)
    rng = random.Random(seed)
    state = initial()
    cache = RenderCache()
    kinds = []
    for step in range(40):
        kinds.append(mutate(state, rng) if step else "first")
        intent = intent_of(state)
        got, want = plain(intent, cache, f"r{step}"), plain(intent, RenderCache(), f"r{step}")
        assert got.keys() == want.keys()
        for node in want:
            assert got[node] == want[node], (step, kinds[-1], node)
    assert "tp" in kinds


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_incremental_render_is_the_render_from_nothing(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.render.routes as routes

    monkeypatch.setattr(routes, "BUCKET_SIZE", 2)  # several buckets per namespace, so some are kept, some not
    monkeypatch.setattr(build, "DIRTY_SHARE", 2)
    answers: list[Any] = []
    real = build.changed_services

    def recorded(*args: Any, **kwargs: Any) -> Any:
        answers.append(real(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(build, "changed_services", recorded)
    rng = random.Random(seed)
    state = initial()
    certs = ephemeral_certificates(["east"])
    cache = RenderCache()
    kinds = []
    for step in range(40):
        kinds.append(mutate(state, rng) if step else "first")
        intent = intent_of(state)
        topology = {"east": planned_topology(intent, "east")}
        kept = render_mesh(intent=intent, states={}, topologies=topology, certs=certs, now=0.0,
                           revision=f"r{step}", caches={"east": cache})
        fresh = render_mesh(intent=intent, states={}, topologies=topology, certs=certs, now=0.0,
                            revision=f"r{step}", caches={"east": RenderCache()})
        assert kept["east"].error is None and fresh["east"].error is None
        got, want = as_json(kept), as_json(fresh)
        assert got.keys() == want.keys()
        for node in want:
            assert got[node] == want[node], (step, kinds[-1], node)
    used = [kind for kind, dirty in zip(kinds, answers[::2], strict=True) if dirty]
    assert len(used) >= 8, list(zip(kinds, answers[::2], strict=True))  # the incremental path was taken
    assert {"service", "host", "replicas"} & set(kinds) - set(used)  # and the whole path where it must be


def test_a_render_that_fails_half_way_leaves_the_next_one_to_walk_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A render raises after rebuilding some buckets (an extension's bug, say): its half-made state must not
    become what the next render starts from."""
    from mesh.render import Extension, render
    from mesh.topology import Sidecar

    monkeypatch.setattr(__import__("mesh.render.routes", fromlist=["x"]), "BUCKET_SIZE", 2)

    class Flaky(Extension):
        """Fingerprints that never change; raises once, at the tenth sidecar listener of one render."""

        def __init__(self) -> None:
            self.calls, self.armed = 0, False

        def fingerprint(self) -> object:
            return "flaky"

        def listener(self, proxy: object, listener: dict[str, Any]) -> dict[str, Any]:
            if self.armed and isinstance(proxy, Sidecar):
                self.calls += 1
                if self.calls == 10:
                    self.armed = False
                    raise RuntimeError("a hook's bug")
            return listener

    flaky = Flaky()
    state = initial()
    first = intent_of(state)
    topology = planned_topology(first, "east")
    cache = RenderCache()
    render(intent=first, topology=topology, extensions=[flaky], cache=cache, revision="r1")
    state[3]["w"], state[9]["fault"] = 100, True
    second = intent_of(state)
    flaky.armed = True
    with pytest.raises(RuntimeError, match="a hook's bug"):
        render(intent=second, topology=topology, extensions=[flaky], cache=cache, revision="r2")
    again = render(intent=second, topology=topology, extensions=[flaky], cache=cache, revision="r2")
    fresh = render(intent=second, topology=topology, extensions=[flaky], cache=RenderCache(), revision="r2")
    assert {n: s.to_json() for n, s in again.items()} == {n: s.to_json() for n, s in fresh.items()}
    assert {n: dict(s.versions) for n, s in again.items()} == {n: dict(s.versions) for n, s in fresh.items()}
