"""bench/throughput.py's bookkeeping (the launches themselves take minutes: run the script, not a test): warm-up
epochs are not counted, images/s is images over time (not a mean of per-epoch rates), the ratios pair rounds."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.throughput import FEEDS, Synthetic, ratios, schedule, summarise  # noqa: E402


def test_schedule_alternates_feeds_with_one_warm_up_each():
    assert schedule(2) == ["loader", "synthetic"] * 3


def test_summary_skips_the_warm_up_and_weights_by_time():
    got = summarise({"loader": [(100.0, 10), (1.0, 10), (3.0, 30)], "synthetic": [(5.0, 10), (2.0, 40)]})
    assert got["loader"]["images_per_s"] == pytest.approx(40 / 4.0)
    assert got["loader"]["per_epoch"] == [10.0, 10.0]
    assert got["synthetic"]["images_per_s"] == pytest.approx(20.0)


def test_ratios_are_of_medians_and_per_round():
    run = lambda a, b: {"loader": {"images_per_s": a}, "synthetic": {"images_per_s": b}}  # noqa: E731
    rows = {"bare": [run(100, 200), run(110, 190)], "none": [run(95, 180), run(99, 190)],
            "mars-pgm": [run(90, 171), run(99, 190)]}
    got = ratios(rows)
    assert set(got) == set(FEEDS)
    assert got["loader"]["none_vs_bare"] == pytest.approx(97 / 105)
    assert got["synthetic"]["pgm_vs_none_per_round"] == pytest.approx([171 / 180, 1.0])


def test_synthetic_feed_is_one_batch_n_times():
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    feed = Synthetic(x, y, 3)
    assert len(feed) == 3 and all(a is x and b is y for a, b in feed)
