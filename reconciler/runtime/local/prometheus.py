"""One Prometheus per cluster, and the HTTP service discovery it finds every Envoy through.

The control plane process serves discovery itself (`/sd` on the cluster's address): targets are each
proxy's stats listener (`GET /stats/prometheus` and nothing else: admin itself is on a Unix socket no
scraper or workload can reach over TCP) and the labels the rollout queries select on (service, version,
cluster, namespace, kind). Prometheus is Debian's package, started by us
with our own config and data dir under the state dir, supervised like every other child.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from mesh.names import NodeId
from reconciler.runtime.base import RuntimeStatus
from reconciler.runtime.local.supervisor import Supervised, child_env

INSTALL_HINT = ("sudo apt-get install --no-install-recommends prometheus  (or ./scripts/apt-deps); "
                "or pass --prometheus-url URL to use an existing server")
SCRAPE_INTERVAL = "1s"


class PrometheusMissing(Exception):
    """No `prometheus` binary and no --prometheus-url: rollouts could not be judged."""


CANDIDATES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")
"""Where Debian (and a manual install) put it, for when PATH does not include them."""


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or next((p for p in CANDIDATES if Path(p).is_file()), None)
    if path is None:
        raise PrometheusMissing(f"the `prometheus` binary is not installed: {INSTALL_HINT}")
    return path


Targets = Callable[[], list[dict[str, Any]]]


def scrape_targets(status: RuntimeStatus, cluster: str) -> list[dict[str, Any]]:
    """HTTP SD answer for one cluster from the runtime's status: every proxy's stats listener, labelled
    with what rollout queries select on."""
    workloads = {w.id: w for w in status.workloads}
    out = []
    for node_id, proc in sorted(status.proxies.items()):
        node = NodeId.parse(node_id)
        if node.cluster != cluster or not proc.stats:
            continue
        labels = {"__metrics_path__": "/stats/prometheus", "cluster": cluster, "node": node_id, "kind": node.kind}
        if (w := workloads.get(node_id)) is not None:
            labels |= {"service": w.service, "version": w.version, "namespace": w.namespace}
        out.append({"targets": [proc.stats], "labels": labels})
    return out


@dataclass
class DiscoveryServer:
    """GET /sd -> Prometheus HTTP SD JSON; any other path -> 404 (another method on /sd -> 405)."""

    address: str
    targets: Targets
    port: int = 0
    """0: any free port; `start` sets the one bound."""
    exporter: Callable[[], str] | None = None
    """lockgate's own metrics (Prometheus text) served at GET /metrics and listed in the SD answer as one
    more target, labelled `exporter_labels`: whatever scrapes the discovery scrapes them too."""
    exporter_labels: dict[str, str] = field(default_factory=dict)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/sd", self._sd)
        if self.exporter is not None:
            app.router.add_get("/metrics", self._metrics)
        # No access log: Prometheus asks every refresh interval (1s), which would drown the INFO log.
        # A short shutdown wait: `stop` must not hang on an answer a client stopped reading.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=30.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.address, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/sd"

    async def _sd(self, _request: web.Request) -> web.Response:
        targets = self.targets()
        if self.exporter is not None:
            targets = [*targets, {"targets": [f"{self.address}:{self.port}"],
                                  "labels": {"__metrics_path__": "/metrics", **self.exporter_labels}}]
        return web.json_response(targets)

    async def _metrics(self, _request: web.Request) -> web.Response:
        assert self.exporter is not None
        text = await asyncio.to_thread(self.exporter)  # it reads files: off the event loop
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def config(*, cluster: str, sd_url: str, scrape_interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                   "scrape_timeout": scrape_interval, "external_labels": {"lockgate_cluster": cluster}},
        "scrape_configs": [{
            "job_name": "envoy",
            "http_sd_configs": [{"url": sd_url, "refresh_interval": scrape_interval}],
        }],
    }


@dataclass
class LocalPrometheus:
    """Debian's prometheus on the cluster's loopback address, its data under the state dir."""

    cluster: str
    address: str
    port: int
    sd_url: str
    state_dir: Path
    prefix: Sequence[str] = ()
    """What it runs under (the cluster's network namespace, with --isolate-clusters)."""
    process: Supervised = field(init=False)

    def __post_init__(self) -> None:
        home = self.state_dir / "prometheus" / self.cluster
        # A data dir per lockgate process: after a SIGKILL the old Prometheus may still be shutting down
        # (it gets SIGTERM from the kernel), and two servers must never share a TSDB. Analyses look back
        # one interval only, so nothing of value is lost; old dirs are removed.
        data = home / f"data-{os.getpid()}"
        for old in home.glob("data-*"):
            if old != data:
                shutil.rmtree(old, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        cfg = home / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config(cluster=self.cluster, sd_url=self.sd_url), sort_keys=False))
        argv = [prometheus_binary(), f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                f"--web.listen-address={self.address}:{self.port}", "--storage.tsdb.retention.time=2d",
                "--log.level=warn"]
        self.process = Supervised(name=f"prometheus {self.cluster}", argv=argv, env=child_env({}),
                                  dies_with_lockgate=True, prefix=self.prefix,
                                  log_path=self.state_dir / "logs" / f"prometheus-{self.cluster}.log")

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    async def start(self) -> None:
        """Spawn only: the mesh does not wait for metrics; analyses hold until Prometheus answers."""
        await self.process.start()

    async def stop(self) -> None:
        await self.process.stop()

