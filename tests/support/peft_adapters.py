"""Real peft LoRA adapters for the tiny model (torch + peft), and their transformers reference."""

from __future__ import annotations

import json
from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_dir: str | Path, out_dir: str | Path, seed: int, rank: int = 8,
                      target_modules: list[str] | None = None, b_std: float = 0.5) -> Path:
    """A random peft adapter whose B is large enough to visibly change the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=target_modules or ALL_LINEAR, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_std)
    pm.save_pretrained(out_dir)
    return Path(out_dir)


def peft_reference(base_dir: str | Path, adapter_dir: str | Path | None, prompt_ids: list[int],
                   max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from transformers (+ peft adapter), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = torch.tensor([prompt_ids])
    out, lps = [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(ids).logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            t = int(torch.argmax(logp))
            out.append(t)
            lps.append(float(logp[t]))
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out, lps


def adapter_config(adapter_dir: str | Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
