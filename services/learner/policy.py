"""The policy: a base causal LM with a peft LoRA adapter, sharded with FSDP2.

The reference policy is the same model with the adapter disabled (peft's
`disable_adapter()`), so no second model is kept in memory. Every rank holds a shard;
`adapter_state_dict()` gathers the full LoRA tensors (a collective: all ranks call it).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from services.learner.config import ModelConfig

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Policy:
    def __init__(self, cfg: ModelConfig, device: torch.device | None = None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.device = device or torch.device("cpu")
        base = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype))
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.init_adapter:
            model = PeftModel.from_pretrained(base, cfg.init_adapter, is_trainable=True)
        else:
            lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules or None,
                              task_type="CAUSAL_LM")
            model = get_peft_model(base, lcfg)
        for n, p in model.named_parameters():  # LoRA weights train in fp32 whatever the base dtype
            if p.requires_grad:
                p.data = p.data.float()
                assert "lora_" in n, n
        model.to(self.device)
        self.model = model
        self.rank, self.world = _world()
        if self.world > 1 or cfg.cpu_offload or cfg.mixed_precision:
            self._shard()

    def _shard(self) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw: dict = {}
        if self.cfg.mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in self.decoder_layers():
            fully_shard(layer, **kw)
        fully_shard(self.model, **kw)

    def decoder_layers(self) -> list[nn.Module]:
        inner = self.model.get_base_model()
        return list(inner.model.layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_lora_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-prob of each token given its prefix ([B, T], position 0 is 0) and, optionally, entropy."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        tok = torch.gather(logp, -1, input_ids[:, 1:, None]).squeeze(-1)
        pad = torch.zeros_like(tok[:, :1])
        ent = None
        if with_entropy:
            ent = torch.cat([pad, -(logp.exp() * logp).sum(-1)], 1)
        return torch.cat([pad, tok], 1), ent

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the base model with the adapter disabled."""
        with self.model.disable_adapter():
            yield

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Full LoRA tensors in PEFT naming (collective under FSDP: every rank must call)."""
        from peft import get_peft_model_state_dict

        full = {}
        for k, v in self.model.state_dict().items():
            if "lora_" not in k:
                continue
            full[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", torch.float32).clone()
        return get_peft_model_state_dict(self.model, state_dict=full)

    def save_adapter(self, out_dir: str | Path) -> Path | None:
        """Write adapter_config.json + adapter_model.safetensors (rank 0); collective."""
        from safetensors.torch import save_file

        sd = self.adapter_state_dict()
        if self.rank != 0:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "adapter_model.safetensors"))
        cfg = self.model.peft_config["default"]
        cfg.base_model_name_or_path = str(self.cfg.path)
        cfg.save_pretrained(str(out))
        return out
