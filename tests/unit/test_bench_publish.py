"""`loraloop bench publish`: arguments and report (the measured runs: tests/integration)."""

from __future__ import annotations

import pytest

from services.bench import publish


def test_args():
    a = publish.parse_args([])
    assert (a.shape, a.ranks, a.offload) == ("0.5b", [1, 2], True)
    assert publish.parse_args(["--quick"]).shape == "tiny"
    with pytest.raises(SystemExit):
        publish.parse_args(["--ranks", "0"])


def test_report_shows_each_setting_and_a_failure_by_its_error_line():
    rank = {"rss_mb": {"loaded": 2000.0}, "update_peak_mb": 900.0, "adapter_mb": 35.2, "lora_gather_peak_mb": 36.0,
            "full_gather_peak_mb": 1500.0, "full_state_mb": 1460.0}
    r = {"shape": "0.5b", "dtype": "float32", "lora": "r16 all-linear", "settings": [
        {"ranks": 2, "offload": False, "per_rank": [rank, rank]},
        {"ranks": 1, "offload": True, "error": "Traceback...\nRuntimeError: no accelerator\nexit 1"}]}
    text = publish.report(r)
    assert "35.2" in text and "36.0" in text and "1500" in text
    assert "failed: RuntimeError: no accelerator" in text
