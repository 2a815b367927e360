"""bench/dataplane.py's pure helpers: percentiles, medians and ratios, and the parsing of what the native
clients (bench/openloop.c, wrk, h2load) print. The bench is a script, not a package: loaded by path."""

from __future__ import annotations

import importlib.util
import math
import random
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[3] / "bench" / "dataplane.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockgate_bench_dataplane", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


dp = _load()

WRK = """\
Running 1s test @ http://127.0.0.1:50029/x
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.05ms    6.22ms  47.39ms   91.90%
    Req/Sec     4.25k     3.00k    9.39k    70.00%
  4276 requests in 1.01s, 676.55KB read
Requests/sec:   4245.16
Transfer/sec:    671.67KB
"""

H2LOAD = """\
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 1.00s, 1808.00 req/s, 80.32KB/s
requests: 1808 total, 1872 started, 1808 done, 1808 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 1808 2xx, 0 3xx, 0 4xx, 0 5xx
"""


# --- percentile -------------------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=300),
       st.floats(min_value=0.001, max_value=1.0))
def test_percentile_is_the_nearest_rank(values: list[float], q: float) -> None:
    """The definition, checked directly: a sample, with at least ceil(q n) samples at or below it and fewer
    than that strictly below it."""
    ordered = sorted(values)
    p = dp.percentile(ordered, q)
    need = math.ceil(q * len(ordered))
    assert p in ordered
    assert sum(v <= p for v in ordered) >= need
    assert sum(v < p for v in ordered) < need


def test_percentile_examples() -> None:
    hundred = [float(i) for i in range(1, 101)]
    assert dp.percentile(hundred, 0.99) == 99.0
    assert dp.percentile(hundred, 0.50) == 50.0
    assert dp.percentile(hundred, 1.0) == 100.0
    assert dp.percentile([7.0], 0.99) == 7.0
    assert dp.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0  # no interpolation to 2.5


@pytest.mark.parametrize("q", [0.0, -0.5, 1.5])
def test_percentile_refuses_a_q_outside_0_1(q: float) -> None:
    with pytest.raises(ValueError):
        dp.percentile([1.0, 2.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        dp.percentile([], 0.5)


# --- openloop output --------------------------------------------------------------------------------


def test_parse_openloop_converts_ns_to_sorted_us() -> None:
    rng = random.Random(15)
    ns = [rng.randrange(10_000, 5_000_000) for _ in range(500)]
    text = f"openloop n={len(ns)} errors=3 late=2 max_lag_us=1234.5\n" + "".join(f"{v}\n" for v in ns)
    run = dp.parse_openloop(text)
    assert run.latencies_us == tuple(sorted(v / 1000 for v in ns))
    assert (run.errors, run.late, run.max_lag_us) == (3, 2, 1234.5)
    s = run.summary()
    assert s["p50"] == dp.percentile(sorted(v / 1000 for v in ns), 0.5)
    assert s["p99"] >= s["p90"] >= s["p50"]
    assert (s["n"], s["errors"], s["late"]) == (500, 3, 2)


def test_parse_openloop_refuses_a_truncated_list() -> None:
    with pytest.raises(ValueError, match="announced 3"):
        dp.parse_openloop("openloop n=3 errors=0 late=0 max_lag_us=0.0\n100\n200\n")


def test_parse_openloop_refuses_other_output() -> None:
    with pytest.raises(ValueError, match="not openloop output"):
        dp.parse_openloop("usage: openloop h1|grpc ...\n")


def test_a_run_without_answers_has_no_percentiles() -> None:
    s = dp.parse_openloop("openloop n=0 errors=100 late=0 max_lag_us=0.0\n").summary()
    assert "p50" not in s and s["errors"] == 100


# --- wrk, h2load ------------------------------------------------------------------------------------


def test_parse_wrk() -> None:
    assert dp.parse_wrk(WRK) == 4245.16


def test_wrk_with_errors_gives_no_figure() -> None:
    assert dp.parse_wrk(WRK.replace("Requests/sec", "  Non-2xx or 3xx responses: 12\nRequests/sec")) is None
    assert dp.parse_wrk(WRK.replace("Requests/sec", "  Socket errors: connect 0, read 3\nRequests/sec")) is None
    assert dp.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n") is None


def test_parse_h2load() -> None:
    assert dp.parse_h2load(H2LOAD) == 1808.0


def test_h2load_with_failures_gives_no_figure() -> None:
    assert dp.parse_h2load(H2LOAD.replace("1808 succeeded, 0 failed", "1800 succeeded, 8 failed")) is None
    assert dp.parse_h2load(H2LOAD.replace("1808 done, 1808 succeeded", "0 done, 0 succeeded")) is None
    assert dp.parse_h2load("connect error\n") is None


# --- gRPC framing, medians, ratios, order -------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_grpc_frame(message: bytes) -> None:
    framed = dp.grpc_frame(message)
    flag, length = struct.unpack(">BI", framed[:5])
    assert (flag, length, framed[5:]) == (0, len(message), message)


def test_medians_and_ratios() -> None:
    runs = [{"p50": 100.0, "p99": 900.0}, {"p50": 300.0, "p99": 100.0}, {"p50": 200.0, "p99": 500.0}]
    med = dp.medians(runs, ["p50", "p99"])
    assert med == {"p50": 200.0, "p99": 500.0}  # per key: p99's median is not the p50-median run's p99
    assert dp.ratios({"p50": 210.0, "p99": 400.0}, med, ["p50", "p99"]) == pytest.approx({"p50": 1.05, "p99": 0.8})


def test_interleaved_rotates_the_first_configuration() -> None:
    order = dp.interleaved(["A", "B", "C"], 4)
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(r) == ["A", "B", "C"] for r in rounds)
    assert [r[0] for r in rounds] == ["A", "B", "C", "A"]
    assert dp.interleaved(["A", "B"], 0) == []


def test_missing_tools_names_the_debian_package() -> None:
    found = {"gcc": "/usr/bin/gcc"}
    missing = dp.missing_tools(found.get)
    assert missing == ["wrk (Debian package wrk)", "h2load (Debian package nghttp2-client)"]
    assert dp.missing_tools(lambda cmd: f"/usr/bin/{cmd}") == []
