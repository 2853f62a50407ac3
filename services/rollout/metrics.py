"""Prometheus metrics of one rollout server, served at `GET /metrics` by its HTTP front.

One registry per server (not the process-global default), so two servers in one process
(tests, Ray) never share counters. Labels: `model` is the adapter *name* (or `base`), never
the version, so a long training run does not grow a series per version; `source` says who
asked (`http` or `grpc` users, or the `training` worker); `learner` is a training run's
learner address (one replica may lease from several).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; first tokens on CPU range from ~1 ms (tiny model) to seconds under load.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RolloutMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loraloop_requests", "Generation requests finished, by outcome (HTTP status or 'ok')",
                                ["source", "endpoint", "model", "status"], registry=r)
        self.in_flight = Gauge("loraloop_requests_in_flight", "Generation requests running now",
                               ["source"], registry=r)
        self.prompt_tokens = Counter("loraloop_prompt_tokens", "Prompt tokens of finished requests",
                                     ["source", "model"], registry=r)
        self.generated_tokens = Counter("loraloop_generated_tokens", "Tokens generated",
                                        ["source", "model"], registry=r)
        self.ttft = Histogram("loraloop_time_to_first_token_seconds", "Request admission to its first token",
                              ["source", "model"], buckets=_LATENCY, registry=r)
        self.duration = Histogram("loraloop_request_duration_seconds", "Request admission to its last byte",
                                  ["source", "endpoint"], buckets=_LATENCY, registry=r)
        self.rejected = Counter("loraloop_requests_rejected", "Requests refused by admission control",
                                ["source", "reason"], registry=r)
        self.adapter_loads = Counter("loraloop_adapter_loads", "Adapter versions fetched and loaded into the engine",
                                     ["model", "kind"], registry=r)
        self.adapter_evictions = Counter("loraloop_adapter_evictions",
                                         "Adapter versions evicted to make room (LRU beyond engine.max_cpu_loras)",
                                         ["model"], registry=r)
        self.adapter_load_seconds = Histogram("loraloop_adapter_load_seconds",
                                              "Fetch + check + engine load of one version; kind=swap for one "
                                              "evicted before (the swap cost)", ["kind"], buckets=_LATENCY,
                                              registry=r)
        self.priority = Gauge("loraloop_priority", "vLLM scheduling priority given to each source's requests "
                              "(lower runs first)", ["source"], registry=r)
        self.leases = Counter("loraloop_leases", "Leases taken by the training worker, per learner (run)",
                              ["learner", "model"], registry=r)
        self.lease_slots = Gauge("loraloop_lease_slots_held", "Leases being generated now, per learner (run)",
                                 ["learner"], registry=r)
        self.lease_weight = Gauge("loraloop_lease_weight", "Configured share of the leases in flight, per learner",
                                  ["learner"], registry=r)
        self.groups = Counter("loraloop_groups_submitted", "Trajectory groups sent back, by the learner's answer",
                              ["learner", "model", "outcome"], registry=r)
        self.adapters_loaded = Gauge("loraloop_adapters_loaded", "Adapter versions loaded in the engine", registry=r)

    # The AdapterManager's observer interface.
    def adapter_loaded(self, name: str, seconds: float, swap: bool) -> None:
        kind = "swap" if swap else "new"
        self.adapter_loads.labels(name, kind).inc()
        self.adapter_load_seconds.labels(kind).observe(seconds)

    def adapter_evicted(self, name: str) -> None:
        self.adapter_evictions.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
