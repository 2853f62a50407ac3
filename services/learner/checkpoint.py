"""Checkpoints: everything needed to continue a killed run with the same next update.

`<run_dir>/checkpoints/step-000010/` holds
  lora.safetensors       trained weights under the model's own parameter names (exact resume):
                         the LoRA adapter, and with a critic its adapter and value head
  adapter/               the same adapter as a PEFT directory (for people and `export`)
  optimizer.safetensors  AdamW state, gathered in full on rank 0, keys `state/<param>/<name>`
  rng.safetensors        torch CPU RNG state (uint8)
  state.json             step, version, publisher epoch, scheduler, param groups, data position,
                         lease table, python RNG
Tensors go to safetensors and everything else to JSON — nothing is pickled. A checkpoint is
written under a temp name and renamed, so a crash mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def save_checkpoint(run_dir: str | Path, step: int, policy, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int) -> Path | None:
    """Collective under FSDP (every rank calls); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model_sd = get_model_state_dict(policy.root, options=_opts())
    optim_sd = get_optimizer_state_dict(policy.root, optimizer, options=_opts())
    if _rank() != 0:
        policy.adapter_state_dict()  # the collective behind save_adapter
        return None
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trained = set(policy.trainable_names())
    save_file({k: v.contiguous() for k, v in model_sd.items() if k in trained}, str(tmp / "lora.safetensors"))
    policy.save_adapter(tmp / "adapter")
    tensors = {f"state/{p}/{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
               for p, st in optim_sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    full_state = {**state, "step": step, "param_groups": optim_sd["param_groups"],
                  "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, policy, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG (collective under FSDP); returns state.json."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    lora = load_file(str(path / "lora.safetensors"))
    distributed = dist.is_available() and dist.is_initialized()
    set_model_state_dict(policy.root, lora, options=_opts(strict=False, broadcast_from_rank0=distributed))
    flat = load_file(str(path / "optimizer.safetensors"))
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        _, rest = key.split("/", 1)
        param, name = rest.rsplit("/", 1)
        optim_state.setdefault(param, {})[name] = v
    set_optimizer_state_dict(policy.root, optimizer,
                             optim_state_dict={"state": optim_state, "param_groups": state["param_groups"]},
                             options=_opts(broadcast_from_rank0=distributed))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state
