"""How the rollout engine asks vLLM for its executor and for text (issue 17): the model in the
engine-core process on a CPU build, and no text (nor log-prob token strings) for training."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from services.rollout import engine as eng
from services.rollout.config import EngineConfig


def _params(**kw):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return eng.Engine._make_params(SamplingParams, RequestOutputKind, eng.Sampling(**kw), False)


def test_executor_auto_is_uni_for_one_cpu_rank_and_vllms_choice_otherwise(monkeypatch):
    monkeypatch.setattr(eng, "_is_cpu", lambda: True)
    assert eng.Engine(EngineConfig()).executor() == "uni"
    assert eng.Engine(EngineConfig(tensor_parallel_size=2)).executor() is None
    assert eng.Engine(EngineConfig(executor="mp")).executor() == "mp"
    monkeypatch.setattr(eng, "_is_cpu", lambda: False)
    assert eng.Engine(EngineConfig()).executor() is None
    assert eng.Engine(EngineConfig(executor="uni")).executor() == "uni"
    with pytest.raises(ValidationError):
        EngineConfig(executor="ray")


def test_keep_uni_turns_the_flag_off_only_while_the_config_is_made(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with eng._keep_uni(True):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    with pytest.raises(RuntimeError), eng._keep_uni(True):
        raise RuntimeError("config refused")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    with eng._keep_uni(False):
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ


def test_no_text_unless_asked_or_stop_strings_need_it():
    assert _params().detokenize is True
    assert _params(detokenize=False).detokenize is False
    assert _params(detokenize=False, stop=("\n",)).detokenize is True  # stop strings match on text
