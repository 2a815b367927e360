"""The Prometheus provider against a real Prometheus (Debian's package) scraping real Envoys, found
through lockgate's HTTP service discovery: the built-in metrics, "no values found", and going offline."""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mesh.probe import wait_http
from mesh.xds.snapshot import HCM, Snapshot
from reconciler.runtime.local.prometheus import DiscoveryServer, LocalPrometheus
from rollouts.advance import Decision, Observations, RolloutState, advance
from rollouts.analysis import BUILTIN_QUERIES, REQUESTS_QUERY, WINDOW_SELECTOR, observe, render_query
from rollouts.intent import RolloutSpec
from rollouts.provider import NoValuesFound, PrometheusProvider, ProviderError
from tests.fixtures import waiting

if TYPE_CHECKING:
    from conftest import ControlPlane, EnvoyProcess

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus missing")]

LOOPBACK = "127.0.0.1"
ADS = {"ads": {}, "resource_api_version": "V3"}
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class _Flaky(BaseHTTPRequestHandler):
    """Answers 500 to every `every`-th request (0: never): a deterministic failure rate."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    every = 0
    count = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            type(self).count += 1
            fail = self.every and self.count % self.every == 0
        body = b"fail" if fail else b"ok"
        self.send_response(500 if fail else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(every: int) -> int:
        handler = type(f"Flaky{every}", (_Flaky,), {"every": every, "count": 0})
        server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


wait_for = functools.partial(waiting.wait_for, interval=0.2, tolerate=(NoValuesFound, ProviderError, OSError))
"""A query's answer: no series yet, or Prometheus still starting, is "not yet"."""


