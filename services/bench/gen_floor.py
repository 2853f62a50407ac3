"""The rollout side's floor in `loraloop bench peers`: vLLM itself generating one training
batch, with nothing of ours around it.

vLLM's offline `LLM.generate` of the workload's batch (its prompts x samples x tokens, one rank-16
LoRA adapter loaded, the sampled tokens' log-probs on, the stack's engine settings)
on the cores the stack gives its engine, with the engine in this one process (no engine-core
or worker process, no IPC: the least vLLM's CPU build spends on a batch). While one replica
generates every batch, the stack's step cannot be shorter than this, whatever the learner does:
it is what the rollout side costs before loraloop adds anything.

    python -m services.bench.gen_floor --model DIR --groups 32 --samples 8 --max-tokens 3

prints one JSON line (median, p10, p90 seconds per batch). Its own process: vLLM's settings
are read from the environment when it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.bench.gen_floor",
                                description="vLLM's own offline generation of one training batch, in one process "
                                            "on the engine's cores: the rollout side's floor per step.")
    p.add_argument("--model", type=Path, required=True, help="base model directory")
    p.add_argument("--groups", type=int, default=32, help="prompts per batch")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (vLLM's n)")
    p.add_argument("--max-tokens", type=int, default=3, help="new tokens per sample")
    p.add_argument("--ignore-eos", action="store_true", help="every response full length")
    p.add_argument("--cpu-bind", default="0", help="the engine's cores (VLLM_CPU_OMP_THREADS_BIND), as the stack's")
    p.add_argument("--rounds", type=int, default=30, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--adapter-dir", type=Path, default=None,
                   help="where the adapter is written (default: <model>/../gen-floor-adapter)")
    a = p.parse_args(argv)
    if min(a.groups, a.samples, a.max_tokens, a.rounds) < 1 or a.warmup < 0:
        p.error("--groups, --samples, --max-tokens and --rounds must be >= 1, --warmup >= 0")
    return a


def adapter(model: Path, out_root: Path) -> Path:
    """A random rank-16 all-linear LoRA adapter for `model` (the rollout bench's), written once."""
    if not (out_root / "seed0" / "adapter_config.json").is_file():
        from services.bench.rollout import make_adapters

        make_adapters(model, out_root, [0])
    return out_root / "seed0"


def prompts(model: Path, groups: int) -> list[list[int]]:
    """The arithmetic task's prompts, rendered as the learner renders them."""
    from transformers import AutoTokenizer

    from services.learner.data import arithmetic_prompts, render

    tok = AutoTokenizer.from_pretrained(model)
    rows = arithmetic_prompts()
    random.Random(0).shuffle(rows)
    return [render(rows[i % len(rows)], tok)[1] for i in range(groups)]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = a.cpu_bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    lora_dir = adapter(a.model, a.adapter_dir or a.model.parent / "gen-floor-adapter")
    batch = [{"prompt_token_ids": ids} for ids in prompts(a.model, a.groups)]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from services.bench import percentile
    from services.bench.rollout import RANK
    from services.rollout.config import EngineConfig

    e = EngineConfig(model=str(a.model))  # the stack's engine settings
    llm = LLM(model=str(a.model), dtype=e.dtype, max_model_len=e.max_model_len,
              max_num_seqs=max(a.groups * a.samples, 1), enable_lora=True, max_loras=1,
              max_lora_rank=RANK, enforce_eager=True, logprobs_mode="processed_logprobs",
              enable_prefix_caching=e.enable_prefix_caching, seed=0, distributed_executor_backend="uni")
    sp = SamplingParams(n=a.samples, max_tokens=a.max_tokens, temperature=1.0, logprobs=0, ignore_eos=a.ignore_eos)
    lora = LoRARequest("floor", 1, str(lora_dir))
    times, tokens = [], 0
    for i in range(a.warmup + a.rounds):
        t0 = time.perf_counter()
        outs = llm.generate(batch, sp, lora_request=lora, use_tqdm=False)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(json.dumps({"median_s": statistics.median(times), "p10_s": percentile(times, 10),
                      "p90_s": percentile(times, 90), "rounds": a.rounds, "tokens_per_batch": tokens,
                      "sequences_per_batch": a.groups * a.samples, "cpu_bind": a.cpu_bind,
                      "vllm": vllm.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
