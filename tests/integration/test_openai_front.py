"""The rollout server's OpenAI-compatible HTTP front, through the official `openai` client,
against the real vLLM CPU engine (issue 16, points 1 and 4): models list, completions and
chat, streaming and not, pinned and latest, the version in every response, 401/404/400, and
more adapters than the engine's slots."""

from __future__ import annotations

import re
import urllib.request

import httpx
import openai
import pytest

from services.broker.client import BrokerClient
from tests.support.peft_adapters import make_peft_adapter
from tests.support.procs import TOKENS, RolloutProc
from tests.support.rollout_client import generate

CPU_LORAS = 4  # the front's server keeps at most this many versions loaded


@pytest.fixture(scope="module")
def front(base_stack, tmp_path_factory):
    """A rollout server of its own (small adapter capacity, so evictions happen here and not
    in the shared server other tests inspect), with two versions of adapter `oa`."""
    work = tmp_path_factory.mktemp("openai")
    server = RolloutProc(base_stack.model, base_stack.broker.target, work, "--engine.max_loras=2",
                         f"--engine.max_cpu_loras={CPU_LORAS}", "--engine.max_lora_rank=16")
    server.model, server.adapters = base_stack.model, {}
    with BrokerClient(base_stack.broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("oa")
        for seed in (21, 22):
            d = make_peft_adapter(base_stack.model, work / f"oa-{seed}", seed=seed)
            rec, _ = c.publish_dir("oa", epoch, d, base_stack.fingerprint)
            server.adapters[rec.version] = d
    yield server
    server.stop()


def client(front, token: str = TOKENS["client"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.openai_base_url, api_key=token, max_retries=0, timeout=60)


def base_id(front) -> str:
    return client(front).models.list().data[0].id


def test_models_lists_base_names_and_live_versions(front):
    c = client(front)
    c.completions.create(model="oa@v1", prompt="3+8=", max_tokens=2, temperature=0)
    ids = [m.id for m in c.models.list().data]
    assert ids[0] == str(front.model)  # vLLM's convention: the model path is the base's id
    assert "oa" in ids and "oa@v1" in ids


def test_completions_report_the_version_that_generated_them(front):
    c = client(front)
    latest = c.completions.with_raw_response.create(model="oa", prompt="3+8=", max_tokens=3, temperature=0)
    assert latest.headers["x-loraloop-adapter"] == "oa@v2"
    body = latest.parse()
    assert body.model == "oa@v2" and body.usage.completion_tokens == 3 and body.usage.prompt_tokens == 5
    assert c.completions.create(model="oa@latest", prompt="3+8=", max_tokens=3, temperature=0).model == "oa@v2"
    pinned = c.completions.create(model="oa@v1", prompt="3+8=", max_tokens=3, temperature=0)
    assert pinned.model == "oa@v1"
    base = c.completions.create(model=base_id(front), prompt="3+8=", max_tokens=3, temperature=0)
    assert base.model == base_id(front)


def test_http_and_grpc_give_the_same_greedy_tokens(front):
    """The same version through both fronts: one engine, one adapter, same tokens and log-probs."""
    c = client(front)
    for model, sel in (("oa@v1", "oa@v1"), (base_id(front), "")):
        got = c.completions.create(model=model, prompt="3+8=", max_tokens=8, temperature=0, logprobs=1,
                                   extra_body={"return_tokens_as_token_ids": True})  # vLLM's extension
        ref = generate(front.target, [1, 6, 13, 11, 14], sel, max_tokens=8)  # "<bos>3+8="
        assert got.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs[0], abs=1e-5)
        assert [int(t.removeprefix("token_id:")) for t in got.choices[0].logprobs.tokens] == ref.tokens[0]


def test_versions_differ_in_what_they_generate(front):
    c = client(front)
    lps = {m: c.completions.create(model=m, prompt="3+8=", max_tokens=6, temperature=0, logprobs=1)
           .choices[0].logprobs.token_logprobs for m in ("oa@v1", "oa@v2")}
    assert max(abs(a - b) for a, b in zip(lps["oa@v1"], lps["oa@v2"], strict=True)) > 0.01


def test_sampling_parameters(front):
    c = client(front)
    kw = dict(model="oa", prompt="3+8=", max_tokens=4, n=3, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True})  # vLLM's extension: every sample runs to max_tokens
    many = c.completions.create(**kw)
    assert len(many.choices) == 3 and many.usage.completion_tokens == 12
    assert {ch.finish_reason for ch in many.choices} == {"length"}
    again = c.completions.create(**kw)
    assert [ch.text for ch in again.choices] == [ch.text for ch in many.choices]  # seed
    stopped = c.completions.create(model=base_id(front), prompt="3+8=", max_tokens=12, temperature=0,
                                   stop=[c.completions.create(model=base_id(front), prompt="3+8=", max_tokens=2,
                                                              temperature=0).choices[0].text[1]])
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_streaming_and_not(front):
    c = client(front)
    msgs = [{"role": "user", "content": "3+8="}]
    whole = c.chat.completions.create(model="oa@v1", messages=msgs, max_tokens=4, temperature=0)
    assert whole.model == "oa@v1" and whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="oa@v1", messages=msgs, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert {ch.model for ch in chunks} == {"oa@v1"}
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices
    plain = list(c.chat.completions.create(model="oa", messages=msgs, max_tokens=4, temperature=0, stream=True))
    assert all(ch.usage is None for ch in plain)  # usage only when asked for
    assert {ch.model for ch in plain} == {"oa@v2"}


