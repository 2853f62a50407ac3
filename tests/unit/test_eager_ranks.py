"""eager_ranks puts an eager `batched_count_greater_than` in vLLM's sampler on the CPU build
(the compiled one runs a C++ compiler inside the first batch with log-probs: 10-12 s of the
stack's first step). The real vLLM module; the first-step figure is in docs/benchmarks-notes.md."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from services.rollout import eager_ranks

pytestmark = pytest.mark.unit


def test_it_counts_what_vllms_function_counts():
    from vllm.v1.sample.ops import logprobs

    vllms = getattr(logprobs.batched_count_greater_than, "_torchdynamo_orig_callable", None)
    assert vllms is not None, "vLLM's batched_count_greater_than is no longer a torch.compile'd function"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 50, generator=g).log_softmax(-1)
    x[3, :10] = x[3, 0]  # ties count as "at least"
    picked = torch.randint(0, 50, (7, 1), generator=g)
    values = x.gather(-1, picked)
    ours = eager_ranks.count_at_least(x, values)
    assert torch.equal(ours, vllms(x, values))
    assert ours.tolist() == [sum(float(v) >= float(values[r, 0]) for v in x[r]) for r in range(7)]
    assert ours.dtype == torch.int64 and ours.shape == (7,)


def test_install_swaps_the_samplers_function_on_the_cpu_platform(monkeypatch):
    import vllm.v1.sample.sampler as sampler
    from vllm.platforms import current_platform

    monkeypatch.setattr(sampler, "batched_count_greater_than", sampler.batched_count_greater_than)
    assert current_platform.is_cpu()
    assert eager_ranks.install() is True
    assert sampler.batched_count_greater_than is eager_ranks.count_at_least
    assert eager_ranks.install() is True  # twice: still in place


def test_the_switch_keeps_vllms(monkeypatch):
    import vllm.v1.sample.sampler as sampler

    stock = sampler.batched_count_greater_than
    monkeypatch.setattr(sampler, "batched_count_greater_than", stock)
    monkeypatch.setenv(eager_ranks.ENV, "0")
    eager_ranks.register()
    assert sampler.batched_count_greater_than is stock


def test_vllm_loads_it_as_a_plugin():
    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("loraloop_eager_ranks") == "services.rollout.eager_ranks:register"
