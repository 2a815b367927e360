"""The web view and the Git webhooks on real processes: `lockgate up`, Envoys, Prometheus, Debian's
headless Chromium.

(a) During a canary the Rollout page shows its weight and the decisions, and changes as the run steps,
    live (server-sent events) and on a later load; a screenshot is a real PNG. The Mesh and History
    pages show the cluster's proxies and the commits.
(b) A `file://` remote polled every 15 s: a push announced by a webhook with the right HMAC is applied in
    under a second (only the hook can explain that), one with a wrong signature gets 401 and is applied by
    the next poll (nothing lost), and a GitLab token works as GitHub's signature does.

Chromium is driven over the DevTools protocol (its websocket): `--dump-dom --virtual-time-budget` waits
for every request to end, and the page's event stream never does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

from e2e.harness import Up, alive, commit_file, git, lockgate, wait_for
from e2e.test_rollouts import MESH, WORKLOADS, Load, rollout

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", "--window-size=1280,1000", "--hide-scrollbars")


class Browser:
    """One headless Chromium (its own new profile) and one page, over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: ClientSession | None = None
        self.ws: ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)  # a new, empty profile
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        self.session = ClientSession(trust_env=False)
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        await self.call("Page.enable")
        await self.call("Runtime.enable")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        mid = next(self._ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            if msg.type != WSMsgType.TEXT:
                raise RuntimeError(f"devtools connection ended: {msg.type}")
            data = json.loads(msg.data)
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out.get("result", {}).get("value")

    async def dom(self) -> str:
        html: str = await self.evaluate("document.documentElement.outerHTML")
        return html

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Until `expression` is truthy in the page; its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                value = await self.evaluate(expression)
                if value:
                    return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the page never had {expression} (last: {value!r})")

    async def screenshot(self, path: Path) -> bytes:
        out = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(out["data"])
        path.write_bytes(data)
        return data

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: chromium and its helpers
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed "
                                    "(scripts/apt-deps installs Debian's chromium)")


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def api(dashboard: str, path: str) -> Any:
    with _opener().open(dashboard.rstrip("/") + path, timeout=5) as resp:
        return json.load(resp)


# --- (a) the Rollout page during a canary -----------------------------------------------------------


@pytest.fixture(scope="module")
def canary_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Path, Load]]:
    tmp = tmp_path_factory.mktemp("web")
    repo, state = tmp / "repo", tmp / "state"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.yaml").write_text(MESH + WORKLOADS)
    (repo / "rollout.yaml").write_text(rollout(stable="v1", canary=None))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "reviews on v1, with a Rollout")
    up = Up(repo=repo, state_dir=state, extra=("--web", "127.0.0.1:0"))
    load = Load(("", 0))
    try:
        up.wait_converged(git(repo, "rev-parse", "HEAD"))
        up.child_pids.add(up.status()["clusters"][0]["prometheus"]["pid"])
        load = Load(up.ingress())
        load.start()
        yield up, repo, load
    finally:
        load.close()
        children = set(up.child_pids)
        up.stop()
        assert not alive(children), "processes left behind"


def _rollout(up: Up) -> dict[str, Any]:
    out = lockgate("rollout", "status", "reviews", "--json", "--state-dir", str(up.state_dir))
    result: dict[str, Any] = json.loads(out.stdout)
    return result


CARD = "document.querySelector('.rollout[data-rollout=\"shop/reviews\"]')"


