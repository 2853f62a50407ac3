"""AdapterVersion: the record of one committed adapter version (domain side of
`loraloop.v1.AdapterRecord`), with its protobuf and JSON forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from loraloop.v1 import adapters_pb2 as pb


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    sha256: str
    size_bytes: int
    base_model_fingerprint: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    learner_step: int = 0
    created_at_ms: int = 0
    publisher_epoch: int = 0
    adapter_config_json: str = field(default="{}", repr=False)
    pinned: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("pinned")
        d["target_modules"] = list(self.target_modules)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, pinned: bool = False) -> AdapterVersion:
        d = json.loads(text)
        # Redis' cjson writes an empty list as {} and every number as a float.
        tm = d.get("target_modules") or []
        return cls(
            name=d["name"], version=int(d["version"]), sha256=d["sha256"],
            size_bytes=int(d["size_bytes"]), base_model_fingerprint=d["base_model_fingerprint"],
            rank=int(d["rank"]), alpha=float(d["alpha"]),
            target_modules=tuple(tm if isinstance(tm, list) else []),
            learner_step=int(d.get("learner_step", 0)), created_at_ms=int(d.get("created_at_ms", 0)),
            publisher_epoch=int(d.get("publisher_epoch", 0)),
            adapter_config_json=d.get("adapter_config_json", "{}"), pinned=pinned,
        )

    def to_pb(self) -> pb.AdapterRecord:
        return pb.AdapterRecord(
            name=self.name, version=self.version, sha256=self.sha256, size_bytes=self.size_bytes,
            base_model_fingerprint=self.base_model_fingerprint, rank=self.rank, alpha=self.alpha,
            target_modules=list(self.target_modules), learner_step=self.learner_step,
            created_at_ms=self.created_at_ms, publisher_epoch=self.publisher_epoch,
            adapter_config_json=self.adapter_config_json, pinned=self.pinned,
        )

    @classmethod
    def from_pb(cls, m: pb.AdapterRecord) -> AdapterVersion:
        return cls(
            name=m.name, version=m.version, sha256=m.sha256, size_bytes=m.size_bytes,
            base_model_fingerprint=m.base_model_fingerprint, rank=m.rank, alpha=m.alpha,
            target_modules=tuple(m.target_modules), learner_step=m.learner_step,
            created_at_ms=m.created_at_ms, publisher_epoch=m.publisher_epoch,
            adapter_config_json=m.adapter_config_json, pinned=m.pinned,
        )

    def with_pinned(self, pinned: bool) -> AdapterVersion:
        return replace(self, pinned=pinned)
