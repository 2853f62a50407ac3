"""`loraloop bench update`: its arguments, the demo-shaped batch, and its report."""

from __future__ import annotations

import pytest

from services.bench import update


def test_args_and_quick():
    a = update.parse_args([])
    assert (a.rounds, a.threads, a.shape) == (30, 1, "tiny")
    assert update.parse_args(["--quick"]).rounds == 5
    with pytest.raises(SystemExit):
        update.parse_args(["--rounds", "0"])


def test_demo_batch_has_the_demo_shape_and_whole_groups():
    b = update.demo_batch(groups=32, samples=8, prompt=5, response=3)
    assert b.size == 256 and tuple(b.input_ids.shape) == (256, 8)
    assert int(b.response_mask.sum()) == 256 * 3
    r = b.rewards.view(32, 8)
    assert bool((r.std(1) > 0).all())  # every group has a reward signal


def test_report_names_both_sides_the_ratio_and_the_goal():
    r = {"shape": "tiny", "threads": 1, "rounds": 5, "batch": {"rows": 256, "tokens_per_row": 8},
         "median_s": {"ours": 0.12, "plain": 0.1}, "ratio": 1.2, "goal": 1.2, "met": True}
    text = update.report(r)
    assert "120.0 ms" in text and "100.0 ms" in text and "1.20x" in text and "met" in text
    r.update(ratio=1.5, met=False)
    assert "MISSED" in update.report(r)
