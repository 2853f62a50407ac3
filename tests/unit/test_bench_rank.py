"""`loraloop bench rank`: the figures (final reward, steps to target, medians over seeds,
the noise rule), the verdicts on the guide's claims and the page, from synthetic results
written from the definitions; then `--quick` end to end (a real model, a few steps)."""

from __future__ import annotations

import json
import math
import struct

import pytest

from services.bench import rank

STEPS, LAST, TARGET = 100, 10, 0.35
DELTA = (-0.02, 0.0, 0.02)  # each seed's last LAST steps sit this far from `hi`: std 0.02 over 3 seeds


def _curve(k: int, hi: float, delta: float) -> list[float]:
    """0.1 for k steps, then `hi`, the last LAST steps at hi + delta. The 20-step window ending
    at step n holds n - k values of hi (n - k <= 20), so its mean reaches TARGET at the first
    n with n - k >= 20 * (TARGET - 0.1) / (hi - 0.1), once the window is full (n >= 20)."""
    return [0.1] * k + [hi] * (STEPS - LAST - k) + [hi + delta] * LAST


def _runs(arm: str, rank_: int | None, lr: float, mult: float, k: int, hi: float, seeds=(0, 1, 2)) -> list[dict]:
    return [{"arm": arm, "kind": "full" if rank_ is None else "lora", "rank": rank_,
             "alpha": None if rank_ is None else 2 * rank_, "lr": lr, "mult": mult, "seed": s,
             "trainable_params": 300_000 if rank_ is None else 4096 * rank_, "load_s": 0.1, "wall_s": 10.0,
             "loadavg_1m": 0.5, "reward": _curve(k, hi, DELTA[s] if len(seeds) > 1 else 0.0),
             "gen_s": [0.05] * STEPS, "update_s": [0.1 + 0.01 * (i % 3) for i in range(STEPS)],
             "entropy": [1.0] * STEPS, "grad_norm": [0.5] * STEPS, "kl": [[1, 0.0]]} for s in seeds]


def _result(runs: list[dict]) -> dict:
    from services.stack_config import DEMO_LEARNER

    return {"benchmark": "rank", "command": "loraloop bench rank", "commit": "abc1234", "threads": 1,
            "study_s": 600.0,
            "machine": {"cpus_usable": 2, "cpu_model": "test cpu", "torch": "2", "transformers": "5", "peft": "0",
                        "loadavg_start": [0.1, 0, 0], "loadavg_end": [0.2, 0, 0]},
            "config": {"task": "arithmetic", "task_text": "the demo", "shape": "tiny", "model": "m",
                       "warm_start": {"steps": 30, "sampled_exact_match": 0.15},
                       "arms": ["r1", "r32", "full"], "mults": [1 / 3, 1.0, 3.0],
                       "rule_lr": {"lora": 1e-3, "full": 1e-4}, "seeds": [0, 1, 2], "sweep_seeds": [0],
                       "steps": STEPS, "last": LAST, "target": TARGET, "window": 20, "alpha_over_rank": 2,
                       "quick": False, "data": DEMO_LEARNER.data.model_dump(), "algo": DEMO_LEARNER.algo.model_dump(),
                       "target_modules": "all-linear"},
            "runs": runs}


def _guide_holds() -> dict:
    """r=1 learns later and ends lower than r=32; r=32 is level with full fine-tuning; every
    arm is best at its rule lr (LoRA 1e-3 = 10x full's 1e-4)."""
    return _result(
        _runs("r1", 1, 1e-3, 1.0, 60, 0.5)
        + _runs("r32", 32, 1e-3, 1.0, 20, 0.6) + _runs("full", None, 1e-4, 1.0, 20, 0.6)
        + _runs("r1", 1, 3.33333e-4, 1 / 3, 80, 0.4, seeds=(0,)) + _runs("r1", 1, 3e-3, 3.0, 70, 0.45, seeds=(0,))
        + _runs("r32", 32, 3.33333e-4, 1 / 3, 30, 0.5, seeds=(0,)) + _runs("r32", 32, 3e-3, 3.0, 20, 0.55, seeds=(0,))
        + _runs("full", None, 3.33333e-5, 1 / 3, 30, 0.5, seeds=(0,))
        + _runs("full", None, 3e-4, 3.0, 25, 0.55, seeds=(0,)))


