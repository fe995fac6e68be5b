"""A small client for the specd gRPC API.

    with SpecdClient("localhost:9000") as c:
        print(c.generate("Hello", max_tokens=32).text)
        for chunk in c.stream("Hello", max_tokens=32):
            print(chunk.text, end="")
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specd_api.v1 import specd_pb2 as pb
from specd_api.v1 import specd_pb2_grpc


def build_request(prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
                  max_tokens: int = 128, method: str = "", model: str = "", temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), ignore_eos: bool = False, max_draft_tokens: int | None = None,
                  disable_speculation: bool = False, request_id: str = "", gamma: int | None = None,
                  beam_width: int | None = None, tau: float | None = None) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments (unset sampling fields take the server's defaults)."""
    sampling = pb.SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop),
                                  ignore_eos=ignore_eos)
    drafting = pb.DraftingOptions(max_draft_tokens=max_draft_tokens, disable_speculation=disable_speculation,
                                  gamma=gamma, beam_width=beam_width, tau=tau)
    req = pb.GenerateRequest(model=model, method=method, max_tokens=max_tokens, sampling=sampling,
                             drafting=drafting, request_id=request_id)
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.prompt_ids.ids.extend(int(t) for t in prompt)
    return req


class SpecdClient:
    def __init__(self, target: str, *, application: str | None = "specd", timeout: float | None = None) -> None:
        """``target`` is HOST:PORT of the gRPC proxy; ``application`` names the Serve app (metadata)."""
        self.channel = grpc.insecure_channel(target)
        self.stub = specd_pb2_grpc.SpecdStub(self.channel)
        self.metadata = (("application", application),) if application else ()
        self.timeout = timeout

    def generate(self, prompt=None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout)

    def stream(self, prompt=None, **kwargs) -> Iterator[pb.GenerateChunk]:
        """Chunks as they come; breaking out of the loop cancels the request on the server."""
        call = self.stub.GenerateStream(build_request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """'SERVING' / 'NOT_SERVING' from the standard grpc.health.v1 service."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata, timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SpecdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
