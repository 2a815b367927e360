"""`lockgate k8s crds|install|inject` through the real command line: YAML on stdout, notes on stderr, and
every error as one line with exit 2."""

from __future__ import annotations

import datetime as dt
import importlib.machinery
import io
import sys
import types
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from multicluster import ca
from reconciler.cli import k8s as k8s_cli
from reconciler.cli.main import main
from reconciler.k8s.install import install_documents

NOW = dt.datetime.now(dt.UTC)
HAVE_INJECT = find_spec("reconciler.k8s.inject") is not None
DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "reviews", "namespace": "shop"},
              "spec": {"selector": {"matchLabels": {"app": "reviews"}},
                       "template": {"metadata": {"labels": {"app": "reviews"}},
                                    "spec": {"containers": [{"name": "app", "image": "reviews:1"}]}}}}


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("state") / ".lockgate" / "ca"
    ca.init_root(out / "root", now=NOW)
    ca.init_cluster(out / "root", "east", out / "east", now=NOW)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["k8s", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2
    assert out == ""
    assert err.startswith("lockgate: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_install_prints_the_documents_as_multi_document_yaml(capsys: pytest.CaptureFixture[str], ca_dir: Path) -> None:
    code, out, err = run(capsys, "install", "--cluster", "east", "--ca", str(ca_dir), "--image", "reg/lockgate:1")
    assert code == 0
    printed = list(yaml.safe_load_all(out))
    assert printed == install_documents(cluster="east", ca_dir=ca_dir, image="reg/lockgate:1", prometheus=None,
                                        now=NOW)
    assert out.startswith("---\n") and out.count("\n---\n") == len(printed) - 1
    # No Prometheus: stderr says how the sidecars can be scraped, stdout stays pure YAML.
    assert "prometheus.io/port" in err and "15090" in err and "/stats/prometheus" in err and "--pod-monitor" in err


def test_install_is_deterministic_across_runs(capsys: pytest.CaptureFixture[str], ca_dir: Path) -> None:
    outputs = {run(capsys, "install", "--cluster", "east", "--ca", str(ca_dir), "--image", "reg/l:1",
                   "--pod-monitor")[1] for _ in range(3)}
    assert len(outputs) == 1


def test_install_flags_reach_the_manifests(capsys: pytest.CaptureFixture[str], ca_dir: Path) -> None:
    code, out, err = run(capsys, "install", "--cluster", "east", "--ca", str(ca_dir), "--image", "reg/l:2",
                         "--prometheus", "http://prometheus.monitoring:9090", "--replicas", "2", "--pod-monitor")
    assert code == 0 and err == ""  # with a Prometheus there is nothing to tell
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    assert docs["Deployment"]["spec"]["replicas"] == 2
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/l:2"
    assert container["args"][-2:] == ["--prometheus", "http://prometheus.monitoring:9090"]
    assert "PodMonitor" in docs


def test_install_defaults_to_the_state_directory_ca_and_this_versions_image(
        capsys: pytest.CaptureFixture[str], ca_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ca_dir.parent.parent)  # where .lockgate/ca is
    code, out, _ = run(capsys, "install", "--cluster", "east")
    assert code == 0
    [deployment] = [d for d in yaml.safe_load_all(out) if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/lockgate/lockgate:{version('lockgate')}"
    assert not image.endswith(":latest")


def test_install_without_the_intermediate_is_one_line_naming_the_command(
        capsys: pytest.CaptureFixture[str], ca_dir: Path) -> None:
    err = one_line_error(*run(capsys, "install", "--cluster", "west", "--ca", str(ca_dir)))
    assert "lockgate ca cluster west" in err


@pytest.mark.parametrize("argv", [["--cluster", "East"], ["--cluster", "east", "--replicas", "0"],
                                  ["--cluster", "east", "--prometheus", "prometheus:9090"]])
def test_install_refuses_bad_flags_in_one_line(capsys: pytest.CaptureFixture[str], ca_dir: Path,
                                               argv: list[str]) -> None:
    one_line_error(*run(capsys, "install", "--ca", str(ca_dir), "--image", "reg/l:1", *argv))


def test_dump_yaml_round_trips_and_is_multi_document() -> None:
    docs: list[dict[str, Any]] = [{"kind": "A", "data": {"b": "line1\nline2", "n": 1}}, {"kind": "B", "list": []}]
    text = k8s_cli.dump_yaml(docs)
    assert list(yaml.safe_load_all(text)) == docs
    assert text.count("---") == 2


def test_crds_prints_lockgate_and_kopf_crds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "crds")
    assert code == 0
    crds = list(yaml.safe_load_all(out))
    assert all(d["kind"] == "CustomResourceDefinition" for d in crds)
    groups = {d["spec"]["group"] for d in crds}
    assert groups == {"lockgate.io", "kopf.dev"}


# --- inject: the CLI's side of the contract, with a stand-in module, and with the real one when present -------


class FakeInjectConfig:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_inject(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[dict[str, Any]], FakeInjectConfig]]:
    calls: list[tuple[list[dict[str, Any]], FakeInjectConfig]] = []

    def inject_documents(docs: list[dict[str, Any]], config: FakeInjectConfig) -> list[dict[str, Any]]:
        calls.append((docs, config))
        return [{**d, "metadata": {**d["metadata"], "annotations": {"injected": "yes"}}} for d in docs]

    module = types.ModuleType("reconciler.k8s.inject")
    module.__spec__ = importlib.machinery.ModuleSpec("reconciler.k8s.inject", None)
    module.InjectConfig = FakeInjectConfig  # type: ignore[attr-defined]
    module.inject_documents = inject_documents  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reconciler.k8s.inject", module)
    return calls


def test_inject_reads_stdin_and_passes_the_flags(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                 fake_inject: list[Any]) -> None:
    text = yaml.safe_dump_all([DEPLOYMENT, None, {**DEPLOYMENT, "metadata": {"name": "ratings"}}])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, out, _ = run(capsys, "inject", "-f", "-", "--cluster", "east", "--image", "reg/l:3",
                       "--xds", "lockgate-operator.lockgate-system.svc:15010")
    assert code == 0
    [(docs, config)] = fake_inject
    assert [d["metadata"]["name"] for d in docs] == ["reviews", "ratings"]  # the empty document is dropped
    assert config.kwargs == {"cluster": "east", "image": "reg/l:3",
                             "xds": "lockgate-operator.lockgate-system.svc:15010"}
    assert [d["metadata"]["annotations"] for d in yaml.safe_load_all(out)] == [{"injected": "yes"}] * 2


def test_inject_reads_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_inject: list[Any]) -> None:
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(DEPLOYMENT))
    code, out, _ = run(capsys, "inject", "-f", str(tmp_path / "app.yaml"), "--cluster", "west")
    assert code == 0 and [d["metadata"]["name"] for d in yaml.safe_load_all(out)] == ["reviews"]
    assert fake_inject[0][1].kwargs == {"cluster": "west"}  # the image and xds address: InjectConfig's defaults


