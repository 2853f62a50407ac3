"""The policy: a base causal LM with a peft LoRA adapter, sharded with FSDP2.

The reference policy is the same model with the adapter disabled (peft's
`disable_adapter()`), so no second model is kept in memory. Every rank holds a shard;
`adapter_state_dict()` gathers the full LoRA tensors (a collective: all ranks call it).

With `critic=True` (PPO with GAE) the same base also carries the critic: a second LoRA
adapter (`critic`, same rank and targets) and a linear value head on the final hidden
state. Only one copy of the base is in memory; the published adapter is the policy's alone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # an annotation only: importing the policy needs no pydantic (tests/gpu/smoke.py)
    from services.learner.config import ModelConfig

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = False, entropy_grad: bool = False,
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs [B, T] (position 0 is 0) from logits [B, T, V] without keeping a
    log-softmax copy of the logits for backward: log p(x) = logit(x) - logsumexp(logits).
    A [B, T, V] float32 copy is ~0.3 GB per 4 x 128 tokens at a 152k vocabulary; autograd
    keeps the logits (for logsumexp) and nothing else of that size. Entropy, when asked,
    is computed without a graph unless `entropy_grad` (then its softmax is kept too)."""
    logits = logits[:, :-1]
    if logits.dtype != torch.float32:
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, -1)
    tok = torch.gather(logits, -1, input_ids[:, 1:, None]).squeeze(-1) - lse
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)  # H = logsumexp(z) - E_p[z]
        ent = torch.cat([torch.zeros_like(ent[:, :1]), ent], 1)
    return torch.cat([torch.zeros_like(tok[:, :1]), tok], 1), ent


CRITIC = "critic"
"""Name of the critic's LoRA adapter on the shared base."""


class _WithValueHead(nn.Module):
    """The FSDP root when there is a critic: the peft model plus the value head, so that
    both run inside the root's forward (FSDP2 unshards root parameters around it)."""

    def __init__(self, model: nn.Module, value_head: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, values: bool = False):
        if not values:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # The decoder alone (no lm_head: a 152k-vocabulary projection the critic does not need);
        # its last hidden state is what the lm_head would read (after the final norm).
        decoder = self.model.get_base_model().get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.value_head(hidden.float()).squeeze(-1)


class Policy:
    def __init__(self, cfg: ModelConfig, device: torch.device | None = None, critic: bool = False) -> None:
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
        self.critic = critic
        if critic:
            # Same rank/targets as the policy's adapter; initialised by peft (B = 0).
            ccfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules or None,
                              task_type="CAUSAL_LM")
            model.add_adapter(CRITIC, ccfg)
            model.set_adapter("default")
            for n, p in model.named_parameters():
                if f".{CRITIC}." in n:
                    p.requires_grad_(True)
        for n, p in model.named_parameters():  # LoRA weights train in fp32 whatever the base dtype
            if p.requires_grad:
                p.data = p.data.float()
                assert "lora_" in n, n
        self.model = model
        self.root: nn.Module = model
        if critic:
            head = nn.Linear(base.config.hidden_size, 1)
            # Small random weights: V starts near 0 and the critic's LoRA gets a gradient from
            # the first step (with a zero head it would not).
            nn.init.normal_(head.weight, std=1e-2)
            nn.init.zeros_(head.bias)
            self.root = _WithValueHead(model, head)
        self.root.to(self.device)
        trainable = {n for n, p in self.root.named_parameters() if p.requires_grad}
        self.rank, self.world = _world()
        if self.world > 1 or cfg.cpu_offload or cfg.mixed_precision:
            self._shard()
        # After sharding (fully_shard swaps in DTensor parameters); stable from here on.
        self._trainable = {n: p for n, p in self.root.named_parameters() if n in trainable}

    def _shard(self) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw: dict = {}
        if self.cfg.mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            # Pinned host memory needs an accelerator; without one (CPU runs, tests) the offload
            # code path still runs, unpinned.
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        for layer in self.decoder_layers():
            fully_shard(layer, **kw)
        fully_shard(self.root, **kw)

    def decoder_layers(self) -> list[nn.Module]:
        inner = self.model.get_base_model()
        return list(inner.model.layers)

    def trainable_names(self) -> list[str]:
        """Names (under `root`) of every trained parameter: both adapters and the value head."""
        return list(self._trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.actor_parameters() + self.critic_parameters()

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self._trainable.items() if not self._is_critic(n)]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self._trainable.items() if self._is_critic(n)]

    @staticmethod
    def _is_critic(name: str) -> bool:
        return f".{CRITIC}." in name or name.startswith("value_head.")

    def _restore_trainable(self) -> None:
        # peft's adapter switches (set_adapter, leaving disable_adapter) set requires_grad on
        # the active adapter only; both adapters train here, so put the flags back.
        for p in self._trainable.values():
            if not p.requires_grad:
                p.requires_grad_(True)

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False, entropy_grad: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-prob of each token given its prefix ([B, T], position 0 is 0) and, optionally,
        the entropy (differentiable only with `entropy_grad`: an entropy bonus in the loss)."""
        if self.critic:
            logits = self.root(input_ids, attention_mask)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logprobs_from_logits(logits, input_ids, temperature, with_entropy, entropy_grad)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Critic values [B, T]: V at position t is the value of the prefix before token t
        (the state in which token t was chosen), from the hidden state at t - 1; position 0 is 0."""
        if not self.critic:
            raise RuntimeError("this policy has no critic (Policy(..., critic=True))")
        self.model.set_adapter(CRITIC)
        try:
            v = self.root(input_ids, attention_mask, values=True)
        finally:
            self.model.set_adapter("default")
            self._restore_trainable()
        return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the base model with the adapter disabled."""
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self._restore_trainable()

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
        sd = self.adapter_state_dict()
        return self.write_adapter(sd, out_dir) if self.rank == 0 else None

    def write_adapter(self, sd: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write `sd` (from `adapter_state_dict`: copies, so the next step may change the
        parameters meanwhile) as a PEFT directory. Not a collective: the learner's publish
        thread calls it while the next step trains."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "adapter_model.safetensors"))
        cfg = self.model.peft_config["default"]
        cfg.base_model_name_or_path = str(self.cfg.path)
        cfg.save_pretrained(str(out))
        return out
