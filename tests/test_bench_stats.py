"""The benchmark's reading of its rounds (bench/tcpbench.py): pure logic, no root."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "tcpbench.py"


@pytest.fixture(scope="module")
def tcpbench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("tcpbench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tcpbench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("tcpbench", None)


def coverage(n: int, k: int) -> float:
    """P(the k-th and (n-k+1)-th of n draws bracket the median), any continuous law."""
    return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n


@pytest.mark.parametrize("n", range(1, 40))
def test_the_median_interval_is_the_narrowest_with_95_percent_coverage(tcpbench, n: int) -> None:
    values = [float(v) for v in random.Random(n).sample(range(1000), n)]
    interval = tcpbench.median_interval(values)
    ordered = sorted(values)
    if n < 6:
        # Even the whole range covers the median with less than 95 %.
        assert coverage(n, 1) < 0.95
        assert interval is None
        return
    assert interval is not None
    k = ordered.index(interval[0]) + 1
    assert interval[1] == ordered[n - k]
    assert coverage(n, k) >= 0.95
    assert coverage(n, k + 1) < 0.95 or k + 1 > n // 2


def test_the_interval_covers_the_true_median_as_often_as_it_says(tcpbench) -> None:
    rng = random.Random(7)
    # Skewed rounds, as on a shared machine: most near 0.86, a few dragged far off.
    trials, hits = 2000, 0
    samples = [
        0.86 + rng.gauss(0, 0.03) - (0.2 if rng.random() < 0.1 else 0) for _ in range(200_000)
    ]
    true_median = sorted(samples)[len(samples) // 2]
    for _ in range(trials):
        lo, hi = tcpbench.median_interval(rng.sample(samples, 15))
        hits += lo <= true_median <= hi
    assert hits / trials >= 0.94


@pytest.fixture(scope="module")
def toggle(tcpbench):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("toggle", BENCH.with_name("toggle.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_toggle_summary_reads_one_where_nothing_changes(toggle) -> None:
    """Two windows of the same load, as noisy as bulk's on this VM (sd 0.15):
    their ratio's arithmetic mean reads above 1, the geometric mean does not."""
    rng = random.Random(11)
    rates = [rng.lognormvariate(0, 0.11) for _ in range(20_000)]
    ratios = [on / off for on, off in zip(rates[::2], rates[1::2], strict=True)]
    geomean, low, high = toggle.geometric_mean_interval(ratios)
    assert low < 1 < high
    assert abs(geomean - 1) < 0.005
    assert sum(ratios) / len(ratios) > 1.01  # why the mean is not used


def test_the_toggle_interval_finds_a_one_percent_cost(toggle) -> None:
    rng = random.Random(12)
    ratios = [0.99 * rng.lognormvariate(0, 0.05) for _ in range(2400)]
    geomean, low, high = toggle.geometric_mean_interval(ratios)
    assert low < 0.99 < high
    assert abs(geomean - 0.99) < 0.002
    assert high < 0.995