@pytest.mark.parametrize(("content", "argv"), [("a: [", []), ("- just\n- a list\n", []),
                                               (yaml.safe_dump(DEPLOYMENT), ["--xds", "no-port"])])
def test_inject_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_inject: list[Any],
                                    content: str, argv: list[str]) -> None:
    (tmp_path / "app.yaml").write_text(content)
    one_line_error(*run(capsys, "inject", "-f", str(tmp_path / "app.yaml"), "--cluster", "east", *argv))
    assert fake_inject == []


def test_inject_of_a_missing_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              fake_inject: list[Any]) -> None:
    assert "No such file" in one_line_error(*run(capsys, "inject", "-f", str(tmp_path / "nope.yaml"), "--cluster", "e"))


@pytest.mark.skipif(not HAVE_INJECT, reason="reconciler/k8s/inject.py is not in this checkout yet")
def test_inject_with_the_real_module_adds_a_container(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(DEPLOYMENT))
    code, out, err = run(capsys, "inject", "-f", str(tmp_path / "app.yaml"), "--cluster", "east")
    assert code == 0, err
    [deployment] = list(yaml.safe_load_all(out))
    assert len(deployment["spec"]["template"]["spec"]["containers"]) + len(
        deployment["spec"]["template"]["spec"].get("initContainers", [])) > 1
