"""Prompt datasets for the learner: loaders, rendering to token ids, a resumable stream.

A dataset spec is a built-in synthetic task name (`arithmetic`) or a path to a verl-style
`.parquet` or `.jsonl` file. verl's row layout (`verl/utils/dataset/rl_dataset.py`):
`data_source`, `prompt` (a list of chat messages `{role, content}`), `reward_model`
(`{"ground_truth": ..., "style": ...}`) and `extra_info` (a dict); in JSONL, `prompt` may
also be a plain string, which is then used verbatim with no chat template.

Stdlib only at import: pyarrow is imported when a parquet file is read, the tokenizer is
whatever HF-compatible object the caller passes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Prompt:
    """One dataset row. Exactly one of `messages` (rendered with the chat template) and
    `text` (used verbatim) is set; `uid` is stable across runs for the same file."""

    uid: str
    data_source: str
    ground_truth: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    extra_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError(f"prompt {self.uid!r}: set exactly one of messages and text")


# ---------------------------------------------------------------------------- synthetic tasks

def arithmetic_prompts() -> list[Prompt]:
    """The tiny model's task: `a+b=` for single digits a, b (100 problems); the answer is
    always two digits, zero-padded (`3+8=` -> `11`, `2+3=` -> `05`), so every answer has
    the same length and `arithmetic_exact` in services/rollout/rewards.py scores it."""
    return [
        Prompt(uid=f"arithmetic-{a}-{b}", data_source="arithmetic", ground_truth=f"{a + b:02d}",
               messages=[{"role": "user", "content": f"{a}+{b}="}], extra_info={"a": a, "b": b})
        for a in range(10) for b in range(10)
    ]


SYNTHETIC = {"arithmetic": arithmetic_prompts}


# ---------------------------------------------------------------------------- files

def load_prompts(spec: str) -> list[Prompt]:
    """`arithmetic`, `path/to/file.parquet` or `path/to/file.jsonl`."""
    if spec in SYNTHETIC:
        return SYNTHETIC[spec]()
    path = Path(spec)
    if path.suffix == ".parquet":
        return load_parquet(path)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    raise ValueError(f"unknown dataset {spec!r}: give a built-in task "
                     f"({', '.join(sorted(SYNTHETIC))}) or a .parquet / .jsonl file")


def load_jsonl(path: str | Path) -> list[Prompt]:
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON: {e}") from e
    return _prompts_from_rows(path, rows)


def load_parquet(path: str | Path) -> list[Prompt]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow, which is not installed "
                          "(pip install pyarrow), or convert the file to .jsonl") from e
    path = Path(path)
    table = pq.read_table(path)
    return _prompts_from_rows(path, [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())])


def _prompts_from_rows(path: Path, rows: list[tuple[str, Any]]) -> list[Prompt]:
    prompts = [_prompt_from_row(where, row, f"{path.stem}-{i}") for i, (where, row) in enumerate(rows)]
    seen: set[str] = set()
    for p in prompts:
        if p.uid in seen:
            raise ValueError(f"{path}: duplicate uid {p.uid!r}")
        seen.add(p.uid)
    return prompts


def _prompt_from_row(where: str, row: Any, default_uid: str) -> Prompt:
    """One verl row. The uid is the row's own `uid` field when it has one, else file stem
    and row number: stable while the file is unchanged."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    if "prompt" not in row:
        raise ValueError(f"{where}: no 'prompt' field")
    prompt = row["prompt"]
    messages, text = None, None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of "
                         "{role, content} messages with string values")
    reward_model = row.get("reward_model") or {}
    if not isinstance(reward_model, dict):
        raise ValueError(f"{where}: 'reward_model' must be an object")
    truth = reward_model.get("ground_truth", row.get("ground_truth", ""))
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: 'extra_info' must be an object")
    return Prompt(uid=str(row.get("uid") or default_uid), data_source=str(row.get("data_source") or ""),
                  # verl stores some ground truths as numbers or lists; the reward gets a string.
                  ground_truth=truth if isinstance(truth, str) else json.dumps(truth),
                  messages=messages, text=text, extra_info=extra)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


# ---------------------------------------------------------------------------- rendering

def render(prompt: Prompt, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
    """Prompt text and token ids, as the rollout engine will see them.

    Messages go through the tokenizer's chat template with the generation prompt. The text
    is then encoded with the tokenizer's special tokens (the tiny model's tokenizer adds
    <bos> there, as Llama's does) unless the template already wrote the bos token itself,
    which would otherwise be doubled (Llama 3 templates start with <|begin_of_text|>)."""
    if prompt.messages is not None:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt.text or ""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt.uid!r} renders to no tokens")
    return text, ids


# ---------------------------------------------------------------------------- stream

class PromptStream:
    """Endless prompts in seeded epoch-wise shuffled order, resumable.

    Epoch e visits every prompt once, in a permutation that depends only on (seed, e); the
    position (epoch, index within it) is the whole state, so a run restored from
    `state_dict()` yields exactly the batches the original would have."""

    def __init__(self, prompts: Sequence[Prompt], seed: int = 0, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            # A str seed goes through sha512 in random.seed: stable across processes and
            # Python versions, unlike hash().
            random.Random(f"loraloop:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, k: int) -> list[Prompt]:
        if k < 0:
            raise ValueError(f"batch size must be >= 0, got {k}")
        return [next(self) for _ in range(k)]

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        if self.position == len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        p = self.prompts[self._order[self.position]]
        self.position += 1
        return p

    def _fingerprint(self) -> str:
        return hashlib.sha256("\n".join(p.uid for p in self.prompts).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": len(self.prompts), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. Refuses a state taken over another dataset (other uids or
        count): resuming would silently visit different prompts."""
        if state["num_prompts"] != len(self.prompts) or state["fingerprint"] != self._fingerprint():
            raise ValueError(f"stream state is for another dataset ({state['num_prompts']} prompts, "
                             f"fingerprint {state['fingerprint']}); this one has {len(self.prompts)} "
                             f"prompts, fingerprint {self._fingerprint()}")
        if not 0 <= state["position"] <= len(self.prompts):
            raise ValueError(f"stream position {state['position']} out of range")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
