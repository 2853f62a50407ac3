"""AdapterVersion <-> protobuf/JSON, and generated code in sync with proto/."""

import json

from services.common import protogen
from services.common.records import AdapterVersion

REC = AdapterVersion(name="p", version=3, sha256="a" * 64, size_bytes=10, base_model_fingerprint="fp",
                     rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"), learner_step=7,
                     created_at_ms=1_700_000_000_123, publisher_epoch=2, adapter_config_json='{"r": 8}',
                     pinned=True)


def test_pb_round_trip():
    assert AdapterVersion.from_pb(REC.to_pb()) == REC


def test_json_round_trip_and_redis_cjson_quirks():
    assert AdapterVersion.from_json(REC.to_json(), pinned=True) == REC
    d = json.loads(REC.to_json())
    d.update(version=3.0, target_modules={})  # how Redis' cjson writes numbers and an empty list
    back = AdapterVersion.from_json(json.dumps(d))
    assert back.version == 3 and isinstance(back.version, int) and back.target_modules == ()


def test_generated_code_matches_proto():
    assert protogen.check() == 0
