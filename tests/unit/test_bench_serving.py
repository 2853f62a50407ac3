"""The serving bench's own logic: rounds merged into medians, Zipf popularity, arguments."""

from __future__ import annotations

from collections import Counter

import pytest

from services.bench.serving import merge_rounds, parse_args, report, zipf_picker


def _round(tok_s: float, p50: float | None, failed: int = 0) -> dict:
    return {"tok_s": tok_s, "ttft_ms_p50": p50, "ttft_ms_p99": None if p50 is None else 2 * p50, "requests": 10,
            "failed": failed, "failures": ["boom"] * failed, "completion_tokens": 0, "seconds": 1.0}


def test_rounds_merge_into_medians_and_summed_failures():
    m = merge_rounds([_round(100.0, 50.0), _round(300.0, 70.0, failed=1), _round(200.0, None)])
    assert m["tok_s"] == 200.0 and m["ttft_ms_p50"] == 60.0 and m["ttft_ms_p99"] == 120.0
    assert m["requests"] == 30 and m["failed"] == 1 and m["failures"] == ["boom"] and len(m["rounds"]) == 3


def test_zipf_popularity_falls_with_rank():
    pick = zipf_picker(1000, seed=0)
    counts = Counter(pick(k) for k in range(20_000))
    assert set(counts) <= {f"z{k}" for k in range(1000)}
    # Zipf(1.0) over 1,000: the first name ~13% of requests, the tenth ~1.3%, most names rarely.
    assert 0.10 < counts["z0"] / 20_000 < 0.16 and counts["z0"] > 5 * counts["z9"] > 0
    assert len(counts) > 500


def test_arguments():
    a = parse_args(["--quick"])
    assert (a.models, a.zipf_models, a.rounds, a.clients) == (["tiny"], ["tiny"], 1, 8)
    a = parse_args(["--models", "25m,0.5b", "--zipf-models", ""])
    assert a.models == ["25m", "0.5b"] and a.zipf_models == [] and a.rounds == 2 and a.max_loras == 8
    with pytest.raises(SystemExit):
        parse_args(["--models", "7b"])


def _cond(tok_s: float, batch: float, clients: int | None = None) -> dict:
    out = {**merge_rounds([_round(tok_s, 100.0)]), "batch_mean": batch}
    return out if clients is None else {**out, "clients": clients}


def test_report_names_the_batch_max_loras_leaves_and_the_ceiling_it_sets():
    ours = {"0": _cond(400, 31.0), "1": _cond(400, 31.0), "8": _cond(380, 30.0), "32": _cond(180, 8.6),
            "ceiling": _cond(200, 8.9, clients=9)}
    vllm = {"0": _cond(390, 31.0), "1": _cond(390, 31.0), "8": _cond(360, 30.0), "32": _cond(120, 8.4),
            "ceiling": _cond(195, 8.7, clients=8)}
    ratios = {"8_over_1": 0.95, "32_over_1": 0.45, "vllm_8_over_1": 0.92, "vllm_32_over_1": 0.31,
              "ceiling_over_1": 0.5, "32_over_ceiling": 0.9, "vllm_ceiling_over_1": 0.5, "vllm_32_over_ceiling": 0.62,
              **{f"ours_over_vllm_tok_s@{c}": 1.0 for c in (0, 1, 8, 32)},
              **{f"ttft_p50_ours_over_vllm@{c}": 1.0 for c in (0, 1, 8, 32)}}
    text = report({"clients": 32, "seconds": 15, "tokens": 16, "rounds": 1, "max_loras": 8, "zipf": [],
                   "compare": [{"model": "25m", "ours": ours, "vllm": vllm, "ratios": ratios}]})
    assert "32/1 0.45 MISSED" in text
    assert "32 adapters 8.6 / 8.4" in text and "(9 / 8 clients)" in text
    assert "0.50 / 0.50 of one adapter at 32 clients" in text and "32 adapters / that: 0.90 ok / 0.62" in text
    ratios["32_over_ceiling"] = 0.7
    assert "that: 0.70 MISSED" in report({"clients": 32, "seconds": 15, "tokens": 16, "zipf": [], "compare": [
        {"model": "25m", "ours": ours, "vllm": vllm, "ratios": ratios}]})
