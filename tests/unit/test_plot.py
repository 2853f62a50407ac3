"""`loraloop plot`: the curves PNG, with the critic's panels only when the run had a critic."""

from __future__ import annotations

import json
import struct

import pytest

from services.plot import main


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _write(run_dir, critic: bool) -> None:
    rows = []
    for step in range(1, 31):
        r = {"step": step, "reward/mean": step / 30, "actor/kl": 0.01 * step, "actor/entropy": 1.0,
             "response_length/mean": 3.0}
        if critic:
            r |= {"critic/vf_loss": 1 / step, "critic/explained_var": step / 30}
        rows.append(r)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_draws_two_rows_of_panels_and_a_third_for_a_critic(tmp_path, capsys):
    grpo, ppo = tmp_path / "grpo", tmp_path / "ppo"
    grpo.mkdir(), ppo.mkdir()
    _write(grpo, critic=False)
    _write(ppo, critic=True)
    assert main([str(grpo)]) == 0 and main([str(ppo), "--out", str(ppo / "c.png")]) == 0
    w1, h1 = _png_size(grpo / "curves.png")
    w2, h2 = _png_size(ppo / "c.png")
    assert w1 == w2 and abs(h2 / h1 - 1.5) < 0.02  # 3 rows of panels instead of 2
    assert str(grpo / "curves.png") in capsys.readouterr().out


def test_plot_refuses_a_run_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match=r"no metrics\.jsonl rows"):
        main([str(tmp_path)])
