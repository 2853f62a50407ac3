"""Base-model fingerprints: which base an adapter was trained on.

sha256 over the model's config.json (minus fields that do not change the network, such as
`_name_or_path` or `transformers_version`) and the name, shape and dtype of every tensor in
its safetensors files. Read from headers only, so it is cheap for a multi-GB checkpoint and
the same on the learner (bf16 in memory) and on rollout (fp32 in memory) for one checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.peft_format import parse_safetensors_header

_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def read_safetensors_prefix(path: Path) -> bytes:
    """The first bytes of a safetensors file: its 8-byte length and the JSON header it announces
    (fewer where the file is truncated), without reading the tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        return head + f.read(int.from_bytes(head, "little")) if len(head) == 8 else head


def read_safetensors_header(path: Path):
    header = parse_safetensors_header(read_safetensors_prefix(path))
    if header is None:
        raise InvalidArgument(f"{path} is truncated")
    return header


def model_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a local HF-layout checkpoint (config.json + *.safetensors)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    files = sorted(model_dir.glob("*.safetensors"))
    if not cfg_path.is_file() or not files:
        raise InvalidArgument(f"{model_dir} is not a model directory with config.json and *.safetensors")
    config = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k not in _VOLATILE_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tensors = {}
    for f in files:
        for name, t in read_safetensors_header(f).tensors.items():
            tensors[name] = (t.dtype, list(t.shape))
    h.update(json.dumps(sorted(tensors.items())).encode())
    return "sha256:" + h.hexdigest()
