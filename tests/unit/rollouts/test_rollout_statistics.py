"""The statistics of `compare` metrics, table-tested on synthetic series; scipy is the reference (tests only)."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from rollouts.statistics import (
    compare_counts,
    compare_series,
    fisher_greater,
    hodges_lehmann,
    mann_whitney_greater,
    min_p_exact,
)

R = random.Random(13)
BASE = [3.0 + R.gauss(0, 0.3) for _ in range(30)]
"""A stable's p99 per scrape: about 3 ms."""


def _near(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize(("x", "y"), [
    pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0], id="x-all-below"),
    pytest.param([6.0, 7.0, 8.0, 9.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0], id="x-all-above"),
    pytest.param([1.5, 3.5, 5.5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], id="unequal-small"),
    pytest.param([R.gauss(1, 1) for _ in range(20)], [R.gauss(0, 1) for _ in range(20)], id="exact-20x20"),
    pytest.param([R.gauss(0.3, 1) for _ in range(40)], [R.gauss(0, 1) for _ in range(35)], id="asymptotic-40x35"),
    pytest.param([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [0.0, 0.0, 1.0, 2.0, 2.0, 2.0], id="ties"),
    pytest.param([6.0] * 6, [1.0] * 6, id="constant-apart"),
    pytest.param([2.0] * 6, [2.0, 2.0, 2.0, 2.0, 2.0, 2.5], id="nearly-constant"),
])
def test_mann_whitney_matches_scipy(x: list[float], y: list[float]) -> None:
    mw = mann_whitney_greater(x, y)
    ref = stats.mannwhitneyu(x, y, alternative="greater", method=mw.method, use_continuity=True)
    assert _near(mw.u, float(ref.statistic)), (mw, ref)
    assert _near(mw.p_greater, float(ref.pvalue)), (mw, ref)
    has_ties = len(set(x) | set(y)) < len(x) + len(y)
    assert mw.method == ("asymptotic" if has_ties or max(len(x), len(y)) > 20 else "exact")


def test_known_answers_of_the_exact_test() -> None:
    """Every x above every y: the one ordering of C(10, 5) = 252; identical halves: p exactly 1/2 or more."""
    assert mann_whitney_greater([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]).p_greater == pytest.approx(1 / 252)
    assert min_p_exact(5, 5) == pytest.approx(1 / 252)
    assert mann_whitney_greater([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]).p_greater == 1.0
    assert mann_whitney_greater([1, 3], [2, 4]).u == 1.0


def test_every_value_equal_is_no_evidence() -> None:
    mw = mann_whitney_greater([4.0] * 8, [4.0] * 8)
    assert (mw.u, mw.p_greater) == (32.0, 1.0)


def test_hodges_lehmann_is_the_median_pairwise_shift() -> None:
    assert hodges_lehmann([5.0, 6.0, 7.0], [1.0, 2.0, 3.0]) == 4.0
    assert hodges_lehmann([x + 2.5 for x in BASE], BASE) == pytest.approx(2.5)
    assert hodges_lehmann([1.0, 2.0, 100.0], [1.0, 2.0, 3.0]) == 0.0  # one outlier does not move it
    x, y = BASE[:7], BASE[7:16]  # scipy has no Hodges-Lehmann: its definition, by hand
    assert hodges_lehmann(x, y) == sorted(a - b for a in x for b in y)[31]  # 63 pairs: the 32nd


@pytest.mark.parametrize(("ec", "nc", "eb", "nb"), [
    (12, 400, 3, 1600), (1, 1000, 0, 4000), (0, 300, 5, 300), (9, 100, 1, 100), (30, 50, 28, 50), (0, 10, 0, 10),
    (400, 400, 0, 1600),
])
def test_fisher_matches_scipy(ec: int, nc: int, eb: int, nb: int) -> None:
    ref = stats.fisher_exact([[ec, nc - ec], [eb, nb - eb]], alternative="greater")
    assert fisher_greater(ec, nc, eb, nb) == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-300)