@needs_chromium
def test_the_rollout_page_follows_a_canary_live_and_on_a_later_load(canary_mesh: tuple[Up, Path, Load],
                                                                      tmp_path: Path) -> None:
    up, repo, _ = canary_mesh
    status = up.status()
    dashboard = status["lockgate"]["dashboard"]
    assert dashboard.startswith("http://127.0.0.1:") and dashboard.endswith("/")
    assert api(dashboard, "/api/status")["revision"] == status["revision"]  # the same contract as status --json

    async def scenario() -> None:
        browser = Browser(tmp_path / "profile")
        await browser.start()
        try:
            # Mesh: the cluster, its proxies and the revision each ACKed
            await browser.goto(dashboard + "#mesh")
            await browser.wait_for("!!document.querySelector('[data-cluster=\"east\"]')")
            mesh = await browser.dom()
            assert "east/ingress" in mesh and "east/shop/reviews-v2-0" in mesh
            assert status["revision"]["applied"][:12] in mesh

            start = await asyncio.to_thread(commit_file, repo, "rollout.yaml", rollout(stable="v1", canary="v2"),
                                            "reviews: canary v2")
            await browser.goto(dashboard + "#rollout")
            await browser.wait_for(f"{CARD} && {CARD}.dataset.weight === '20'", timeout=30)
            first = await browser.dom()
            assert 'data-weight="20"' in first and 'data-action="start"' in first
            assert ">20%<" in first and "v2" in first
            shot = await browser.screenshot(tmp_path / "rollout.png")
            assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000

            # the run steps: the open page shows it without a reload (server-sent events) ...
            await asyncio.to_thread(wait_for, "the rollout at 50%", lambda: _rollout(up)["weight"] == 50, 40)
            await browser.wait_for(f"{CARD}.dataset.weight === '50'", timeout=5)
            # ... and so does a later load, with the decision and its reason
            await browser.goto("about:blank")
            await browser.goto(dashboard + "#rollout")
            await browser.wait_for(f"{CARD} && {CARD}.dataset.weight === '50'", timeout=10)
            later = await browser.dom()
            assert 'data-weight="50"' in later and 'data-action="step"' in later
            assert "success-rate" in later  # the metric against its threshold, and the decision's reasons
            assert later != first
            await browser.screenshot(tmp_path / "rollout-later.png")

            # History: the commit that started the run, from Git
            await browser.goto(dashboard + "#history")
            await browser.wait_for("document.body.innerText.includes('reviews: canary v2')", timeout=10)
            assert start[:12] in await browser.dom()
        finally:
            await browser.close()

    asyncio.run(scenario())
    print("screenshots:", tmp_path / "rollout.png", tmp_path / "rollout-later.png")
    wait_for("the run ends", lambda: _rollout(up)["phase"] in ("promoted", "rolled-back"), timeout=60)


# --- (b) webhooks ----------------------------------------------------------------------------------

POLL = 15.0


def _sign(body: bytes, secret: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json",
                                                                         **headers})
    try:
        with _opener().open(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _applied(dashboard: str, sha: str) -> bool:
    return bool(api(dashboard, "/api/status")["revision"]["applied"] == sha)


def test_a_verified_webhook_applies_a_push_at_once_and_a_bad_one_loses_no_poll(tmp_path: Path) -> None:
    work = tmp_path / "work"
    lockgate("init", str(work))
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(work, "remote", "add", "origin", str(bare))
    git(work, "push", "-q", "origin", "main")
    secret = b"e2e-webhook-secret"
    (tmp_path / "hook-secret").write_bytes(secret + b"\n")
    url = f"file://{bare}"
    up = Up(repo=url, state_dir=tmp_path / "state",  # type: ignore[arg-type]  # a URL, as a user gives it
            extra=("--poll-interval", f"{POLL:g}", "--webhook-secret", str(tmp_path / "hook-secret")))
    try:
        first = git(work, "rev-parse", "HEAD")
        up.wait_converged(first)
        dashboard = up.status()["lockgate"]["dashboard"]
        hook = dashboard + "hooks/git"
        body = json.dumps({"ref": "refs/heads/main"}).encode()

        def push(n: int) -> str:
            sha = commit_file(work, f"notes/{n}.txt", f"change {n}\n", f"change {n}")
            git(work, "push", "-q", "origin", "main")
            return sha

        # right HMAC: applied well under a second (the next poll is ~10 s away)
        second = push(2)
        t = time.monotonic()
        assert _post(hook, body, {"X-Hub-Signature-256": _sign(body, secret), "X-GitHub-Event": "push"}) == 202
        wait_for("the hooked push applied", lambda: _applied(dashboard, second), timeout=POLL)
        took = time.monotonic() - t
        assert took < 1.0, f"applied {took:.3f}s after the webhook"

        # wrong HMAC (a replayed body under another body's signature): 401, nothing fetched ...
        third = push(3)
        t3 = time.monotonic()
        assert _post(hook, body, {"X-Hub-Signature-256": _sign(b"another body", secret)}) == 401
        assert _post(hook, body, {}) == 401
        time.sleep(1.5)
        assert _applied(dashboard, second)
        # ... and polling still picks it up: no poll was lost, to the right hook or the wrong one
        wait_for("the poll to apply the unhooked push", lambda: _applied(dashboard, third), timeout=POLL + 10)
        assert time.monotonic() - t3 > 1.5

        # GitLab's token works too
        fourth = push(4)
        t = time.monotonic()
        assert _post(hook, body, {"X-Gitlab-Token": secret.decode(), "X-Gitlab-Event": "Push Hook"}) == 202
        wait_for("the GitLab-hooked push applied", lambda: _applied(dashboard, fourth), timeout=POLL)
        assert time.monotonic() - t < 1.0
        assert up.status()["source"]["reachable"] is True
    finally:
        up.stop()