def test_arguments_quick_and_the_plan_runs_the_rule_first() -> None:
    a = rank.parse_args([])
    assert [x.name for x in a.arms] == ["r1", "r8", "r32", "full"]
    assert a.mults == pytest.approx([1 / 3, 1, 3]) and (a.seed_list, a.sweep_seed_list, a.steps) == ([0, 1, 2], [0], 500)
    assert rank.parse_args(["--sweep-seeds", ""]).sweep_seed_list == [0, 1, 2]
    q = rank.parse_args(["--quick"])
    assert ([x.name for x in q.arms], q.mults, q.seed_list, q.sweep_seed_list, q.steps) == (
        ["r1", "full"], [1.0, 3.0], [0, 1], [0], 6)
    specs = rank.plan(a.arms, a.mults, [0, 1, 2], [0], {"lora": 1e-3, "full": 1e-4})
    assert len(specs) == 4 * 3 + 4 * 2 * 1  # every arm x 3 seeds at x1, then x1/3 and x3 at seed 0
    assert all(s.mult == 1 for s in specs[:12]) and {s.seed for s in specs[12:]} == {0}
    full = [s.lr for s in specs if s.arm.rank is None]
    assert full[:3] == [1e-4] * 3 and sorted(full[3:]) == [3.33333e-5, 3e-4]  # 6 significant digits
    assert rank.Arm.parse("r8") == rank.Arm.parse("8") == rank.Arm(8) and rank.Arm.parse("full").kind == "full"
    assert [rank.mult_label(m) for m in (1 / 3, 1.0, 3.0)] == ["x1/3", "x1", "x3"]
    for bad in (["--ranks", "0"], ["--lr-mult", "0"], ["--steps", "5", "--last", "6"], ["--seeds", ""]):
        with pytest.raises(SystemExit):
            rank.parse_args(bad)


def test_final_reward_and_steps_to_target_from_their_definitions() -> None:
    r = _curve(50, 0.6, 0.0)
    assert rank.final_reward(r, LAST) == pytest.approx(0.6)
    assert rank.final_reward([0.0] * 90 + [0.5] * 5 + [1.0] * 5, 10) == pytest.approx(0.75)
    # window mean >= 0.35 needs n - 50 >= 20 * 0.25 / 0.5 = 10 values of 0.6: step 60
    assert rank.steps_to_target(r, TARGET) == 60
    # a jump at step 1 still needs a full 20-step window: step 20 is the first
    assert rank.steps_to_target([0.9] * 30, TARGET) == 20
    assert rank.steps_to_target([0.1] * 100, TARGET) is None
    assert rank.moving_mean([1.0, 2.0, 3.0, 4.0], 2) == pytest.approx([1.0, 1.5, 2.5, 3.5])


def test_median_over_seeds_counts_a_miss_as_never() -> None:
    assert rank.median_steps([100, None, 200]) == 200
    assert rank.median_steps([None, None, 5]) is None
    assert rank.median_steps([10, 20]) == 15 and rank.median_steps([10, None]) is None
    assert rank.compare_steps(100, 110) == "same" and rank.compare_steps(111, 100) == "slower"
    assert rank.compare_steps(None, 100) == "slower" and rank.compare_steps(90, None) == "faster"
    assert rank.compare_steps(None, None) == "neither"


def test_summary_rows_per_arm_and_lr() -> None:
    rows = rank.summarise(_guide_holds())
    assert [(r["arm"], r["mult"]) for r in rows][:3] == [("r1", 1 / 3), ("r1", 1.0), ("r1", 3.0)]
    r1 = next(r for r in rows if r["arm"] == "r1" and r["mult"] == 1.0)
    assert r1["n"] == 3 and r1["seeds"] == [0, 1, 2]
    assert r1["final_mean"] == pytest.approx(0.5) and r1["final_std"] == pytest.approx(0.02)
    # 20 * 0.25 / 0.4 = 12.5 -> 13 values of 0.5 after step 60: step 73, every seed
    assert r1["target_steps"] == [73, 73, 73] and r1["target_median"] == 73 and r1["reached"] == 3
    assert r1["s_per_step"] == pytest.approx(0.05 + 0.11) and r1["update_s"] == pytest.approx(0.11)
    one = next(r for r in rows if r["arm"] == "r1" and r["mult"] == 3.0)
    assert one["n"] == 1 and one["final_std"] is None and one["final_mean"] == pytest.approx(0.45)


def test_noise_rule_pools_each_arms_std() -> None:
    rows = rank.summarise(_guide_holds())
    assert rank.arm_std(rows, "r1") == pytest.approx(0.02)  # only its x1 row has >= 2 seeds
    r1, r32 = (next(r for r in rows if r["arm"] == a and r["mult"] == 1.0) for a in ("r1", "r32"))
    # 0.5 vs 0.6: 2 x sqrt(0.02^2/3 + 0.02^2/3) = 0.033 < 0.1
    assert rank.compare_final(r1, r32, rows) == "lower" and rank.compare_final(r32, r1, rows) == "higher"
    full = next(r for r in rows if r["arm"] == "full" and r["mult"] == 1.0)
    assert rank.compare_final(r32, full, rows) == "same"
    r32x3 = next(r for r in rows if r["arm"] == "r32" and r["mult"] == 3.0)
    # 0.55 (1 seed) vs 0.6 (3 seeds): 2 x sqrt(0.02^2/1 + 0.02^2/3) = 0.046 < 0.05
    assert rank.compare_final(r32x3, r32, rows) == "lower"
    assert rank.compare_final(r1, r32, [r1, r32]) is not None
    single = rank.summarise(_result(_runs("r1", 1, 1e-3, 1.0, 60, 0.5, seeds=(0,))
                                    + _runs("full", None, 1e-4, 1.0, 20, 0.6, seeds=(0,))))
    assert rank.compare_final(single[0], single[1], single) is None  # no seed spread anywhere


