"""The accuracy bench's statistics (bench/paired.py): the paired 95 % t-interval against scipy's."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.paired import paired_ci, t975  # noqa: E402


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 30, 40, 100):
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1.5e-3), df


def test_paired_interval_uses_only_common_seeds_and_the_differences():
    method = {0: 0.80, 1: 0.75, 2: 0.90, 3: 0.70, 4: 0.85, 7: 0.10}  # seed 7 has no baseline: ignored
    base = {0: 0.78, 1: 0.70, 2: 0.91, 3: 0.65, 4: 0.80}
    got = paired_ci(method, base)
    d = [0.02, 0.05, -0.01, 0.05, 0.05]
    half = 2.776 * statistics.stdev(d) / math.sqrt(5)
    assert got["n"] == 5 and got["seeds"] == [0, 1, 2, 3, 4]
    assert got["mean"] == pytest.approx(statistics.mean(d))
    assert (got["lo"], got["hi"]) == pytest.approx((statistics.mean(d) - half, statistics.mean(d) + half))
    # pairing matters: the unpaired spread of either method is far wider than this interval
    assert got["hi"] - got["lo"] < statistics.stdev(base.values())
    assert paired_ci({0: 0.5}, {0: 0.4}) is None