# --- verdicts ---------------------------------------------------------------------------------------

CASES = [
    # (name, canary, baseline, maxIncrease, verdict)
    ("identical", BASE, BASE, 0.2, "pass"),
    ("shifted-by-3ms", [x + 3 for x in BASE], BASE, 0.2, "fail"),
    ("shifted-within-margin", [x * 1.05 for x in BASE], BASE, 0.2, "pass"),  # significant, but +5% <= +20%
    ("faster", [x - 1 for x in BASE], BASE, 0.2, "pass"),
    ("small-samples", [9.0, 9.5, 10.0], [1.0, 1.2, 1.1], 0.2, "inconclusive"),  # 1/20 can never be < 0.02
    ("four-each-reaches-significance", [9.0, 9.5, 10.0, 9.7], [1.0, 1.2, 1.1, 1.3], 0.2, "fail"),  # 1/70
    # A stable's one slow scrape among a canary's four (the e2e's first analysis): +215%, p 0.056. The
    # canary is not shown worse, nor within the margin: no pass, so the run never steps up on it.
    ("above-margin-not-yet-significant", [9.6, 10.1, 9.8, 9.7], [3.0, 3.4, 2.9, 3.1, 9.9], 0.2, "inconclusive"),
    ("within-margin-not-significant", [x * 1.1 for x in BASE[:4]], BASE[4:9], 0.2, "pass"),
    ("constant-equal", [3.0] * 10, [3.0] * 10, 0.2, "pass"),
    ("constant-apart", [6.0] * 10, [3.0] * 10, 0.2, "fail"),
    ("ties-straddling", [3.0, 3.0, 3.0, 4.0, 3.0, 3.0], [3.0, 3.0, 4.0, 3.0, 3.0, 3.0], 0.2, "pass"),
    ("no-canary-samples", [], BASE, 0.2, "inconclusive"),
    ("no-baseline-samples", BASE, [], 0.2, "inconclusive"),
    ("nan-only-canary", [math.nan] * 5, BASE, 0.2, "inconclusive"),
    ("baseline-zero", [1.0] * 8, [0.0] * 8, 0.2, "fail"),  # any increase from 0 is infinite
]