def test_completion_streaming(front):
    c = client(front)
    with c.completions.with_streaming_response.create(model="oa@v2", prompt="3+8=", max_tokens=5,
                                                      temperature=0, stream=True) as resp:
        assert resp.headers["x-loraloop-adapter"] == "oa@v2"
        chunks = list(resp.parse())
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == \
        c.completions.create(model="oa@v2", prompt="3+8=", max_tokens=5, temperature=0).choices[0].text


def test_errors_are_openai_errors_with_the_right_status(front):
    c = client(front)
    for model in ("no-such-adapter", "oa@v99", "Not A Model!"):
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model=model, prompt="3+8=", max_tokens=2)
        assert e.value.status_code == 404 and e.value.body["param"] == "model", model
    with pytest.raises(openai.AuthenticationError):
        client(front, "wrong-token").completions.create(model="oa", prompt="3+8=", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(front, "wrong-token").models.list()
    for bad in (dict(temperature=-1.0), dict(max_tokens=-5), dict(n=0), dict(top_p=2.0), dict(max_tokens=100_000)):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="oa", prompt="3+8=", **bad)
        assert e.value.status_code == 400, bad
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="oa", messages="not a list", max_tokens=2)  # type: ignore[arg-type]
    r = httpx.post(f"{front.openai_base_url}/completions", content=b"{not json",
                   headers={"authorization": f"Bearer {TOKENS['client']}"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_metrics_and_health(front):
    client(front).completions.create(model="oa@v1", prompt="3+8=", max_tokens=2, temperature=0)
    root = front.openai_base_url.removesuffix("/v1")
    assert urllib.request.urlopen(f"{root}/health").read() == b"ok"
    text = urllib.request.urlopen(f"{root}/metrics").read().decode()
    assert re.search(r'loraloop_requests_total\{endpoint="completions",model="oa",source="http",status="200"\} [1-9]', text)
    assert re.search(r'loraloop_generated_tokens_total\{model="oa",source="http"\} [1-9]', text)
    assert 'loraloop_time_to_first_token_seconds_bucket' in text
    assert re.search(r'loraloop_adapter_loads_total\{kind="new",model="oa"\} [1-9]', text)


def test_more_adapters_than_slots_are_all_served(front, base_stack):
    """2 engine slots, CPU_LORAS versions kept loaded; 2 * CPU_LORAS + 1 distinct adapters all
    answer, in turn and again, and the swap metric counts the reloads."""
    names = [f"many{i}" for i in range(2 * CPU_LORAS + 1)]
    with BrokerClient(base_stack.broker.target, TOKENS["learner"]) as b:
        for i, name in enumerate(names):
            epoch, _ = b.acquire_publisher(name)
            d = make_peft_adapter(base_stack.model, front.workdir / name, seed=100 + i, rank=4)
            b.publish_dir(name, epoch, d, base_stack.fingerprint)
    c = client(front)
    first = {}
    for _ in range(2):
        for name in names:
            r = c.completions.create(model=f"{name}@v1", prompt="3+8=", max_tokens=4, temperature=0, logprobs=1)
            assert r.model == f"{name}@v1"
            lp = r.choices[0].logprobs.token_logprobs
            assert first.setdefault(name, lp) == pytest.approx(lp, abs=1e-5)  # a reload serves the same weights
    root = front.openai_base_url.removesuffix("/v1")
    text = urllib.request.urlopen(f"{root}/metrics").read().decode()
    evictions = sum(float(v) for v in re.findall(r'loraloop_adapter_evictions_total\{model="many\d+"\} (\S+)', text))
    swaps = sum(float(v) for v in re.findall(r'loraloop_adapter_loads_total\{kind="swap",model="many\d+"\} (\S+)', text))
    assert evictions >= len(names) and swaps >= len(names) - CPU_LORAS
    loaded = float(re.search(r"^loraloop_adapters_loaded (\S+)", text, re.M).group(1))
    assert loaded <= CPU_LORAS
