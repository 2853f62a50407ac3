"""`loraloop bench peers`: its figures from per-step rows, the shared reward target, the
process-tree memory sampler and its arguments (the whole bench runs in
tests/e2e/test_peers_smoke.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from services.bench import peers


def _rows(rewards: list[float], dt: float, key: str = "reward/mean", t0: float = 1000.0) -> list[dict]:
    return [{"step": k + 1, key: r, "time": t0 + k * dt} for k, r in enumerate(rewards)]


def test_figures_median_step_time_and_both_ends() -> None:
    rows = _rows([0.1] * 20 + [0.5] * 10, dt=0.2)
    rows[5]["time"] += 3.0  # one slow gap (and the next one short) must not move the median
    f = peers.figures(rows, "reward/mean", "time")
    assert f["s_per_step"] == pytest.approx(0.2)
    assert f["reward_first20"] == pytest.approx(0.1) and f["reward_last5"] == pytest.approx(0.5)
    assert f["train_s"] == pytest.approx(29 * 0.2)


def test_time_to_target_is_the_first_20_step_window_at_the_target() -> None:
    rewards = [0.1] * 30 + [0.6] * 30
    # window k-19..k mean >= 0.4: needs >= 12 of 20 at 0.6 (0.1*8 + 0.6*12 = 8.0 / 20 = 0.4)
    step, secs = peers.time_to_target(_rows(rewards, dt=0.5), "reward/mean", 0.4)
    assert step == 42 and secs == pytest.approx(41 * 0.5)
    assert peers.time_to_target(_rows([0.1] * 40, dt=0.5), "reward/mean", 0.4) is None


def test_compare_uses_one_target_for_both_sides() -> None:
    ours = {"rows": _rows([0.2] * 20 + [0.6] * 40, dt=0.3), "reward_first20": 0.2, "s_per_step": 0.3}
    peer = {"rows": _rows([0.1] * 20 + [0.6] * 40, dt=0.1, key="reward_mean"), "reward_first20": 0.1,
            "s_per_step": 0.1}
    c = peers.compare(ours, peer, 0.3)
    assert c["target"] == pytest.approx(0.5)  # the higher start + the gain
    # ours: 0.2 * (20 - b) + 0.6 * b >= 0.5 * 20 at b = 15; the peer, starting lower, at b = 16
    assert c["table"]["loraloop"]["target_step"] == 35 and c["table"]["trl"]["target_step"] == 36
    assert c["table"]["loraloop"]["time_to_target_s"] == pytest.approx(34 * 0.3)
    assert c["table"]["trl"]["time_to_target_s"] == pytest.approx(35 * 0.1)
    text = peers.report({"steps": 60, "comparison": c, "loraloop": {"update_s_median": 0.1},
                         "trl": {"skipped": "test"}})
    assert "2.91" in text and "TRL: skipped -- test" in text  # 10.2 s / 3.5 s
    floor = {"median_s": 0.2, "p10_s": 0.18, "p90_s": 0.25, "cpu_bind": "0"}
    text = peers.report({"steps": 60, "comparison": c, "loraloop": {"update_s_median": 0.1},
                         "trl": {}, "floor": floor})
    line = next(x for x in text.splitlines() if x.startswith("rollout floor"))
    assert "0.200 s per batch" in line and "ours s/step / floor 1.50" in line and "floor / TRL s/step 2.00" in line
    assert "slower than TRL's whole step" in line
    assert "rollout floor: skipped -- x" in peers.report({"steps": 60, "comparison": c, "trl": {},
                                                         "loraloop": {"update_s_median": 0.1}, "floor": {"skipped": "x"}})


def test_compare_without_the_peer_has_our_side_only() -> None:
    ours = {"rows": _rows([0.2] * 30, dt=0.3), "reward_first20": 0.2}
    c = peers.compare(ours, {"skipped": "no venv"}, 0.3)
    assert set(c["table"]) == {"loraloop"} and c["table"]["loraloop"]["time_to_target_s"] is None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_tree_memory_counts_children() -> None:
    code = "import subprocess, sys, time; b = bytearray(80 << 20); " \
           "c = subprocess.Popen([sys.executable, '-c', 'b = bytearray(80 << 20); import time; time.sleep(30)']); " \
           "time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and peers.tree_rss_kb(proc.pid) < 160 << 10:
            time.sleep(0.2)
        both = peers.tree_rss_kb(proc.pid)
        assert both >= 160 << 10, both  # parent's and child's 80 MB each
        assert peers._rss_kb(proc.pid) < both - (60 << 10)
    finally:
        for c in peers._children(proc.pid):
            os.kill(c, 9)
        proc.kill()
        proc.wait()


def test_arguments() -> None:
    a = peers.parse_args(["--quick"])
    assert a.steps == 12 and a.venv_timeout <= 300 and a.floor_rounds == 5
    with pytest.raises(SystemExit):
        peers.parse_args(["--steps", "1"])
    out = subprocess.run([sys.executable, "-m", "services.cli", "bench", "peers", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--target-gain" in out.stdout and "TRL" in out.stdout


def _run(s_per_step: float, steps: int, wait: float, busy: float, gain_at: int) -> dict:
    rows = _rows([0.2] * gain_at + [0.6] * (steps - gain_at), dt=s_per_step)
    for k, r in enumerate(rows):
        r["leases/consumed"] = 32 * (k + 1)
    f = peers.figures(rows, "reward/mean", "time")
    return {"rows": rows, **f, "wait_rollout_s_median": wait, "learner_busy_s_median": busy,
            "trajectories_per_s": 32 * 8 / s_per_step}


def test_staleness_study_overlap_efficiency_and_reward_at_equal_time(monkeypatch, tmp_path) -> None:
    runs = {0: _run(0.4, 100, wait=0.25, busy=0.15, gain_at=50), 2: _run(0.26, 100, wait=0.0, busy=0.15, gain_at=50)}
    monkeypatch.setattr(peers, "run_ours", lambda work, model, steps, staleness=None, workload=None: runs[staleness])
    demo = _run(0.25, 100, wait=0.05, busy=0.2, gain_at=50)
    st = peers.staleness_study(tmp_path, tmp_path, 100, [0, 1, 2], demo)
    assert st["generation_alone_s"] == 0.25 and st["training_alone_s"] == 0.15  # from the synchronous run
    assert st["runs"][1]["overlap_efficiency"] == pytest.approx(1.0)  # 0.25 / max(0.25, 0.15)
    assert st["runs"][0]["overlap_efficiency"] == pytest.approx(1.6)
    assert st["equal_time_s"] == pytest.approx(99 * 0.25)  # the shortest run
    # at 24.75 s the synchronous run is at step 62 (0.6 since step 51): 12 of its last 20 at 0.6
    assert st["runs"][0]["reward_at_equal_time"] == pytest.approx((8 * 0.2 + 12 * 0.6) / 20)
    assert st["runs"][1]["reward_at_equal_time"] == pytest.approx(0.6)
    text = peers.staleness_report(st)
    assert "1.60" in text and "<= 1.1" in text


def test_plot_writes_a_png(tmp_path) -> None:
    res = {"curves": {"loraloop": [[k * 0.25, 0.2 + k / 200] for k in range(60)],
                      "trl": [[k * 0.1, 0.2 + k / 150] for k in range(60)]},
           "comparison": {"target": 0.5}, "steps": 60, "cores": 2}
    p = peers.plot(res, tmp_path / "r.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
