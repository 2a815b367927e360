"""The web view as an attacker sees it, and as the page uses it: a real aiohttp server on loopback around a
Reconciler on a FakeRuntime (no processes), asked over real sockets.

GET only (405 otherwise, the hook aside), no file outside static/ (raw request lines, so no client
normalises the path first), the security headers on every answer, loopback host names only, the hook's
401/413/202 and its wake-up, and server-sent events pushed by the reconciler's status writer.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession

from reconciler.loop import Reconciler, UpConfig
from reconciler.source.git import Pygit2Source, init_repo
from reconciler.web.hooks import github_signature
from reconciler.web.server import WebView, static_files, timeline
from tests.fixtures.intents import TEMPLATE
from tests.fixtures.runtime import FakeRuntime

SECRET = b"test-secret"
STATIC_DIR = Path(__file__).resolve().parents[3] / "reconciler" / "web" / "static"


@dataclass
class Served:
    view: WebView
    rec: Reconciler
    url: str
    host: str
    port: int
    woken: list[int]
    session: ClientSession


@pytest_asyncio.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    source = Pygit2Source.open(str(repo))
    woken: list[int] = []
    monkeypatch.setattr(source, "wake", lambda: woken.append(1))
    rec = Reconciler(config=UpConfig(repo=str(repo), state_dir=tmp_path / "state"), source=source,
                     runtime=FakeRuntime(metrics_url=None), announced=True)

    async def history(limit: int) -> list[dict[str, Any]]:
        return [{"at": 1.0, "type": "commit", "sha": "a" * 40, "author": "t", "subject": "first",
                 "automated": False}][:limit]

    view = WebView(rec, history=history, webhook_secret=SECRET)
    url = await view.start("127.0.0.1", 0)
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    async with ClientSession() as session:
        yield Served(view=view, rec=rec, url=url, host=host, port=int(port), woken=woken, session=session)
    await view.close()
    rec.git.close()


async def raw(s: Served, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as bytes on its own connection: (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection(s.host, s.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(path: str, host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.asyncio
async def test_the_page_and_its_files_are_served_with_the_security_headers(served: Served) -> None:
    for path, ctype in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/app.css", "text/css"),
                        ("/api/status", "application/json"), ("/nope", None)):
        async with served.session.get(served.url.rstrip("/") + path) as resp:
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'"), path
            assert resp.headers["X-Content-Type-Options"] == "nosniff", path
            if ctype is None:
                assert resp.status == 404
            else:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith(ctype), path
    async with served.session.get(served.url) as resp:
        page = await resp.text()
    # the page uses only its own files: no CDN, no inline script the CSP would block anyway
    assert 'src="/static/app.js"' in page and "http" not in page.replace('href="/api/status"', "")
    assert "<script>" not in page


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"])
async def test_every_method_but_get_is_refused(served: Served, method: str) -> None:
    for path in ("/", "/api/status", "/api/history", "/events", "/static/app.js", "/anything"):
        status, headers, _ = await raw(served, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                               "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        assert status == 405, (method, path)
        assert headers["allow"] == "GET"
        assert headers["x-content-type-options"] == "nosniff"
    status, _, _ = await raw(served, get("/hooks/git"))
    assert status == 405  # the hook takes POST only


@pytest.mark.asyncio
@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/server.py", "/static/%2e%2e%2fhooks.py",
    "/static/..%5cserver.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/app.js/../../server.py",
    "/../../../../etc/passwd", "/static/.", "/static/", "/static/..", "/static/app.js%00.html",
    "/static/../../loop.py", "/static/..%252fserver.py", "/%2e%2e/%2e%2e/etc/passwd",
])
async def test_nothing_outside_static_is_ever_served(served: Served, path: str) -> None:
    status, _, body = await raw(served, get(path))
    assert status in (400, 404), (path, status)
    assert b"import " not in body and b"root:" not in body


def test_only_regular_files_directly_in_static_are_listed(tmp_path: Path) -> None:
    root = tmp_path / "static"
    root.mkdir()
    (root / "index.html").write_text("<p>")
    (root / "sub").mkdir()
    (root / "sub" / "x.js").write_text("1")
    (tmp_path / "secret.txt").write_text("no")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "notes.py").write_text("no")
    assert set(static_files(root)) == {"index.html"}
    assert {"index.html", "app.js", "app.css"} <= set(static_files(STATIC_DIR))


@pytest.mark.asyncio
async def test_a_foreign_host_name_is_refused_on_loopback(served: Served) -> None:
    assert (await raw(served, get("/api/status", host="evil.example")))[0] == 421  # DNS rebinding
    assert (await raw(served, get("/api/status", host=f"localhost:{served.port}")))[0] == 200
    assert (await raw(served, get("/api/status", host=f"127.0.0.1:{served.port}")))[0] == 200


@pytest.mark.asyncio
async def test_api_status_is_the_status_contract_with_the_dashboard(served: Served) -> None:
    async with served.session.get(served.url + "api/status") as resp:
        body = await resp.json()
    expected = served.rec.status()
    assert set(body) == set(expected)
    assert body["lockgate"]["dashboard"] == served.url == expected["lockgate"]["dashboard"]
    assert body["lockgate"]["running"] is True
    async with served.session.get(served.url + "api/history?limit=5") as resp:
        assert (await resp.json())[0]["subject"] == "first"
    async with served.session.get(served.url + "api/history?limit=x") as resp:
        assert resp.status == 400


@pytest.mark.asyncio
async def test_the_hook_wakes_the_source_only_when_verified(served: Served) -> None:
    body = b'{"ref": "refs/heads/main"}'
    hook = served.url + "hooks/git"
    async with served.session.post(hook, data=body, headers={"X-Hub-Signature-256": "sha256=" + "0" * 64}) as resp:
        assert resp.status == 401
    async with served.session.post(hook, data=body,
                                   headers={"X-Hub-Signature-256": github_signature(b"other", SECRET)}) as resp:
        assert resp.status == 401  # replayed with another body's signature
    async with served.session.post(hook, data=body) as resp:
        assert resp.status == 401
    assert served.woken == []
    assert served.view.hooks == {"accepted": 0, "rejected": 3}
    async with served.session.post(hook, data=body,
                                   headers={"X-Hub-Signature-256": github_signature(body, SECRET)}) as resp:
        assert resp.status == 202 and (await resp.json())["provider"] == "github"
    async with served.session.post(hook, data=b"", headers={"X-Gitlab-Token": SECRET.decode()}) as resp:
        assert resp.status == 202
    async with served.session.post(hook, headers={"Authorization": f"Bearer {SECRET.decode()}"}) as resp:
        assert resp.status == 202
    assert served.woken == [1, 1, 1]


@pytest.mark.asyncio
async def test_an_oversize_hook_body_gets_413_and_wakes_nothing(served: Served) -> None:
    big = b"x" * ((1 << 20) + 1)
    headers = {"X-Hub-Signature-256": github_signature(big, SECRET)}
    async with served.session.post(served.url + "hooks/git", data=io.BytesIO(big), headers=headers) as resp:
        assert resp.status == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"y" * 65536
    async with served.session.post(served.url + "hooks/git", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
    assert served.woken == []


@pytest.mark.asyncio
async def test_without_a_secret_the_hook_is_404(tmp_path: Path, served: Served) -> None:
    served.view.webhook_secret = None
    async with served.session.post(served.url + "hooks/git", data=b"{}",
                                   headers={"X-Gitlab-Token": SECRET.decode()}) as resp:
        assert resp.status == 404
    assert served.woken == []


@pytest.mark.asyncio
async def test_events_are_pushed_when_the_reconciler_writes_status(served: Served) -> None:
    async with served.session.get(served.url + "events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")

        async def next_event() -> dict[str, Any]:
            data: dict[str, Any] | None = None
            while True:
                line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().rstrip("\n")
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line == "" and data is not None:
                    return data

        first = await next_event()
        assert first["status"]["revision"]["failed"] is None and first["status"]["lockgate"]["running"] is True
        served.rec.failed, served.rec.last_error = "f" * 40, ["routes.yaml:1: bad"]
        served.rec.write_status()  # the debounced writer: the page is told, nothing polls the file
        pushed = await next_event()
        assert pushed["status"]["revision"]["failed"] == "f" * 40
        assert pushed["status"]["revision"]["lastError"] == ["routes.yaml:1: bad"]


def test_the_timeline_keeps_the_current_run_and_the_latest_others() -> None:
    status = {"rollouts": [{"namespace": "shop", "name": "reviews", "canaryRevision": "c2"}]}
    old = [{"rollout": "shop/reviews", "canaryRevision": "c1", "at": i} for i in range(50)]
    run = [{"rollout": "shop/reviews", "canaryRevision": "c2", "at": 100 + i} for i in range(3)]
    kept = timeline(status, old + run, recent=5)
    assert [d["at"] for d in kept] == [45, 46, 47, 48, 49, 100, 101, 102]


def test_edges_put_envoys_cut_cluster_names_back_together() -> None:
    from reconciler.web.traffic import destination, edges

    assert destination({"__name__": "envoy_cluster_shop_v1_upstream_rq_total",
                        "envoy_cluster_name": "outbound|reviews"}) == ("reviews.shop", "v1")
    assert destination({"__name__": "envoy_cluster_shop_upstream_rq_total",
                        "envoy_cluster_name": "outbound|reviews"}) == ("reviews.shop", None)
    assert destination({"__name__": "envoy_cluster_upstream_rq_total",
                        "envoy_cluster_name": "outbound|reviews.shop|v2"}) == ("reviews.shop", "v2")
    assert destination({"__name__": "envoy_cluster_shop_any_upstream_rq_total",
                        "envoy_cluster_name": "eastwest|reviews"}) is None
    def series(name: str, cluster: str, value: str, **labels: str) -> dict[str, Any]:
        return {"metric": {"__name__": f"envoy_cluster_{name}", "envoy_cluster_name": cluster, **labels},
                "value": [0, value]}

    totals = [series("shop_v1_upstream_rq_total", "outbound|reviews", "2.5", kind="sidecar", service="frontend",
                     version="v1"),
              series("shop_v2_upstream_rq_total", "outbound|reviews", "0", kind="ingress"),
              series("shop_upstream_rq_total", "outbound|frontend", "4", kind="ingress")]
    errors = [series("shop_v1_upstream_rq_5xx", "outbound|reviews", "0.5", kind="sidecar", service="frontend",
                     version="v1")]
    assert edges(totals, errors, cluster="east") == [
        {"cluster": "east", "from": "ingress", "to": "frontend.shop", "version": None, "rps": 4.0, "errorRps": 0.0},
        {"cluster": "east", "from": "frontend v1", "to": "reviews.shop", "version": "v1", "rps": 2.5,
         "errorRps": 0.5},
    ]  # the idle edge (ingress -> reviews v2) is left out
