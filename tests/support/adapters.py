"""Build PEFT LoRA adapters (config + safetensors bytes) without torch, for broker tests."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save

DEFAULT_MODULES = ("q_proj", "v_proj")


def make_adapter(seed: int = 0, rank: int = 4, layers: int = 2, hidden: int = 32,
                 modules: tuple[str, ...] = DEFAULT_MODULES, config_rank: int | None = None,
                 config_modules: tuple[str, ...] | None = None, min_bytes: int = 0) -> tuple[dict, bytes]:
    """A random LoRA adapter as PEFT saves it. `min_bytes` pads by widening the layers."""
    if min_bytes:
        per_layer_elems = len(modules) * 2 * rank  # A is [r, hidden], B is [hidden, r]
        hidden = max(hidden, -(-min_bytes // (4 * layers * per_layer_elems)))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32)
    config = {
        "peft_type": "LORA", "r": config_rank or rank, "lora_alpha": 2 * (config_rank or rank),
        "target_modules": list(config_modules or modules), "lora_dropout": 0.0, "bias": "none",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny",
    }
    return config, save(tensors)


def config_json(config: dict) -> str:
    return json.dumps(config)
