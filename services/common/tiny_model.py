"""`loraloop make-tiny-model`: small Qwen2-architecture models the project builds itself.

Nothing is downloaded: the tokenizer is trained here with `tokenizers` (one token per
character: digits, `+`, `=`, plus <pad>/<bos>/<eos>; the tiny arithmetic task learns ~6x
faster with it than with a BPE, see shared/measurements.md) and the weights come from a
seed. The output is the ordinary HF layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template), so every loader that takes a
user's local Qwen/Llama checkpoint takes this one the same way.

Shapes: `tiny` (the measured GRPO task model, ~0.3 M parameters), `25m` (hidden 512,
8 layers) and `0.5b` (Qwen2.5-0.5B layer shapes, random weights) for benchmarks.
head_dim is >= 32 in every shape: vLLM's CPU attention has no kernel below that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789+=")
# Rendering chat messages: the tiny tasks use the user's text as the prompt, verbatim.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
    "25m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf, vocab


def make_tiny_model(out_dir: str | Path, seed: int = 0, shape: str = "tiny", dtype: str = "float32") -> Path:
    """Write a deterministic Qwen2 model + tokenizer to `out_dir`; returns the path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = build_tokenizer()
    tokenizer.save_pretrained(out)
    cfg = Qwen2Config(
        vocab_size=16, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
        **SHAPES[shape],
    )
    cfg.torch_dtype = dtype
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    # Drop what would make two builds differ (none today), and say how it was made.
    (out / "loraloop_model.json").write_text(json.dumps({"builder": "loraloop make-tiny-model", "seed": seed,
                                                         "shape": shape, "dtype": dtype}, indent=1))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraloop make-tiny-model",
                                description="Build a small Qwen2-architecture model with its own tokenizer "
                                "(HF layout, safetensors), deterministically from a seed.")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny",
                   help="tiny (~0.3M params, the arithmetic demo), 25m, or 0.5b (Qwen2.5-0.5B layer shapes)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    out = make_tiny_model(args.out_dir, args.seed, args.shape, args.dtype)
    from services.common.fingerprint import model_fingerprint

    n = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.shape} model to {out} ({n / 1e6:.1f} MB), fingerprint {model_fingerprint(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
