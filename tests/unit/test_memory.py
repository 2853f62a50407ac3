"""services.common.memory: with the learner's malloc settings, freed activation-sized blocks
leave the process; with glibc's defaults (dynamic mmap threshold) they stay resident."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
def rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
if sys.argv[1] == 'release':
    from services.common.memory import release_freed_memory
    assert release_freed_memory()
import torch
x = torch.ones((20 << 20) // 4); del x   # a freed 20 MB block raises glibc's dynamic threshold
blocks, keep = [], []
for _ in range(40):  # 400 MB in 10 MB blocks (activation-sized), each followed by a kept small one
    blocks.append(torch.ones((10 << 20) // 4))
    keep.append(torch.ones(16 << 10))
peak = rss_mb()
del blocks
print(peak, rss_mb())
"""


def _after_free(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_freed_blocks_leave_rss_only_with_the_release_settings():
    peak_g, after_g = _after_free("glibc")
    peak_r, after_r = _after_free("release")
    assert peak_g - after_g < 100, (peak_g, after_g)  # glibc's defaults keep the 400 MB
    assert peak_r - after_r > 350, (peak_r, after_r)  # ours give it back