@pytest.mark.parametrize(("canary", "baseline", "margin", "verdict"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_compare_series_verdicts(canary: list[float], baseline: list[float], margin: float, verdict: str) -> None:
    c = compare_series(canary, baseline, max_increase=margin, confidence=0.98)
    assert c.verdict == verdict, c
    if c.p_value is not None:  # the reported numbers are the reference's
        kept = [v for v in canary if not math.isnan(v)]
        ref = stats.mannwhitneyu(kept, baseline, alternative="greater",
                                 method="exact" if len(set(kept) | set(baseline)) == len(kept) + len(baseline)
                                 and max(len(kept), len(baseline)) <= 20 else "asymptotic")
        assert c.p_value == pytest.approx(float(ref.pvalue), rel=1e-9)
        assert c.statistic == float(ref.statistic)
        assert (c.n_canary, c.n_baseline) == (len(kept), len(baseline))


def test_the_confidence_decides_what_is_significant() -> None:
    canary, baseline = [x + 0.3 for x in BASE[:12]], BASE[12:24]  # p about 0.04
    loose = compare_series(canary, baseline, max_increase=0.01, confidence=0.6)
    strict = compare_series(canary, baseline, max_increase=0.01, confidence=0.999)
    assert loose.p_value == strict.p_value
    assert loose.p_value is not None and 0.001 < loose.p_value < 0.4, loose
    # Strict: not significant, and +6% is above the 1% allowed, so it cannot pass either; with 50% allowed it does.
    assert (loose.verdict, strict.verdict) == ("fail", "inconclusive")
    assert compare_series(canary, baseline, max_increase=0.5, confidence=0.999).verdict == "pass"


def test_a_shift_under_min_increase_neither_fails_nor_holds() -> None:
    # The e2e's identical canary on a loaded machine: every scrape of its p99 above the stable's, +506%,
    # p 0.006, which is 2.6 ms. With minIncrease 4 (ms) that is noise; a canary 8 ms slower still fails.
    canary, stable = [3.1, 3.3, 2.9, 3.4, 3.0], [0.5, 0.6, 0.4, 0.5, 0.7]
    plain = compare_series(canary, stable, max_increase=0.2, confidence=0.98)
    floored = compare_series(canary, stable, max_increase=0.2, confidence=0.98, min_increase=4)
    assert plain.verdict == "fail", plain
    assert floored.verdict == "pass" and "<= minIncrease 4" in floored.why, floored
    assert floored.p_value == plain.p_value and floored.effect == plain.effect  # the numbers are still shown
    slow = [x + 8 for x in stable]
    assert compare_series(slow, stable, max_increase=0.2, confidence=0.98, min_increase=4).verdict == "fail"
    # Not significant and above the margin (would hold), but under the floor: passes, never waits.
    few = compare_series([9.6, 10.1, 9.8, 9.7], [3.0, 3.4, 2.9, 3.1, 9.9], max_increase=0.2, confidence=0.98)
    assert few.verdict == "inconclusive"
    assert compare_series([9.6, 10.1, 9.8, 9.7], [3.0, 3.4, 2.9, 3.1, 9.9], max_increase=0.2, confidence=0.98,
                          min_increase=7).verdict == "pass"


def test_an_error_rate_rise_under_min_increase_passes() -> None:
    def verdict(floor: float) -> str:  # 0.1% -> 0.9%: significant, +0.8 points
        return compare_counts(canary_errors=9, canary_total=1000, baseline_errors=4, baseline_total=4000,
                              max_increase=0.2, confidence=0.98, min_increase=floor).verdict

    assert (verdict(0), verdict(0.005), verdict(0.01)) == ("fail", "fail", "pass")


COUNTS = [
    # (name, canary errors/requests, baseline errors/requests, verdict)
    ("same-rate", (2, 1000), (8, 4000), "pass"),
    ("0.1%-to-0.9%", (9, 1000), (4, 4000), "fail"),
    ("one-error-from-none", (1, 1000), (0, 4000), "pass"),  # inf% but not significant
    ("no-errors", (0, 500), (0, 500), "pass"),
    ("no-baseline-requests", (3, 500), (0, 0), "inconclusive"),
    ("fractional-increase", (10.4, 999.6), (3.2, 4000.4), "fail"),  # increase() extrapolates: rounded
]


@pytest.mark.parametrize(("canary", "baseline", "verdict"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS])
def test_compare_counts_verdicts(canary: tuple[float, float], baseline: tuple[float, float], verdict: str) -> None:
    c = compare_counts(canary_errors=canary[0], canary_total=canary[1], baseline_errors=baseline[0],
                       baseline_total=baseline[1], max_increase=0.2, confidence=0.98)
    assert c.verdict == verdict, c
    if c.p_value is not None:
        ec, nc, eb, nb = (round(v) for v in (*canary, *baseline))
        ref = stats.fisher_exact([[ec, nc - ec], [eb, nb - eb]], alternative="greater")
        assert c.p_value == pytest.approx(float(ref.pvalue), rel=1e-9)
        assert c.errors == (ec, eb)


def test_rounding_noise_reads_as_zero() -> None:
    from rollouts.statistics import describe, percent, signed

    assert (signed(5.551e-17), percent(2.55e-17), signed(-0.7), percent(-0.191), percent(10.1)) == (
        "+0", "+0%", "-0.7", "-19.1%", "+1010%")
    c = compare_series([0.1 + 0.2] * 5, [0.3] * 5, max_increase=0.2, confidence=0.98)
    assert "Hodges-Lehmann +0 (+0%)" in describe(c, baseline="stable"), describe(c, baseline="stable")
