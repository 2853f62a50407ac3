"""`loraloop bench all`: runs each benchmark once, keeps going past a failure, and writes
the page with each one's tables, plots and the machine that produced them. The benchmarks
themselves are replaced by small scripts here; each has its own smoke test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.bench import all as bench_all


def test_page_has_every_benchmark_its_tables_plots_and_failures(tmp_path, monkeypatch) -> None:
    out, page = tmp_path / "out", tmp_path / "docs" / "benchmarks.md"
    calls = []

    def fake_run(step, out_dir, quick, timeout_s):
        calls.append(step.key)
        if step.key == "broker":
            return {"key": step.key, "rc": 1, "seconds": 1.0, "cmd": "bench broker", "text": "boom\nTraceback: x"}
        for png in step.pngs:
            (out_dir / png).write_bytes(b"\x89PNG\r\n\x1a\n")
        text = f"progress 1/2\rprogress 2/2\n  trl-peer step 10/12\n{step.key} table\n  ours  peer  ratio  goal\nwrote x.json\n"
        return {"key": step.key, "rc": 0, "seconds": 2.0, "cmd": f"bench {step.bench}", "text": text}

    monkeypatch.setattr(bench_all, "run_step", fake_run)
    rc = bench_all.main(["--out", str(out), "--page", str(page), "--quick"])
    assert rc == 1  # one benchmark failed
    assert calls == [s.key for s in bench_all.STEPS]  # the others still ran, in order
    text = page.read_text()
    assert "Smoke run" in text and "cores" in text and "commit" in text
    for s in bench_all.STEPS:
        assert s.title in text
    assert "peers-tiny table" in text and "progress" not in text and "trl-peer" not in text and "wrote" not in text
    assert "**Failed.**" in text and "Traceback: x" in text
    assert "![reward-vs-time-tiny.png](../out/reward-vs-time-tiny.png)" in text
    assert (out / "all.json").is_file()


def test_only_and_arguments() -> None:
    a = bench_all.parse_args(["--out", "x", "--only", "learner,peers-tiny"])
    assert [s.key for s in a.steps] == ["peers-tiny", "learner"]
    with pytest.raises(SystemExit):
        bench_all.parse_args(["--out", "x", "--only", "nope"])
    out = subprocess.run([sys.executable, "-m", "services.cli", "bench", "all", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "docs/benchmarks.md" in out.stdout


def test_a_real_step_runs_the_benchmark_and_keeps_its_output(tmp_path) -> None:
    step = bench_all.Step("learner-help", "learner", "t", quick=["--help"])
    r = bench_all.run_step(step, tmp_path, quick=True, timeout_s=120)
    assert r["rc"] == 0 and "usage: loraloop bench learner" in (tmp_path / "learner-help.txt").read_text()
