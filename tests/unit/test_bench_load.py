"""The load bench's own arithmetic: tallies into figures, the leak verdict, Redis's bound,
key families, CPU lists and arguments (no servers; the bench itself is `loraloop bench load`)."""

from __future__ import annotations

import os

import pytest

from services.bench.load import (
    SHED,
    Tally,
    client_cpus,
    failed,
    history_figures,
    key_family,
    leak_verdict,
    merge_tallies,
    parse_args,
    proc_reading,
    redis_bound,
    report,
    rss_profile,
    summarize,
)


def _tally() -> dict:
    t = Tally(seconds=10.0)
    for i in range(1, 101):  # 100 ok requests: latency 1..100 ms, TTFT a tenth of it, 4 tokens each
        t.ok(i / 1000, i / 10_000, 4)
    t.fail("RESOURCE_EXHAUSTED", "too many")
    t.fail("RESOURCE_EXHAUSTED", "too many again")
    t.fail("INTERNAL", "internal error: KeyError")
    return t.to_json()


def test_summary_counts_shed_apart_from_errors_and_takes_percentiles_of_ok_requests():
    s = summarize(_tally(), SHED["grpc"])
    assert (s["requests"], s["ok"]) == (103, 100)
    assert s["shed"] == {"RESOURCE_EXHAUSTED": 2} and s["shed_total"] == 2
    assert s["errors"] == {"INTERNAL": 1} and s["errors_total"] == 1
    assert s["examples"] == {"RESOURCE_EXHAUSTED": "too many", "INTERNAL": "internal error: KeyError"}
    # inclusive percentiles of 1..100 ms: p50 = (50 + 51) / 2, p99 = 99 + 0.01 * (100 - 99)
    assert s["latency_ms_p50"] == pytest.approx(50.5) and s["latency_ms_p99"] == pytest.approx(99.01)
    assert s["ttft_ms_p50"] == pytest.approx(5.05)
    assert s["requests_per_s"] == pytest.approx(10.3) and s["tokens_per_s"] == pytest.approx(40.0)


def test_http_429_and_503_are_shed_other_statuses_are_errors():
    t = Tally(seconds=1.0)
    for code in ("http_429", "http_503", "http_500", "connection_error"):
        t.fail(code, code)
    s = summarize(t.to_json(), SHED["openai"])
    assert s["shed"] == {"http_429": 1, "http_503": 1}
    assert s["errors"] == {"http_500": 1, "connection_error": 1} and s["latency_ms_p50"] is None


def test_leak_verdict_past_the_slack_only():
    before = {"procs": 1, "rss_mb": 100.0, "fds": 50, "threads": 10}
    same = leak_verdict(before, {**before, "fds": 58, "threads": 14, "rss_mb": 120.0}, fd_slack=8, thread_slack=4)
    assert same["leak"] == [] and same["verdict"] == "no leak" and same["rss_mb_delta"] == 20.0
    grew = leak_verdict(before, {**before, "fds": 59, "threads": 15}, fd_slack=8, thread_slack=4)
    assert grew["leak"] == ["fds", "threads"] and grew["verdict"] == "LEAK: fds, threads grew"
    assert (grew["fds_delta"], grew["threads_delta"]) == (9, 5)


def test_redis_bound_is_baseline_plus_keep_last_adapters_plus_a_fixed_overhead():
    allowance = 10 * 2048 + 100 * 1024 + 100 * 128
    b = redis_bound(baseline_bytes=1_000_000, keep_last=10, adapter_bytes=20_000, used_bytes=1_100_000,
                    publishes=100, events_maxlen=100, publish_ids_kept=100, used_half_bytes=1_099_000,
                    half_publishes=50)
    assert b["overhead_allowance_bytes"] == allowance and b["bound_bytes"] == 1_200_000 + allowance
    assert b["within_bound"] and b["excess_bytes_per_publish"] == 0 and b["overhead_bytes"] == -100_000
    assert b["ratio"] == pytest.approx(1_100_000 / (1_200_000 + allowance))
    assert b["growth_bytes_per_publish"] == pytest.approx(20.0)
    over = redis_bound(1_000_000, 10, 20_000, 1_500_000 + allowance, publishes=1000, events_maxlen=100,
                       publish_ids_kept=100)
    assert not over["within_bound"] and over["excess_bytes_per_publish"] == pytest.approx(300.0)
    assert over["growth_bytes_per_publish"] is None  # no reading at the half
    stats = redis_bound(1_000_000, 10, 20_000, 1_500_000 + allowance, 1000, 100, 100, stats_bytes=300_000)
    assert stats["within_bound"] and stats["overhead_allowance_bytes"] == allowance + 300_000


def test_history_kept():
    h = history_figures(events=100, events_bytes=65_000, pub_ids={"members": 100, "bytes": 6_400},
                        events_maxlen=100, ids_kept=100, ttl_s=86400)
    assert h["bytes_per_event"] == 650.0 and h["bytes_per_publish_id"] == 64.0
    assert (h["events_maxlen"], h["publish_ids_kept"], h["publish_id_ttl_s"]) == (100, 100, 86400)
    assert history_figures(0, 0, {"members": 0, "bytes": 0}, 100, 100, 60)["bytes_per_event"] == 0.0


