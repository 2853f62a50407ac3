"""A small Learner lease server for the rollout tests (the real one is the learner service).

It hands out `--groups` arithmetic prompt groups in leases of 2, re-leases groups whose
deadline passed, accepts each group id once (ALREADY_EXISTS after that) and keeps its
state in a JSON file written before every ack, so it can be SIGKILLed and restarted.

    python -m tests.support.lease_server --port P --state FILE --groups 24 --adapter NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import grpc

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import learner_pb2_grpc as pbg
from loraloop.v1 import rollout_pb2 as rpb

VOCAB = {c: i + 3 for i, c in enumerate("0123456789+=")}


def prompt(k: int) -> tuple[str, list[int], str]:
    a, b = k % 10, (k * 7 + 3) % 10
    text = f"{a}+{b}="
    return text, [1] + [VOCAB[c] for c in text], f"{a + b:02d}"


class State:
    def __init__(self, path: Path, groups: int) -> None:
        self.path = path
        if path.exists():
            self.d = json.loads(path.read_text())
        else:
            self.d = {"groups": groups, "accepted": [], "duplicates": 0, "refused": 0, "leases": {},
                      "lease_count": {}, "restarts": 0}
        self.d["restarts"] += 1
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.d))
        os.replace(tmp, self.path)


class LeaseServer(pbg.LearnerServicer):
    def __init__(self, state: State, adapter: str, min_version: int, deadline_s: float) -> None:
        self.s, self.adapter, self.min_version, self.deadline_s = state, adapter, min_version, deadline_s

    def _free_groups(self) -> list[int]:
        accepted = set(self.s.d["accepted"])
        now = time.time()
        busy = {int(g) for lease in self.s.d["leases"].values() if lease["deadline"] > now for g in lease["groups"]}
        return [k for k in range(self.s.d["groups"]) if f"g{k}" not in accepted and k not in busy]

    async def LeasePrompts(self, request, context):
        if len(self.s.d["accepted"]) >= self.s.d["groups"]:
            return pb.LeaseResponse(finished=True)
        free = self._free_groups()[: min(2, request.max_groups or 2)]
        if not free:
            return pb.LeaseResponse(retry_after_ms=100)
        lease_id = uuid.uuid4().hex[:12]
        deadline = time.time() + self.deadline_s
        self.s.d["leases"][lease_id] = {"groups": free, "deadline": deadline}
        for k in free:
            self.s.d["lease_count"][str(k)] = self.s.d["lease_count"].get(str(k), 0) + 1
        self.s.save()
        groups = []
        for k in free:
            text, ids, truth = prompt(k)
            groups.append(pb.PromptGroup(group_id=f"g{k}", prompt_token_ids=ids, prompt_text=text,
                                         data_source="arithmetic", ground_truth=truth))
        return pb.LeaseResponse(leases=[pb.Lease(
            lease_id=lease_id, adapter_name=self.adapter, min_version=self.min_version,
            deadline_ms=int(deadline * 1000), groups=groups, reward_fn="arithmetic",
            sampling=rpb.SamplingParams(n=4, temperature=1.0, max_tokens=3))])

    async def SubmitTrajectories(self, request_iterator, context):
        async for g in request_iterator:
            ok = all(len(s.response_token_ids) == len(s.logprobs) > 0 for s in g.samples) and len(g.samples) == 4
            if not ok or g.adapter_name != self.adapter:  # the real learner refuses another run's group too
                self.s.d["refused"] += 1
                self.s.d.setdefault("refused_adapters", []).append(g.adapter_name)
                self.s.save()
                yield pb.SubmitAck(group_id=g.group_id, code=pb.ACK_INVALID_ARGUMENT,
                                   message="lengths disagree" if not ok else f"adapter {g.adapter_name!r}")
            elif g.group_id in self.s.d["accepted"]:
                self.s.d["duplicates"] += 1
                self.s.save()
                yield pb.SubmitAck(group_id=g.group_id, code=pb.ACK_ALREADY_EXISTS, message="already accepted")
            else:
                self.s.d["accepted"].append(g.group_id)
                self.s.d.setdefault("versions", []).append(sorted({s.adapter_version for s in g.samples}))
                self.s.d.setdefault("adapters", []).append(g.adapter_name)
                self.s.save()  # durable before the ack
                await asyncio.sleep(float(os.environ.get("LEASE_SERVER_ACK_DELAY", "0")))
                yield pb.SubmitAck(group_id=g.group_id, code=pb.ACK_OK)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--groups", type=int, default=24)
    p.add_argument("--adapter", default="")
    p.add_argument("--min-version", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=20.0)
    a = p.parse_args()
    server = grpc.aio.server()
    pbg.add_LearnerServicer_to_server(
        LeaseServer(State(Path(a.state), a.groups), a.adapter, a.min_version, a.deadline_s), server)
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    await server.start()
    print("lease server ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
