"""The AdapterRegistry gRPC servicer. Each RPC is protobuf -> domain call -> protobuf; the
logic lives in services.broker.registry, the process in services.broker.app."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

from loraloop.v1 import adapters_pb2 as pb
from loraloop.v1 import adapters_pb2_grpc as pb_grpc
from services.broker.registry import AdapterRegistry, PublishIntent
from services.common.errors import InvalidArgument

SERVICE = "loraloop.v1.AdapterRegistry"
_ALL = frozenset({"learner", "rollout", "client"})
_READ = _ALL
ROLES_OF_METHOD = {
    f"/{SERVICE}/AcquirePublisher": frozenset({"learner"}),
    f"/{SERVICE}/Publish": frozenset({"learner"}),
    f"/{SERVICE}/Pin": frozenset({"learner"}),
    f"/{SERVICE}/Unpin": frozenset({"learner"}),
    f"/{SERVICE}/GetAdapter": _READ,
    f"/{SERVICE}/ListVersions": _READ,
    f"/{SERVICE}/ListAdapters": _READ,
    f"/{SERVICE}/Fetch": _READ,
    f"/{SERVICE}/FetchStaged": frozenset({"rollout"}),  # bytes not yet a version: not for clients
    f"/{SERVICE}/Watch": frozenset({"learner", "rollout"}),
}


class AdapterRegistryServicer(pb_grpc.AdapterRegistryServicer):
    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    async def AcquirePublisher(self, request: pb.AcquirePublisherRequest, context) -> pb.AcquirePublisherResponse:
        epoch, latest = await self.registry.acquire_publisher(request.name)
        return pb.AcquirePublisherResponse(name=request.name, epoch=epoch, latest_version=latest)

    async def Publish(self, request_iterator: AsyncIterator[pb.PublishRequest], context) -> pb.PublishResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("a publish stream starts with its header")
        h = first.header
        intent = PublishIntent(h.name, h.epoch, h.base_model_fingerprint, h.learner_step,
                               h.adapter_config_json, h.size_bytes, h.sha256, h.publish_id)

        async def chunks() -> AsyncIterator[bytes]:
            async for req in request_iterator:
                if req.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only chunks may follow the publish header")
                yield req.chunk

        record, dedup = await self.registry.publish(intent, chunks())
        return pb.PublishResponse(record=record.to_pb(), deduplicated=dedup)

    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.AdapterRecord:
        return (await self.registry.get(request.ref.name, request.ref.version)).to_pb()

    async def ListVersions(self, request: pb.ListVersionsRequest, context) -> pb.ListVersionsResponse:
        records, latest = await self.registry.list_versions(request.name)
        return pb.ListVersionsResponse(records=[r.to_pb() for r in records], latest_version=latest)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        rows = await self.registry.list_adapters()
        return pb.ListAdaptersResponse(adapters=[
            pb.AdapterSummary(name=n, latest_version=lv, live_versions=live, publisher_epoch=e)
            for n, lv, live, e in rows
        ])

    async def Fetch(self, request: pb.FetchRequest, context) -> AsyncIterator[pb.FetchResponse]:
        record = await self.registry.get(request.ref.name, request.ref.version)
        chunks = await self.registry.read(record, request.chunk_bytes)
        yield pb.FetchResponse(record=record.to_pb())
        async for chunk in chunks:
            yield pb.FetchResponse(chunk=chunk)

    async def FetchStaged(self, request: pb.FetchStagedRequest, context) -> AsyncIterator[pb.FetchResponse]:
        record, parts = self.registry.fetch_staged(request.sha256)
        yield pb.FetchResponse(record=record.to_pb())
        async for part in parts:
            if isinstance(part, bytes):
                yield pb.FetchResponse(chunk=part)
            else:  # the committed record, last
                yield pb.FetchResponse(record=part.to_pb())

    async def _pin(self, request: pb.PinRequest, pinned: bool) -> pb.PinResponse:
        record = await self.registry.set_pinned(request.ref.name, request.ref.version, pinned)
        if record is None:
            return pb.PinResponse(record=pb.AdapterRecord(name=request.ref.name, version=request.ref.version))
        return pb.PinResponse(record=record.to_pb())

    async def Pin(self, request: pb.PinRequest, context) -> pb.PinResponse:
        return await self._pin(request, True)

    async def Unpin(self, request: pb.PinRequest, context) -> pb.PinResponse:
        return await self._pin(request, False)

    async def Watch(self, request: pb.WatchRequest, context) -> AsyncIterator[pb.AdapterEvent]:
        if not request.adapters:
            raise InvalidArgument("watch at least one adapter name")
        after = {w.name: w.after_version for w in request.adapters}
        if len(after) != len(request.adapters):
            twice = sorted(n for n, k in Counter(w.name for w in request.adapters).items() if k > 1)
            raise InvalidArgument(f"adapter named more than once in one watch: {', '.join(map(repr, twice))}")
        async for kind, record, live in self.registry.watch(after, include_staged=request.include_staged):
            yield pb.AdapterEvent(kind=pb.AdapterEvent.STAGED if kind == "staged" else pb.AdapterEvent.PUBLISHED,
                                  record=record.to_pb(), live=live)
