"""Prompt datasets: the arithmetic task's contents, JSONL/parquet loading, rendering through a
chat template, and the seeded stream that resumes exactly where it stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from services.learner.data import (
    Prompt,
    PromptStream,
    arithmetic_prompts,
    load_jsonl,
    load_parquet,
    load_prompts,
    render,
)

# ---------------------------------------------------------------------------- arithmetic


def test_arithmetic_has_all_100_single_digit_sums_zero_padded() -> None:
    prompts = arithmetic_prompts()
    assert len(prompts) == 100
    texts = [p.messages[0]["content"] for p in prompts]
    assert len(set(texts)) == 100
    assert len({p.uid for p in prompts}) == 100
    by_text = {p.messages[0]["content"]: p.ground_truth for p in prompts}
    assert by_text["3+8="] == "11"
    assert by_text["2+3="] == "05"
    assert by_text["0+0="] == "00"
    assert by_text["9+9="] == "18"
    for text, truth in by_text.items():
        a, b = int(text[0]), int(text[2])
        assert text == f"{a}+{b}=" and len(truth) == 2 and int(truth) == a + b
    assert {p.data_source for p in prompts} == {"arithmetic"}
    assert all(p.text is None and p.messages[0]["role"] == "user" for p in prompts)


def test_load_prompts_by_spec() -> None:
    assert load_prompts("arithmetic") == arithmetic_prompts()
    with pytest.raises(ValueError, match=r"arithmetic.*\.parquet / \.jsonl"):
        load_prompts("gsm9k")


def test_prompt_needs_exactly_one_of_messages_and_text() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Prompt(uid="x", data_source="d", ground_truth="1")
    with pytest.raises(ValueError, match="exactly one"):
        Prompt(uid="x", data_source="d", ground_truth="1", text="a", messages=[{"role": "user", "content": "a"}])


# ---------------------------------------------------------------------------- files

VERL_ROWS = [
    {"data_source": "openai/gsm8k",
     "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
     "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": 0, "split": "train"}},
    {"data_source": "math", "prompt": "Compute 6*7.", "reward_model": {"ground_truth": 42, "style": "rule"},
     "extra_info": {"index": 1}},
    {"uid": "custom-id", "data_source": "x", "prompt": "p", "ground_truth": "t"},
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    return path


def test_jsonl_loads_verl_fields(tmp_path: Path) -> None:
    prompts = load_prompts(str(_write_jsonl(tmp_path / "train.jsonl", VERL_ROWS)))
    assert [p.uid for p in prompts] == ["train-0", "train-1", "custom-id"]
    chat, plain, custom = prompts
    assert chat.messages == VERL_ROWS[0]["prompt"] and chat.text is None
    assert (chat.data_source, chat.ground_truth, chat.extra_info) == ("openai/gsm8k", "2", {"index": 0, "split": "train"})
    assert plain.text == "Compute 6*7." and plain.messages is None
    assert plain.ground_truth == "42"  # a number in reward_model reaches the reward as a string
    assert (custom.ground_truth, custom.extra_info) == ("t", {})
    # The same file loads to the same uids: group ids and stream state rely on it.
    assert load_jsonl(tmp_path / "train.jsonl") == prompts


@pytest.mark.parametrize(("line", "error"), [
    ("{not json", r"bad\.jsonl:2: not JSON"),
    ('{"data_source": "d"}', r"bad\.jsonl:2: no 'prompt'"),
    ('{"prompt": [{"role": "user"}]}', r"bad\.jsonl:2: 'prompt' must be"),
    ('{"prompt": []}', r"'prompt' must be"),
    ('{"prompt": "x", "extra_info": [1]}', r"'extra_info' must be an object"),
    ('[1, 2]', r"expected an object"),
    ('{"uid": "train-0", "prompt": "x"}', r"duplicate uid 'train-0'"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"uid": "train-0", "prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=error):
        load_jsonl(path)


def test_parquet_without_pyarrow_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow"):
        load_parquet(tmp_path / "train.parquet")


def test_parquet_loads_verl_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [VERL_ROWS[0], {**VERL_ROWS[0], "data_source": "other",
                           "reward_model": {"ground_truth": "3", "style": "rule"},
                           "extra_info": {"index": 1, "split": "train"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    prompts = load_prompts(str(tmp_path / "train.parquet"))
    assert [p.uid for p in prompts] == ["train-0", "train-1"]
    assert prompts[0].messages == VERL_ROWS[0]["prompt"]
    assert [p.ground_truth for p in prompts] == ["2", "3"]
    assert prompts[1].extra_info == {"index": 1, "split": "train"}


# ---------------------------------------------------------------------------- rendering


class FakeTokenizer:
    """HF-shaped: a template that may write the bos text itself, and encoding that adds
    bos (id 1) when asked to add special tokens."""

    bos_token = "<s>"

    def __init__(self, template_bos: bool) -> None:
        self.template_bos = template_bos
        self.calls: list[bool] = []

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return ("<s>" if self.template_bos else "") + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        self.calls.append(add_special_tokens)
        ids = [1] if add_special_tokens else []
        return {"input_ids": ids + [ord(c) for c in text.removeprefix("<s>")] + ([1] if text.startswith("<s>") else [])}


def test_render_uses_chat_template_and_never_doubles_bos() -> None:
    p = Prompt(uid="u", data_source="d", ground_truth="g", messages=[{"role": "user", "content": "hi"}])
    plain = FakeTokenizer(template_bos=False)
    text, ids = render(p, plain)
    assert text == "[user]hi[assistant]"
    assert plain.calls == [True] and ids[0] == 1 and ids.count(1) == 1
    with_bos = FakeTokenizer(template_bos=True)
    text, ids = render(p, with_bos)
    assert text.startswith("<s>") and with_bos.calls == [False] and ids.count(1) == 1


def test_render_text_prompt_is_verbatim() -> None:
    tok = FakeTokenizer(template_bos=False)
    text, ids = render(Prompt(uid="u", data_source="d", ground_truth="g", text="raw"), tok)
    assert text == "raw" and ids == [1, ord("r"), ord("a"), ord("w")]


def test_render_arithmetic_with_the_tiny_tokenizer() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from services.common.tiny_model import build_tokenizer

    tok, vocab = build_tokenizer()
    prompt = next(p for p in arithmetic_prompts() if p.messages[0]["content"] == "3+8=")
    text, ids = render(prompt, tok)
    assert text == "3+8="
    assert ids == [vocab["<bos>"], vocab["3"], vocab["+"], vocab["8"], vocab["="]]


# ---------------------------------------------------------------------------- stream


def test_stream_is_seeded_and_each_epoch_is_a_permutation() -> None:
    prompts = arithmetic_prompts()
    a = PromptStream(prompts, seed=7).next_batch(300)
    assert a == PromptStream(prompts, seed=7).next_batch(300)
    assert a[:100] != PromptStream(prompts, seed=8).next_batch(100)
    epochs = [a[i:i + 100] for i in range(0, 300, 100)]
    for epoch in epochs:
        assert sorted(p.uid for p in epoch) == sorted(p.uid for p in prompts)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != prompts  # shuffled
    assert PromptStream(prompts, shuffle=False).next_batch(101) == [*prompts, prompts[0]]


def test_stream_resumes_with_the_same_next_batch() -> None:
    prompts = arithmetic_prompts()
    run = PromptStream(prompts, seed=3)
    run.next_batch(37)
    run.next_batch(37)
    state = json.loads(json.dumps(run.state_dict()))
    assert (state["epoch"], state["position"], state["seed"]) == (0, 74, 3)
    expected = run.next_batch(64)  # crosses into epoch 1

    resumed = PromptStream(prompts, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    assert resumed.next_batch(64) == expected
    assert resumed.state_dict() == run.state_dict()
    assert run.state_dict()["epoch"] == 1


def test_stream_refuses_state_of_another_dataset() -> None:
    state = PromptStream(arithmetic_prompts()).state_dict()
    other = PromptStream(arithmetic_prompts()[:99])
    with pytest.raises(ValueError, match="another dataset"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="at least one"):
        PromptStream([])
