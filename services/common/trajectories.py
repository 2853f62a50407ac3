"""The records the learner and the rollout servers exchange (domain side of learner.proto):
a prompt group to sample, a lease of groups, a generated sample, a returned trajectory
group, a lease refusal and the learner's answer to one submitted group. Both sides build
and read these; protobuf appears only in their to_pb/from_pb."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import rollout_pb2 as rpb

FLOAT32_MAX = 3.4028234663852886e38


def finite32(x: float) -> bool:
    """Finite once the trainer makes it a float32: a reward of 1e39 passed math.isfinite, became
    inf in the batch, and its group's advantages NaN. The learner refuses a group with such a
    reward or log-prob; the rollout scores a reward past it as 0 with an error."""
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


@dataclass(frozen=True)
class GroupSpec:
    """One prompt to be sampled n times (`loraloop.v1.PromptGroup`)."""

    group_id: str
    prompt_uid: str
    prompt_token_ids: tuple[int, ...]
    prompt_text: str = ""
    data_source: str = ""
    ground_truth: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)

    def to_pb(self) -> pb.PromptGroup:
        return pb.PromptGroup(
            group_id=self.group_id, prompt_token_ids=list(self.prompt_token_ids),
            prompt_text=self.prompt_text, data_source=self.data_source,
            ground_truth=self.ground_truth, extra_info_json=json.dumps(self.extra_info))

    @classmethod
    def from_pb(cls, m: pb.PromptGroup) -> GroupSpec:
        return cls(group_id=m.group_id, prompt_uid=m.group_id.rsplit(":", 1)[0],
                   prompt_token_ids=tuple(m.prompt_token_ids), prompt_text=m.prompt_text,
                   data_source=m.data_source, ground_truth=m.ground_truth,
                   extra_info=json.loads(m.extra_info_json) if m.extra_info_json else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupSpec:
        return cls(**{**d, "prompt_token_ids": tuple(d["prompt_token_ids"])})


@dataclass(frozen=True)
class SampleRecord:
    """One generated response (`loraloop.v1.Sample`)."""

    response_token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    reward: float
    adapter_version: int
    finish_reason: str = ""
    reward_details_json: str = ""
    reward_error: str = ""

    def to_pb(self) -> pb.Sample:
        return pb.Sample(
            response_token_ids=list(self.response_token_ids), logprobs=list(self.logprobs),
            reward=self.reward, reward_details_json=self.reward_details_json,
            finish_reason=self.finish_reason, adapter_version=self.adapter_version,
            reward_error=self.reward_error)

    @classmethod
    def from_pb(cls, m: pb.Sample) -> SampleRecord:
        return cls(response_token_ids=tuple(m.response_token_ids), logprobs=tuple(m.logprobs),
                   reward=m.reward, adapter_version=m.adapter_version, finish_reason=m.finish_reason,
                   reward_details_json=m.reward_details_json, reward_error=m.reward_error)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleRecord:
        return cls(**{**d, "response_token_ids": tuple(d["response_token_ids"]),
                      "logprobs": tuple(d["logprobs"])})


@dataclass(frozen=True)
class TrajectoryGroupRecord:
    """The n samples of one group, as returned under a lease (`loraloop.v1.TrajectoryGroup`)."""

    lease_id: str
    group_id: str
    prompt_token_ids: tuple[int, ...]
    adapter_name: str
    samples: tuple[SampleRecord, ...]

    def to_pb(self) -> pb.TrajectoryGroup:
        return pb.TrajectoryGroup(
            lease_id=self.lease_id, group_id=self.group_id,
            prompt_token_ids=list(self.prompt_token_ids), adapter_name=self.adapter_name,
            samples=[s.to_pb() for s in self.samples])

    @classmethod
    def from_pb(cls, m: pb.TrajectoryGroup) -> TrajectoryGroupRecord:
        return cls(lease_id=m.lease_id, group_id=m.group_id, prompt_token_ids=tuple(m.prompt_token_ids),
                   adapter_name=m.adapter_name, samples=tuple(SampleRecord.from_pb(s) for s in m.samples))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrajectoryGroupRecord:
        return cls(**{**d, "prompt_token_ids": tuple(d["prompt_token_ids"]),
                      "samples": tuple(SampleRecord.from_dict(s) for s in d["samples"])})


@dataclass(frozen=True)
class Lease:
    """Groups handed to one worker until `deadline` (unix seconds). The learner's table fills
    the first seven fields; `sampling` (the learner's template, `n` set to the table's) and
    `reward_fn` travel with it to the rollout server."""

    lease_id: str
    worker_id: str
    adapter_name: str
    min_version: int
    deadline: float
    n: int
    groups: tuple[GroupSpec, ...]
    sampling: rpb.SamplingParams | None = field(default=None, compare=False, repr=False)
    reward_fn: str = ""

    def to_pb(self, sampling: rpb.SamplingParams | None = None, reward_fn: str = "") -> pb.Lease:
        """`sampling` is the learner's configured template; its `n` is overridden by the
        table's, since `accept` counts exactly that many samples."""
        params = rpb.SamplingParams()
        if sampling is not None:
            params.CopyFrom(sampling)
        params.n = self.n
        return pb.Lease(lease_id=self.lease_id, adapter_name=self.adapter_name,
                        min_version=self.min_version, deadline_ms=int(self.deadline * 1000),
                        groups=[g.to_pb() for g in self.groups], sampling=params, reward_fn=reward_fn)

    @classmethod
    def from_pb(cls, m: pb.Lease, worker_id: str = "") -> Lease:
        return cls(lease_id=m.lease_id, worker_id=worker_id, adapter_name=m.adapter_name,
                   min_version=m.min_version, deadline=m.deadline_ms / 1000, n=m.sampling.n or 1,
                   groups=tuple(GroupSpec.from_pb(g) for g in m.groups), sampling=m.sampling,
                   reward_fn=m.reward_fn)


class RefusalReason(StrEnum):
    NOTHING_PENDING = "nothing_pending"
    BACKPRESSURE = "backpressure"
    STALENESS = "staleness"
    NO_ADAPTER_VERSION = "no_adapter_version"


@dataclass(frozen=True)
class Refusal:
    """No lease now: why, and when to ask again."""

    reason: RefusalReason
    retry_after_ms: int

    def to_pb(self) -> pb.LeaseResponse:
        return pb.LeaseResponse(retry_after_ms=self.retry_after_ms)


class AckCode(IntEnum):
    """What the learner did with one submitted group (`loraloop.v1.AckCode`)."""

    OK = pb.ACK_OK
    INVALID_ARGUMENT = pb.ACK_INVALID_ARGUMENT
    ALREADY_EXISTS = pb.ACK_ALREADY_EXISTS
    FAILED_PRECONDITION = pb.ACK_FAILED_PRECONDITION

    @property
    def delivered(self) -> bool:
        """The learner has the group (now or from an earlier send): do not send it again."""
        return self in (AckCode.OK, AckCode.ALREADY_EXISTS)


@dataclass(frozen=True)
class AcceptResult:
    """The learner's answer to one submitted group (`loraloop.v1.SubmitAck`)."""

    group_id: str
    status: AckCode
    message: str = ""

    def to_pb(self) -> pb.SubmitAck:
        return pb.SubmitAck(group_id=self.group_id, code=int(self.status), message=self.message)

    @classmethod
    def from_pb(cls, m: pb.SubmitAck) -> AcceptResult:
        return cls(m.group_id, AckCode(m.code), m.message)