def test_findings_when_the_guide_holds() -> None:
    rows = rank.summarise(_guide_holds())
    best = rank.best_rows(rows)
    assert {a: r["mult"] for a, r in best.items()} == {"r1": 1.0, "r32": 1.0, "full": 1.0}
    text = "\n".join(rank.findings(rows))
    assert ("Too small a rank slows convergence.\"** Holds here: r=1 reached the target later than r=32 "
            "(step 73 against 30)") in text
    assert "r=1 ended lower than r=32" in text
    assert "Rank >= 32 trains almost like full fine-tuning.\"** Holds here: r=32 reached the target as soon as" in text
    assert "Raise the learning rate about 10x for LoRA.\"** Holds here" in text
    assert "r=1 was best at lr 0.001, 10x full's best" in text and "edge" not in text


def test_findings_when_the_guide_does_not_hold() -> None:
    """Full fine-tuning best at x3 (3e-4, one seed, ends 0.7 from step 20): LoRA at 10x that
    (3e-3) is worse than each rank's best, and r=32 trails full fine-tuning."""
    res = _guide_holds()
    res["runs"] = [r for r in res["runs"] if not (r["arm"] == "full" and r["mult"] == 3.0)]
    res["runs"] += _runs("full", None, 3e-4, 3.0, 10, 0.7, seeds=(0,))
    rows = rank.summarise(res)
    text = "\n".join(rank.findings(rows))
    assert "Raise the learning rate about 10x for LoRA.\"** Does not hold here" in text
    assert "Full fine-tuning was best at lr 0.0003 (at the edge of its sweep" in text
    assert "r=32 was best at lr 0.001, 3.33x full's best; at 10x full's best (0.003) it ended at 0.550 (1 seed), lower" in text
    # steps: full's window is first full at step 20, with 10 values of 0.7: mean 0.4 >= 0.35;
    # r=32 reaches it at step 30 (10 values of 0.6 after step 20)
    assert "Rank >= 32 trains almost like full fine-tuning.\"** Does not hold here: r=32 reached the target later" in text
    assert "r=32 ended lower than full fine-tuning" in text


def test_page_table_and_figure_from_json(tmp_path, capsys) -> None:
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(_guide_holds()))
    page = tmp_path / "docs" / "lora-rank.md"
    assert rank.main(["--from-json", str(src), "--out", str(page)]) == 0
    text = page.read_text()
    assert "![reward curves per arm and learning rate](lora-rank.png)" in text and "](lora-rank.json)" in text
    assert "| r=1, alpha=2 | 4,096 | 0.001 | x1 (rule) | 0,1,2 | **0.500 ± 0.020** | 73 | 3/3 | 0.160 | 0.110 |" in text
    # 20 * 0.25 / 0.45 = 11.1 -> 12 values of 0.55 after step 25: step 37
    assert "| full | 300,000 | 0.0003 | x3 | 0 | 0.550 (1 seed) | 37 | 1/1 |" in text
    assert "Seeds**: 0, 1, 2 at the rule's lr; 0 at x1/3, x3" in text and "Smoke run" not in text
    assert "same budget of steps and samples" in text and "`Trainer.step`" in text and "alpha = 2 x rank" in text
    assert json.loads((tmp_path / "docs" / "lora-rank.json").read_text()) == _guide_holds()
    head = (tmp_path / "docs" / "lora-rank.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 800
    assert "Holds here" in capsys.readouterr().out


def test_quick_end_to_end(tmp_path) -> None:
    """The real harness: the demo model built and warm-started once, 6 runs of 6 steps
    (~30 s here). At one seed every arm samples the same first batch."""
    page = tmp_path / "docs" / "lora-rank.md"
    assert rank.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(page)]) == 0
    res = json.loads(page.with_suffix(".json").read_text())
    runs = res["runs"]
    assert [(r["arm"], r["mult"], r["seed"]) for r in runs] == [
        ("r1", 1.0, 0), ("r1", 1.0, 1), ("full", 1.0, 0), ("full", 1.0, 1), ("r1", 3.0, 0), ("full", 3.0, 0)]
    assert all(len(r["reward"]) == len(r["update_s"]) == 6 for r in runs)
    assert all(0.0 <= x <= 1.0 for r in runs for x in r["reward"])
    first = {(r["arm"], r["lr"], r["seed"]): r["reward"][0] for r in runs}
    assert first[("r1", 1e-3, 0)] == first[("full", 1e-4, 0)] == first[("r1", 3e-3, 0)]
    assert runs[0]["trainable_params"] == 4096 and runs[2]["trainable_params"] > 250_000
    assert all(math.isfinite(x) for r in runs for x in r["grad_norm"])
    assert "Smoke run" in page.read_text() and page.with_suffix(".png").is_file()
