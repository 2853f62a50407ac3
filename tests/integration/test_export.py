"""`loraloop export --merge` really fuses the adapter (verl#7285 wrote the base unchanged):
merged weights differ from the base, and merged outputs equal base + adapter outputs."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.support.peft_adapters import make_peft_adapter


def test_export_merge_fuses_and_matches(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_peft_adapter(tiny_model, tmp_path / "adapter", seed=7)
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "services.cli", "export", str(tiny_model), str(adapter), str(out),
                        "--merge"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    base_w, merged_w = load_file(str(tiny_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(base_w) == set(merged_w)  # a plain HF model: no lora_ keys
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged_w[q] - base_w[q]).abs().max() > 1e-3  # the weights really changed
    ids = torch.tensor([[1, 6, 13, 11, 14, 4, 5]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                        str(adapter))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
    assert (merged - ref).abs().max() < 1e-4  # fp32 fused matmul vs x@W + x@A@B: ~1e-6 apart
    assert (merged - base).abs().max() > 0.1


def test_export_plain_copies_peft_dir(tiny_model, tmp_path):
    adapter = make_peft_adapter(tiny_model, tmp_path / "adapter", seed=8)
    out = tmp_path / "plain"
    r = subprocess.run([sys.executable, "-m", "services.cli", "export", str(tiny_model), str(adapter), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