def test_two_halves_tally_as_one():
    a = {"outcomes": {"ok": 2}, "latency_s": [0.1, 0.2], "ttft_s": [], "tokens": 10, "examples": {}, "seconds": 1.0}
    b = {"outcomes": {"ok": 1, "UNAVAILABLE": 1}, "latency_s": [0.3], "ttft_s": [], "tokens": 5,
         "examples": {"UNAVAILABLE": "x"}, "seconds": 2.0}
    m = merge_tallies(a, b)
    assert m["outcomes"] == {"ok": 3, "UNAVAILABLE": 1} and m["latency_s"] == [0.1, 0.2, 0.3]
    assert (m["tokens"], m["seconds"], m["examples"]) == (15, 3.0, {"UNAVAILABLE": "x"})


def test_key_families_follow_the_broker_layout():
    assert key_family("ll:blob:" + "ab" * 32) == "blobs (adapter bytes)"
    assert key_family("ll:blobref:" + "ab" * 32) == "blob refcounts"
    assert key_family("ll:a:load-pub:events") == "event streams"
    assert key_family("ll:a:load-pub:pubids") == "publish ids"
    assert key_family("ll:a:load-pub:v:17") == "version records"
    assert key_family("ll:a:load-pub:versions") == "version sets"
    assert key_family("ll:a:load-pub") == "name heads"
    assert key_family("ll:names") == "other"


def test_client_cpus_avoid_the_engines():
    assert client_cpus("", "0", [0, 1]) == [1]
    assert client_cpus("", "0-1", [0, 1]) == [0, 1]  # the engine has every CPU: share them
    assert client_cpus("", "auto", [0, 1, 2]) == [0, 1, 2]
    assert client_cpus("2,4-5", "0", [0, 1]) == [2, 4, 5]


def test_arguments():
    a = parse_args([])
    assert (a.grpc_streams, a.openai_streams, a.seconds, a.publishes, a.parts) == (
        512, 256, 60.0, 10_000, ["serving", "publish"])
    q = parse_args(["--quick", "--parts", "publish"])
    assert (q.grpc_streams, q.openai_streams, q.publishes, q.parts) == (16, 8, 200, ["publish"])
    for bad in (["--parts", "nope"], ["--grpc-streams", "0"], ["--adapter-bytes", "10"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_rss_profile_peak_and_quarters():
    samples = [(float(t), 100.0 + t) for t in range(9)]  # 0..8 s, 100..108 MB
    assert rss_profile(samples) == {"peak_rss_mb": 108.0, "rss_mb_quarters": [102.0, 104.0, 106.0, 108.0]}
    assert rss_profile([]) == {"peak_rss_mb": 0.0, "rss_mb_quarters": []}


def test_this_process_reads_as_a_tree_of_one():
    r = proc_reading(os.getpid())
    assert r["procs"] >= 1 and r["fds"] > 0 and r["threads"] >= 1 and r["rss_mb"] > 0


def test_report_and_failure_of_a_publish_only_result():
    servers = {"broker": {"before": {"procs": 1, "rss_mb": 60.0, "fds": 14, "threads": 8},
                          "after": {"procs": 1, "rss_mb": 65.0, "fds": 15, "threads": 8},
                          **rss_profile([(0.0, 60.0), (1.0, 66.0), (2.0, 65.0)]),
                          **leak_verdict({"rss_mb": 60.0, "fds": 14, "threads": 8},
                                         {"rss_mb": 65.0, "fds": 15, "threads": 8}, 8, 4)}}
    pub = {**summarize(Tally(seconds=2.0).to_json(), SHED["publish"]), "publishes_per_s": 0.0,
           "adapter_bytes": 100, "keep_last": 10, "latest_version": 0, "versions_kept": [],
           "history": history_figures(4, 2000, {"members": 4, "bytes": 400}, 100, 100, 86400),
           "redis": {**redis_bound(1000, 10, 100, 2 * 137_680, 0, 100, 100), "families": {"other": {"keys": 1, "bytes": 80}}},
           "servers": servers}
    result = {"machine": {"nproc": 2, "loadavg_start": [0.5, 0, 0]}, "wall_s": 3.0,
              "config": {"cpu_bind": "0", "client_cpus": [1]}, "publish": pub}
    text = report(result)
    assert "ratio 2.00 (OVER the bound" in text and "no leak (+1 fds, +0 threads" in text
    assert "event stream 4 entries (events_maxlen 100), 2 KB, 500 B each; publish ids 4" in text
    assert "66 66 65 65" in text  # RSS at 0.5, 1, 1.5, 2 s: the first sample at or after each
    assert not failed(result)  # over its Redis bound: a goal missed, printed, not a failure
    result["publish"]["errors_total"] = 1
    assert failed(result)
    result["publish"]["errors_total"] = 0
    result["publish"]["servers"]["broker"]["leak"] = ["fds"]
    assert failed(result)
