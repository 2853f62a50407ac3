"""The serving bench's own logic: rounds merged into medians, Zipf popularity, arguments."""

from __future__ import annotations

from collections import Counter

import pytest

from services.bench.serving import merge_rounds, parse_args, zipf_picker


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
    assert a.models == ["25m", "0.5b"] and a.zipf_models == [] and a.rounds == 2
    with pytest.raises(SystemExit):
        parse_args(["--models", "7b"])
