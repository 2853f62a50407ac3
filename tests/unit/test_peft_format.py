"""The safetensors header parser and the LoRA adapter check, on hand-built files."""

import json
import struct

import pytest

from services.common.errors import InvalidArgument
from services.common.peft_format import (
    check_lora_adapter,
    parse_adapter_config,
    parse_safetensors_header,
)
from tests.support.adapters import make_adapter


def _file(header: dict, data_len: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_len


def test_header_parses_from_prefix_and_waits_for_more():
    _cfg, data = make_adapter(rank=4, layers=1, hidden=8)
    n = struct.unpack("<Q", data[:8])[0]
    assert parse_safetensors_header(data[:7]) is None
    assert parse_safetensors_header(data[: 8 + n - 1]) is None
    h = parse_safetensors_header(data[: 8 + n])
    assert h is not None and h.expected_file_size == len(data)
    # 2 modules x (A [4, 8] + B [8, 4]) float32 = 2 * 2 * 32 * 4 bytes
    assert h.expected_file_size - h.data_start == 2 * 2 * 32 * 4


@pytest.mark.parametrize("header,msg", [
    ({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 15]}}, "offsets do not match"),
    ({"t": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, "gaps"),
    ({"t": {"dtype": "F32"}}, "malformed"),
])
def test_bad_headers(header, msg):
    with pytest.raises(InvalidArgument, match=msg):
        parse_safetensors_header(_file(header, 16))


def test_huge_header_length_is_refused_before_reading():
    with pytest.raises(InvalidArgument, match="out of range"):
        parse_safetensors_header(struct.pack("<Q", 2**40))


def _check(cfg, data):
    return check_lora_adapter(parse_adapter_config(json.dumps(cfg)), parse_safetensors_header(data))


def test_adapter_matching_its_config():
    cfg, data = make_adapter(rank=4, modules=("q_proj", "v_proj", "o_proj"))
    spec = _check(cfg, data)
    assert (spec.rank, spec.alpha, spec.target_modules) == (4, 8.0, ("o_proj", "q_proj", "v_proj"))
    assert len(spec.module_paths) == 2 * 3  # 2 layers x 3 modules


def test_all_linear_and_regex_targets_accepted():
    cfg, data = make_adapter(rank=2)
    assert _check(dict(cfg, target_modules="all-linear"), data).rank == 2
    assert _check(dict(cfg, target_modules=r".*\.(q_proj|v_proj)"), data).rank == 2
    with pytest.raises(InvalidArgument, match="not among target_modules"):
        _check(dict(cfg, target_modules=r".*\.k_proj"), data)


def test_paths_as_targets_match_like_peft():
    cfg, data = make_adapter(rank=2, layers=2)
    paths = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert _check(dict(cfg, target_modules=paths), data).rank == 2
    with pytest.raises(InvalidArgument, match="not among target_modules"):
        _check(dict(cfg, target_modules=paths[:3]), data)  # layer 1 v_proj missing
    with pytest.raises(InvalidArgument, match="not among target_modules"):
        _check(dict(cfg, target_modules=["proj"]), data)  # a suffix of a name is not a match


def test_rank_and_module_mismatches_refused():
    cfg, data = make_adapter(rank=4)
    with pytest.raises(InvalidArgument, match="config declares r=8"):
        _check(dict(cfg, r=8), data)
    with pytest.raises(InvalidArgument, match="not among target_modules"):
        _check(dict(cfg, target_modules=["q_proj"]), data)
    assert _check(dict(cfg, r=8, rank_pattern={"q_proj": 4, "v_proj": 4}), data).rank == 4


def test_missing_half_and_non_lora_tensors_refused():
    header = {"base_model.model.x.q_proj.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}
    with pytest.raises(InvalidArgument, match="lacks its lora_B"):
        check_lora_adapter({"r": 2}, parse_safetensors_header(_file(header, 32)))
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}
    with pytest.raises(InvalidArgument, match="not a LoRA weight"):
        check_lora_adapter({"r": 2}, parse_safetensors_header(_file(header, 32)))


@pytest.mark.parametrize("cfg,msg", [
    ("not json", "not valid JSON"), ('{"r": 0}', "positive integer"), ('{"r": true}', "positive integer"),
    ('{"r": 4, "peft_type": "IA3"}', "only LoRA"), ('{"r": 4, "use_dora": true}', "DoRA"),
    ('{"r": 4, "lora_alpha": "x"}', "must be a number"), ("[1]", "JSON object"),
])
def test_bad_configs(cfg, msg):
    with pytest.raises(InvalidArgument, match=msg):
        parse_adapter_config(cfg)