def inbound(listen: int, app_port: int) -> Snapshot:
    """What a sidecar's inbound side looks like: listener `inbound` -> the app."""
    hcm = {"@type": HCM, "stat_prefix": "inbound", "rds": {"route_config_name": "inbound", "config_source": ADS},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}
    return Snapshot.of(
        listeners=[{"name": "inbound", "address": {"socket_address": {"address": LOOPBACK, "port_value": listen}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                    "typed_config": hcm}]}]}],
        routes=[{"name": "inbound", "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]}],
        clusters=[{"name": "app", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": LOOPBACK, "port_value": app_port}}}}]}]}}],
    )


def send(port: int, n: int) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    for _ in range(n):
        conn.request("GET", "/")
        conn.getresponse().read()
    conn.close()


def test_builtin_metrics_from_real_envoys_through_real_prometheus(
    control_plane: ControlPlane, envoy: Any, app: Any, tmp_path: Path
) -> None:
    from conftest import free_port

    proxies: dict[str, tuple[EnvoyProcess, int]] = {}
    for version, every in (("v1", 0), ("v2", 5)):  # v2 fails every 5th request: 80% success
        node = f"reviews-{version}-0"
        listen = free_port()
        control_plane.set(node, inbound(listen, app(every)))
        proc = envoy(node_id=node, xds_port=control_plane.port)
        proxies[version] = (proc, listen)

    targets = [{"targets": [f"{LOOPBACK}:{proc.stats_port}"], "labels": {
        "__metrics_path__": "/stats/prometheus", "cluster": "east", "kind": "sidecar", "service": "reviews",
        "version": version, "namespace": "shop"}} for version, (proc, _) in proxies.items()]
    sd = DiscoveryServer(address=LOOPBACK, targets=lambda: targets)
    control_plane.run(sd.start())
    prom = LocalPrometheus(cluster="east", address=LOOPBACK, port=free_port(), sd_url=sd.url, state_dir=tmp_path)
    provider = PrometheusProvider(prom.url, timeout=1.0)
    control_plane.run(prom.start())
    try:
        control_plane.run(wait_http(f"{prom.url}/-/ready", timeout=30), timeout=40)
        assert provider.is_online()
        for _version, (_proc, listen) in proxies.items():
            # Any answer ends the wait, so no request that reached the sidecar is repeated: each one counts below.
            control_plane.run(wait_http(f"http://{LOOPBACK}:{listen}/", timeout=30, attempt_timeout=5,
                                        ok=lambda _status, _body: True), timeout=40)

        def scraped(version: str) -> float:
            return provider.query(
                f'sum(envoy_http_downstream_rq_total{{version="{version}",envoy_http_conn_manager_prefix="inbound"}})')

        # A counter's first sample is not an increase: let Prometheus see both sidecars before the traffic.
        wait_for("both sidecars discovered and scraped", lambda: scraped("v1") >= 1 and scraped("v2") >= 1)
        send(proxies["v1"][1], 99)
        send(proxies["v2"][1], 99)  # requests 2..100 of v2: every 5th answered 500, 20 of 99
        wait_for("the traffic scraped", lambda: scraped("v1") >= 100 and scraped("v2") >= 100)

        spec = RolloutSpec.model_validate({"service": "reviews", "stable": "v1", "canary": "v2", "interval": "60s",
                                           "analysis": {"minRequests": 50, "metrics": [
                                               {"name": "ok", "builtin": "request-success-rate", "min": 99},
                                               {"name": "p99", "builtin": "request-duration-p99", "max": 500},
                                               {"name": "custom", "max": 1000, "query": (
                                                   'sum(envoy_http_downstream_rq_total{service="{{ service }}",'
                                                   'version="{{ version }}",cluster="{{ cluster }}",'
                                                   'envoy_http_conn_manager_prefix="inbound"})')}]}})
        variables = {"service": "reviews", "namespace": "shop", "cluster": "east", "interval": "60s"}
        v2 = observe(spec=spec, namespace="shop", canary="v2", providers={"east": provider})
        assert v2.online and v2.errors == {}
        assert v2.requests["east"] is not None and v2.requests["east"] >= 50
        assert v2.values["ok"]["east"] == pytest.approx(100 * (1 - 20 / 99), abs=0.5)  # the canary's own inbound
        assert v2.values["custom"]["east"] == 100
        v1 = observe(spec=spec, namespace="shop", canary="v1", providers={"east": provider})
        assert v1.values["ok"]["east"] == pytest.approx(100.0)

        # An idle or absent canary: typed "no values found", never a made-up number.
        absent = {**variables, "version": "v9"}
        with pytest.raises(NoValuesFound):
            provider.query(render_query(BUILTIN_QUERIES["request-success-rate"], absent))
        with pytest.raises(NoValuesFound):
            provider.query(render_query(REQUESTS_QUERY, absent))
        with pytest.raises(ProviderError):
            provider.query("sum(")  # a bad query is an error, not "no data"

        # Prometheus gone: offline within the timeout, and an analysis says so instead of judging.
        control_plane.run(prom.stop())
        t0 = time.monotonic()
        assert not provider.is_online()
        assert observe(spec=spec, namespace="shop", canary="v2", providers={"east": provider}).online is False
        with pytest.raises(ProviderError):
            provider.query(render_query(REQUESTS_QUERY, {**variables, "version": "v2"}))
        assert time.monotonic() - t0 < 10
    finally:
        control_plane.run(prom.stop())
        control_plane.run(sd.stop())
        provider.close()


class _Load:
    """Requests at a steady pace to one sidecar listener, until stopped (errors ignored: Prometheus is what
    restarts here, not the sidecar)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, http.client.HTTPException):
                send(self.port, 5)
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_a_window_prometheus_has_only_part_of_is_never_judged(
    control_plane: ControlPlane, envoy: Any, app: Any, tmp_path: Path
) -> None:
    """A new target, then a SIGKILLed Prometheus restarted by its supervisor (its data kept): each time the
    analysis is no-data until Prometheus holds a full interval of the canary's samples, then it is judged."""
    from conftest import free_port

    node, listen = "reviews-v2-0", free_port()
    control_plane.set(node, inbound(listen, app(0)))
    proc = envoy(node_id=node, xds_port=control_plane.port)
    targets = [{"targets": [f"{LOOPBACK}:{proc.stats_port}"], "labels": {
        "__metrics_path__": "/stats/prometheus", "cluster": "east", "kind": "sidecar", "service": "reviews",
        "version": "v2", "namespace": "shop", "node": node}}]
    sd = DiscoveryServer(address=LOOPBACK, targets=lambda: targets)
    control_plane.run(sd.start())
    prom = LocalPrometheus(cluster="east", address=LOOPBACK, port=free_port(), sd_url=sd.url, state_dir=tmp_path)
    provider = PrometheusProvider(prom.url, timeout=1.0)
    interval = 4.0
    spec = RolloutSpec.model_validate({"service": "reviews", "stable": "v1", "canary": "v2", "steps": [10, 50, 100],
                                       "interval": f"{interval:g}s", "analysis": {"minRequests": 20, "metrics": [
                                           {"name": "success-rate", "builtin": "request-success-rate", "min": 99}]}})
    selector = render_query(WINDOW_SELECTOR, {"service": "reviews", "version": "v2", "namespace": "shop",
                                              "cluster": "east"})
    providers = {"east": provider}

    def analysis() -> tuple[Observations, Decision]:
        now = time.time()
        state = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", step=0, weight=10,
                             started_at=now - 60, next_analysis_at=now)
        obs = observe(spec=spec, namespace="shop", canary="v2", providers=providers)
        return obs, advance(spec, state, obs, now=now)

    def sample_times() -> tuple[float, ...]:
        series = provider.samples(selector, seconds=120).series
        return next(iter(series.values())) if series else ()

    load = _Load(listen)
    control_plane.run(prom.start())
    try:
        control_plane.run(wait_http(f"{prom.url}/-/ready", timeout=30), timeout=40)
        # (1) A new target: right after its first sample, the window is partial and nothing is judged.
        first = wait_for("the sidecar's first sample", lambda: sample_times()[:1], timeout=30)[0]
        obs, d = analysis()
        assert time.time() - first < interval - 1.5  # still early: this analysis must not judge
        assert "east" in obs.partial and obs.partial["east"].covered < interval, obs
        assert d.action == "hold" and d.state.step == 0, d
        assert all(c.result == "no-data" for c in d.checks), d.checks
        assert any("of 4 s of data (Prometheus restarted or the target is new)" in c.detail for c in d.checks), d
        # ...and once Prometheus holds a full interval of it, the analysis is judged (and passes).
        obs, d = wait_for("a full window", lambda: (r := analysis())[0].partial == {} and r, timeout=30)
        assert time.time() - sample_times()[0] >= interval - 1.5  # not before (a sample vouches for 1.1 s)
        assert d.action == "step" and d.state.weight == 50, d.reasons
        assert obs.requests["east"] is not None and obs.requests["east"] >= 20

        # (2) Prometheus SIGKILLed mid-run and restarted by its supervisor, its data dir kept: partial again.
        old = prom.process.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for("prometheus restarted", lambda: prom.process.pid not in (None, old), timeout=15)
        restarted = time.time()
        wait_for("prometheus ready again", lambda: provider.is_online(), timeout=30)
        seen: list[tuple[float, Observations, Decision]] = []

        def judged_again() -> bool:
            obs, d = analysis()
            seen.append((time.time(), obs, d))
            return obs.partial == {}

        wait_for("a full window after the restart", judged_again, timeout=40)
        early = [(t, o, d) for t, o, d in seen if t < restarted + interval]
        assert early, "no analysis within one interval of the restart"
        for _t, o, d in early:
            assert "east" in o.partial and d.action == "hold", (o, d.reasons)
            assert all("s of 4 s of data" in c.detail for c in d.checks), d.checks
        assert all(d.action == "hold" for _t, o, d in seen if o.partial)
        assert seen[-1][2].action == "step", seen[-1][2].reasons
        assert seen[-1][0] - restarted >= interval  # the new samples alone make a full window
    finally:
        load.close()
        control_plane.run(prom.stop())
        control_plane.run(sd.stop())
        provider.close()


class _Slow(BaseHTTPRequestHandler):
    """Answers 200 after `delay` seconds: a version a few milliseconds slower than another."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    delay = 0.0

    def do_GET(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_compare_reads_canary_and_stable_series_at_the_scrape_step(
    control_plane: ControlPlane, envoy: Any, tmp_path: Path
) -> None:
    """Two sidecars, the canary's app 6 ms slower: the range queries give one p99 per scrape for each
    version, and the comparison fails the canary against the stable, then passes the stable against itself."""
    from conftest import free_port

    servers: list[ThreadingHTTPServer] = []
    proxies: dict[str, tuple[EnvoyProcess, int]] = {}
    for version, delay in (("v1", 0.0), ("v2", 0.006)):
        server = ThreadingHTTPServer((LOOPBACK, 0), type(f"Slow{version}", (_Slow,), {"delay": delay}))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        node, listen = f"reviews-{version}-0", free_port()
        control_plane.set(node, inbound(listen, int(server.server_address[1])))
        proxies[version] = (envoy(node_id=node, xds_port=control_plane.port), listen)
    targets = [{"targets": [f"{LOOPBACK}:{proc.stats_port}"], "labels": {
        "__metrics_path__": "/stats/prometheus", "cluster": "east", "kind": "sidecar", "service": "reviews",
        "version": version, "namespace": "shop"}} for version, (proc, _) in proxies.items()]
    sd = DiscoveryServer(address=LOOPBACK, targets=lambda: targets)
    control_plane.run(sd.start())
    prom = LocalPrometheus(cluster="east", address=LOOPBACK, port=free_port(), sd_url=sd.url, state_dir=tmp_path)
    provider = PrometheusProvider(prom.url, timeout=1.0)
    interval = 6.0
    spec = RolloutSpec.model_validate({
        "service": "reviews", "stable": "v1", "canary": "v2", "interval": f"{interval:g}s",
        "analysis": {"minRequests": 20, "metrics": [
            {"name": "latency", "builtin": "request-duration-p99",
             "compare": {"baseline": "stable", "maxIncrease": "20%", "confidence": 0.98}},
            {"name": "errors", "builtin": "request-success-rate",
             "compare": {"baseline": "stable", "maxIncrease": "20%"}}]}})
    loads: list[_Load] = []
    control_plane.run(prom.start())
    try:
        control_plane.run(wait_http(f"{prom.url}/-/ready", timeout=30), timeout=40)
        loads = [_Load(listen) for _, listen in proxies.values()]
        selector = render_query(WINDOW_SELECTOR, {"service": "reviews", "version": "v2", "namespace": "shop",
                                                  "cluster": "east"})
        wait_for("a full window of the canary", lambda: check_full(provider, selector, interval + 1), timeout=40)

        obs = observe(spec=spec, namespace="shop", canary="v2", stable="v1", providers={"east": provider})
        assert obs.online and obs.errors == {} and obs.partial == {}, obs
        data = obs.compared["latency"]["east"]
        assert 4 <= len(data.canary) <= 6 and 4 <= len(data.baseline) <= 6, data  # one a scrape (1 s) of 6 s
        # ms: the slow app shows in the samples as a gap between the versions (medians: one scrape of a busy
        # machine may spike). Not an absolute bound: a loaded CI machine put the stable's p99 at 9-22 ms
        # (the canary's at 24), and whatever it adds, it adds to both.
        assert statistics.median(data.canary) > statistics.median(data.baseline) + 2.0, data
        counts = obs.compared["errors"]["east"].counts
        assert counts is not None and counts[0] == 0 and counts[2] == 0 and counts[1] > 20 and counts[3] > 20
        state = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", step=3,
                             weight=100, started_at=time.time() - 60, next_analysis_at=time.time())
        d = advance(spec, state, obs, now=time.time())
        by = {c.metric: c for c in d.checks}
        assert by["latency"].result == "fail" and by["errors"].result == "pass", d.reasons
        assert d.action == "hold" and "Mann-Whitney U=" in d.reasons[0], d.reasons

        same = observe(spec=spec, namespace="shop", canary="v1", stable="v1", providers={"east": provider})
        assert same.compared["latency"]["east"].canary == same.compared["latency"]["east"].baseline
        d = advance(spec, state.model_copy(update={"canary": "v1"}), same, now=time.time())
        assert all(c.result == "pass" for c in d.checks), d.reasons
    finally:
        for load in loads:
            load.close()
        control_plane.run(prom.stop())
        control_plane.run(sd.stop())
        provider.close()
        for server in servers:
            server.shutdown()
            server.server_close()


def check_full(provider: PrometheusProvider, selector: str, seconds: float) -> bool:
    from rollouts.analysis import check_window

    check_window(provider.samples(selector, seconds=seconds + 30), window_s=seconds)
    return True
