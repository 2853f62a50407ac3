"""A scripted stand-in for rollout servers: leases groups from a real learner and submits
trajectories that depend only on the prompt, so two runs see identical batches."""

from __future__ import annotations

import hashlib
import time

import grpc

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import learner_pb2_grpc as pbg
from tests.support.procs import TOKENS

MD = (("authorization", f"Bearer {TOKENS['rollout']}"),)


def deterministic_group(lease: pb.Lease, g: pb.PromptGroup, version: int | None = None) -> pb.TrajectoryGroup:
    seed = int(hashlib.sha256(bytes(g.prompt_token_ids)).hexdigest()[:8], 16)
    samples = []
    for j in range(lease.sampling.n):
        x = (seed >> j) & 0xFF
        ids = [3 + (x % 10), 3 + ((x >> 3) % 10), 2]
        samples.append(pb.Sample(response_token_ids=ids, logprobs=[-1.5, -1.0, -0.5][: len(ids)],
                                 reward=float((x + j) % 3 == 0), finish_reason="stop",
                                 adapter_version=lease.min_version if version is None else version))
    return pb.TrajectoryGroup(lease_id=lease.lease_id, group_id=g.group_id, prompt_token_ids=g.prompt_token_ids,
                              adapter_name=lease.adapter_name, samples=samples)


class ScriptedRollout:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pbg.LearnerStub(self.channel)

    def lease(self, max_groups: int = 8, timeout_s: float = 60) -> pb.Lease | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.stub.LeasePrompts(pb.LeaseRequest(worker_id="scripted", max_groups=max_groups),
                                       metadata=MD, timeout=10)
            if r.finished:
                return None
            if r.leases:
                return r.leases[0]
            time.sleep(r.retry_after_ms / 1000)
        raise TimeoutError("no lease granted")

    def submit(self, groups: list[pb.TrajectoryGroup]) -> list[pb.SubmitAck]:
        return list(self.stub.SubmitTrajectories(iter(groups), metadata=MD, timeout=30))

    def run_until_finished(self, timeout_s: float = 120) -> int:
        """Lease and submit one lease at a time (a deterministic arrival order)."""
        submitted, deadline = 0, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                lease = self.lease(timeout_s=deadline - time.monotonic())
            except grpc.RpcError:
                return submitted  # the learner went away
            if lease is None:
                return submitted
            acks = self.submit([deterministic_group(lease, g) for g in lease.groups])
            submitted += sum(a.code == 0 for a in acks)
        raise TimeoutError("training did not finish")

    def close(self) -> None:
        self.channel.close()
