"""Small helpers over the Rollout gRPC API for tests."""

from __future__ import annotations

import queue
import threading
import time

import grpc

from loraloop.v1 import rollout_pb2 as pb
from loraloop.v1 import rollout_pb2_grpc as pbg
from tests.support.procs import TOKENS

MD = (("authorization", f"Bearer {TOKENS['client']}"),)


class Completion:
    def __init__(self, msgs: list[pb.GenerateResponse], n: int) -> None:
        self.msgs = msgs
        self.tokens = [[i for m in msgs if m.index == k for i in m.token_ids] for k in range(n)]
        self.logprobs = [[x for m in msgs if m.index == k for x in m.logprobs] for k in range(n)]
        self.versions = {(m.adapter_name, m.adapter_version) for m in msgs}
        self.finish = [next(m.finish_reason for m in msgs if m.index == k and m.finished) for k in range(n)]


def generate(target: str, prompt_ids: list[int], adapter: str = "", max_tokens: int = 16, n: int = 1,
             temperature: float = 0.0, ignore_eos: bool = True, timeout: float = 120) -> Completion:
    with grpc.insecure_channel(target) as ch:
        stream = pbg.RolloutStub(ch).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt_ids), adapter=adapter,
            params=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, logprobs=True,
                                     ignore_eos=ignore_eos)), metadata=MD, timeout=timeout)
        return Completion(list(stream), n)


def list_adapters(target: str) -> pb.ListLoadedResponse:
    with grpc.insecure_channel(target) as ch:
        return pbg.RolloutStub(ch).ListAdapters(pb.ListLoadedRequest(), metadata=MD, timeout=10)


class AdapterWatch:
    """WatchAdapters read on a thread: `until(pred, timeout)` returns the first snapshot that
    satisfies `pred` (snapshots before it are dropped) or raises AssertionError on timeout."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.call = pbg.RolloutStub(self.channel).WatchAdapters(pb.ListLoadedRequest(), metadata=MD, timeout=300)
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for snap in self.call:
                self.q.put(snap)
        except grpc.RpcError as e:
            self.q.put(e)

    def until(self, pred, timeout: float = 60) -> pb.ListLoadedResponse:
        deadline = time.monotonic() + timeout
        while True:
            try:
                snap = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no WatchAdapters snapshot satisfied the condition in time") from None
            if isinstance(snap, grpc.RpcError):
                raise AssertionError(f"WatchAdapters ended: {snap}")
            if pred(snap):
                return snap

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()
        self.thread.join(10)
