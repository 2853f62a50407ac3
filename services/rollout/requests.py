"""Request translation shared by the Generate service and the training worker: sampling
parameters from the wire to the engine's, and prompt text or ids checked against the base
model's tokenizer and limits."""

from __future__ import annotations

import json
from pathlib import Path

from loraloop.v1 import rollout_pb2 as pb
from services.common.errors import InvalidArgument
from services.rollout.engine import Sampling

MAX_N = 64
DEFAULT_MAX_TOKENS = 64  # when a request leaves max_tokens at 0


def sampling_from_pb(p: pb.SamplingParams, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Sampling:
    if p.temperature < 0 or not (0 <= p.top_p <= 1):
        raise InvalidArgument("temperature must be >= 0 and top_p in [0, 1]")
    if p.n > MAX_N:
        raise InvalidArgument(f"n={p.n} exceeds {MAX_N}")
    if p.n > 1 and p.temperature == 0:
        raise InvalidArgument(f"n={p.n} samples need temperature > 0 (greedy gives one answer)")
    return Sampling(
        max_tokens=p.max_tokens or default_max_tokens, temperature=p.temperature, top_p=p.top_p or 1.0,
        top_k=p.top_k if p.top_k > 0 else -1, n=p.n or 1, seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), logprobs=p.logprobs,
        ignore_eos=p.ignore_eos,
    )


# Prompt tokens a response is decoded after (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_DECODE_CONTEXT = 5


class TokenCodec:
    """Tokenizer of the base model (for text prompts) and its vocabulary size."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, ids, prompt_ids=()) -> str:
        """The text vLLM makes of a response's `ids` (special tokens skipped), decoded once at the
        end instead of token by token: like vLLM's detokenizer, in the context of the prompt's
        last tokens, so that a first token's leading space comes out as it would there."""
        ctx = list(prompt_ids[-_DECODE_CONTEXT:])
        if ctx:
            before = self.tokenizer.decode(ctx, skip_special_tokens=True)
            whole = self.tokenizer.decode(ctx + list(ids), skip_special_tokens=True)
            if whole.startswith(before):
                return whole[len(before):]
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check(self, ids: list[int], max_model_len: int, max_tokens: int) -> None:
        if not ids:
            raise InvalidArgument("empty prompt")
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise InvalidArgument(f"token ids {bad[:5]} outside the vocabulary (size {self.vocab_size})")
        if len(ids) + max_tokens > max_model_len:
            raise InvalidArgument(f"prompt {len(ids)} + max_tokens {max_tokens} > max_model_len {max_model_len}")
