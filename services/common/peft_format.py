"""The PEFT LoRA adapter format, checked without torch.

An adapter is `adapter_config.json` + `adapter_model.safetensors`. The broker verifies an
upload against its config while the bytes stream in, so the safetensors header is parsed
from a prefix (8-byte little-endian length, then a JSON header), never by loading tensors.
Format: https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section in the file

    @property
    def expected_file_size(self) -> int:
        return self.data_start + max((t.end for t in self.tensors.values()), default=0)


def _is_size(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_safetensors_header(prefix: bytes) -> SafetensorsHeader | None:
    """Parse the header from the first bytes of a safetensors file.

    Returns None while `prefix` is too short to hold the whole header; raises
    InvalidArgument for anything that is not a well-formed safetensors header.
    """
    if len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise InvalidArgument(f"safetensors header length {n} out of range (1..{MAX_HEADER_BYTES})")
    if len(prefix) < 8 + n:
        return None
    try:
        raw = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument("safetensors header must be a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, info in raw.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"safetensors entry {name!r} is malformed") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise InvalidArgument(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not all(_is_size(x) for x in (*shape, start, end)) or not start <= end:
            raise InvalidArgument(f"tensor {name!r} has a bad shape or offsets")
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise InvalidArgument(f"tensor {name!r}: offsets do not match shape {shape} x {dtype}")
        tensors[name] = TensorInfo(dtype, shape, start, end)
    spans = sorted((t.start, t.end) for t in tensors.values())
    for (_, prev_end), (start, _) in itertools.pairwise(spans):
        if start != prev_end:
            raise InvalidArgument("safetensors tensors overlap or leave gaps")
    if spans and spans[0][0] != 0:
        raise InvalidArgument("safetensors data does not start at offset 0")
    return SafetensorsHeader(tensors, metadata, 8 + n)


@dataclass(frozen=True)
class LoraSpec:
    """What a checked adapter declares: the facts the registry records and rollout enforces."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # module suffixes that carry weights, e.g. ("q_proj", "v_proj")
    module_paths: tuple[str, ...] = field(default=(), repr=False)  # full module names


def parse_adapter_config(text: str | bytes) -> dict:
    try:
        cfg = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"{CONFIG_NAME} must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"only LoRA adapters are supported, got peft_type={cfg.get('peft_type')!r}")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidArgument(f"{CONFIG_NAME}: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidArgument(f"{CONFIG_NAME}: 'lora_alpha' must be a number (finite), got {alpha!r}")
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pattern.values()):
        raise InvalidArgument(f"{CONFIG_NAME}: 'rank_pattern' must map module names to positive integers")
    targets = cfg.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise InvalidArgument(f"{CONFIG_NAME}: target_modules must be a list of names or a string, got {targets!r}")
    if cfg.get("use_dora"):
        raise InvalidArgument("DoRA adapters are not supported")
    return cfg


def _targets_match(module: str, targets: object) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        try:
            return re.fullmatch(targets, module) is not None
        except re.error as e:
            raise InvalidArgument(f"{CONFIG_NAME}: target_modules {targets!r} is not a valid regex: {e}") from None
    if isinstance(targets, (list, tuple)):
        # peft's rule: a target matches a module whose name is it or ends with "." + it.
        # peft writes bare names ("q_proj") or, for all-linear, paths ("model.layers.0.mlp.up_proj").
        return any(module == t or module.endswith("." + t) for t in targets)
    raise InvalidArgument(f"{CONFIG_NAME}: target_modules must be a list or a string")


def check_lora_adapter(config: dict, header: SafetensorsHeader) -> LoraSpec:
    """Check that the safetensors header holds exactly the LoRA weights the config declares."""
    r = config["r"]
    allowed_ranks = {r, *(config.get("rank_pattern") or {}).values()}
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        m = _LORA_KEY.fullmatch(name)
        if not m:
            raise InvalidArgument(f"tensor {name!r} is not a LoRA weight (expected *.lora_A/B.weight)")
        if len(info.shape) != 2:
            raise InvalidArgument(f"LoRA tensor {name!r} must be 2-D, has shape {info.shape}")
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = info
    if not pairs:
        raise InvalidArgument("adapter has no LoRA tensors")
    ranks = set()
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InvalidArgument(f"module {module!r} lacks its lora_{'B' if 'A' in ab else 'A'} tensor")
        rank = ab["A"].shape[0]
        if ab["B"].shape[1] != rank:
            raise InvalidArgument(
                f"module {module!r}: lora_A {ab['A'].shape} and lora_B {ab['B'].shape} disagree on rank"
            )
        if rank not in allowed_ranks:
            raise InvalidArgument(f"module {module!r} has rank {rank}, config declares r={r}")
        if not _targets_match(module, config.get("target_modules")):
            raise InvalidArgument(f"module {module!r} is not among target_modules {config.get('target_modules')!r}")
        ranks.add(rank)
    suffixes = tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs}))
    return LoraSpec(max(ranks), float(config.get("lora_alpha", r)), suffixes, tuple(sorted(pairs)))
