"""Rank sampled tokens' log-probs without torch.compile on vLLM's CPU build.

vLLM's sampler ranks each sampled token among the vocabulary (`Sampler.gather_logprobs` and
`compute_logprobs_ranks` call `batched_count_greater_than`, a torch.compile'd
`(x >= values).sum(-1)`). On the CPU its first call in a process runs inductor: it hashes
torch's sources, probes the vector ISA with a compiler, preprocesses torch's headers, builds a
precompiled header, then a kernel. That happens inside the first batch that asks for
log-probs, which in training is the first step:
- 2.6 s with warm caches (vLLM's offline `LLM`, the demo batch: 2.86 s against 0.15-0.24 s
  for the batches after it);
- 10-12 s in `loraloop up`, whose services each get a TMPDIR of their own, and inductor keeps
  precompiled headers under TMPDIR whatever TORCHINDUCTOR_CACHE_DIR says (py-spy on the
  engine core: `_precompile_header` running the compiler for ~8 s of it).

`register` (a `vllm.general_plugins` entry point, so it runs in every vLLM process) puts the
same expression, eager, in the sampler's namespace on the CPU platform only. It makes one
batch x vocabulary boolean temporary, which is what the compiled kernel avoids on a GPU and
costs nothing worth a compiler on a CPU. `LORALOOP_EAGER_RANKS=0` keeps vLLM's.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vllm.loraloop.eager_ranks")

ENV = "LORALOOP_EAGER_RANKS"
_NAME = "batched_count_greater_than"


def count_at_least(x, values):
    """Per row of `x` (batch, vocab), how many entries are >= that row's value in `values`
    (batch, 1): vLLM's rank of a sampled token (1 = the most likely)."""
    return (x >= values).sum(-1)


count_at_least._loraloop_eager = True  # type: ignore[attr-defined]


def install() -> bool:
    """Put `count_at_least` in vLLM's sampler on the CPU platform; True if it is in place."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm.v1.sample.sampler as sampler

    current = getattr(sampler, _NAME, None)
    if current is None:
        log.warning("vllm.v1.sample.sampler has no %s: log-prob ranks left to vLLM", _NAME)
        return False
    if getattr(current, "_loraloop_eager", False):
        return True
    setattr(sampler, _NAME, count_at_least)
    return True


def register() -> None:
    """`vllm.general_plugins` entry point: vLLM calls it in every process it starts."""
    if os.environ.get(ENV, "1") != "0":
        install()
