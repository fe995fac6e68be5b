"""The ingress deployment: the specd.v1 gRPC servicer, grpc.health.v1, and the OpenAI-compatible HTTP API.

Both protocols convert into a GenerationRequest, stream ServedChunks from one Verifier call (which pins
the request to one verifier replica), and convert back. Bad requests: INVALID_ARGUMENT / HTTP 400.
"""

import asyncio
import time
from typing import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve

from actors.methods import METHODS, describe
from deploy.config import ServeConfig
from deploy.convert import chunk_to_proto, request_from_proto, response_to_proto
from deploy.grpc_service import Undecodable
from deploy.metrics import ingress_metrics
from deploy.openai import DONE, ChatRequest, CompletionRequest, Renderer, error_body
from deploy.request import GenerationRequest, RequestError, check_limits, check_max_tokens, error_message
from deploy.verifier import ServedChunk
from specd_api.v1 import specd_pb2 as pb

SERVICES = ("", "specd.v1.Specd")  # what grpc.health.v1 reports on ("" = the server as a whole)
HEALTH_TTL_S = 1.0  # probes from many load balancers share one verifier round trip

app = FastAPI(title="specd", description="Speculative-decoding server (OpenAI-compatible subset)")


@app.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    msgs = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
    return JSONResponse(error_body(msgs), status_code=400)


BODY_LIMIT = [4 << 20]  # bytes; set from ServeConfig.limits by the Ingress (the app below is built at import)


class _BoundedBody:
    """ASGI middleware: an HTTP body over BODY_LIMIT gets a 400 before any of it is parsed or buffered whole."""

    def __init__(self, asgi) -> None:
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        limit = BODY_LIMIT[0]
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _too_large(send, limit)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # a chunked body without a length
                raise _BodyTooLarge
            return message

        try:
            await self.asgi(scope, bounded, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = JSONResponse(error_body(f"request body over {limit} bytes"), status_code=400)
    await body({"type": "http"}, None, send)


app.add_middleware(_BoundedBody)


async def _prepend(first: ServedChunk, rest: AsyncIterator[ServedChunk]) -> AsyncIterator[ServedChunk]:
    yield first
    async for chunk in rest:
        yield chunk


# Serve ships the decorated class by value: module globals defined below it are not captured.
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, verifier) -> None:
        self.cfg = ServeConfig.model_validate(config)
        BODY_LIMIT[0] = self.cfg.limits.max_message_bytes
        self.verifier = verifier
        self.metrics = ingress_metrics()
        self._healthy_at = 0.0

    async def _stream(self, req: GenerationRequest, whole: bool = False) -> AsyncIterator[ServedChunk]:
        async for chunk in self.verifier.generate.options(stream=True).remote(req, whole):
            yield chunk

    # ---- gRPC: specd.v1.Specd ----

    def _request(self, request: pb.GenerateRequest | Undecodable) -> GenerationRequest:
        if isinstance(request, Undecodable):
            raise RequestError(request.error)
        check_max_tokens(request.max_tokens, self.cfg.max_tokens_limit)  # before SamplingParams' own wider bound
        req = request_from_proto(request)
        check_limits(req, self.cfg.limits, self.cfg.max_tokens_limit)
        return req

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            req = self._request(request)
            chunks = [chunk_to_proto(c.output, c.method) async for c in self._stream(req, whole=True)]
        except RequestError as e:
            return self._invalid_grpc(grpc_context, e, pb.GenerateResponse())
        return response_to_proto(chunks, req.request_id)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateChunk]:
        try:
            req = self._request(request)
            async for c in self._stream(req):
                yield chunk_to_proto(c.output, c.method)
        except RequestError as e:
            self._invalid_grpc(grpc_context, e, None)
            raise  # a stream only ends with the status set on the context when it raises

    async def ListModels(self, request: pb.ListModelsRequest | Undecodable, grpc_context) -> pb.ListModelsResponse:
        if isinstance(request, Undecodable):
            return self._invalid_grpc(grpc_context, RequestError(request.error), pb.ListModelsResponse())
        d = await self.verifier.describe.remote()
        options = self.cfg.drafter_options
        methods = [pb.MethodInfo(name=m, lossless=METHODS[m].lossless, description=describe(m, options.get(m)))
                   for m in d["methods"]]
        return pb.ListModelsResponse(model=d["model"], methods=methods, default_method=d["default_method"],
                                     max_context=d["max_context"], max_tokens_limit=d["max_tokens_limit"],
                                     chat=d["chat"])

    def _invalid_grpc(self, grpc_context, error: RequestError, empty):
        self.metrics.invalid.inc(1, {"protocol": "grpc"})
        grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        grpc_context.set_details(error_message(error))
        return empty

    # ---- gRPC: grpc.health.v1.Health ----

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        if request.service not in SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._status())

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        yield await self.Check(request, grpc_context)

    async def List(self, request: health_pb2.HealthListRequest) -> health_pb2.HealthListResponse:
        status = health_pb2.HealthCheckResponse(status=await self._status())
        return health_pb2.HealthListResponse(statuses={s: status for s in SERVICES})

    async def _status(self) -> int:
        """SERVING while a verifier replica answers (checked at most once per HEALTH_TTL_S)."""
        if time.monotonic() - self._healthy_at > HEALTH_TTL_S:
            try:
                await asyncio.wait_for(self._ping(), timeout=2.0)
                self._healthy_at = time.monotonic()
            except Exception:  # noqa: BLE001 - any failure to reach a verifier means not serving
                return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def _ping(self) -> bool:
        return await self.verifier.ping.remote()

    # ---- HTTP ----

    @app.get("/health")
    async def health(self) -> JSONResponse:
        serving = await self._status() == health_pb2.HealthCheckResponse.SERVING
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    @app.get("/v1/models")
    async def models(self) -> dict:
        d = await self.verifier.describe.remote()
        card = {"id": d["model"], "object": "model", "owned_by": "specd", "max_model_len": d["max_context"],
                "specd": {"methods": d["methods"], "default_method": d["default_method"]}}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._openai(body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest):
        return await self._openai(body, chat=True)

    async def _openai(self, body: CompletionRequest | ChatRequest, chat: bool):
        try:
            check_max_tokens(body.max_completion_tokens or body.max_tokens, self.cfg.max_tokens_limit)
            req = body.to_generation()
            check_limits(req, self.cfg.limits, self.cfg.max_tokens_limit)
            stream = self._stream(req, whole=not body.stream)
            first = await anext(stream)  # bad requests fail here, before any byte is sent
        except RequestError as e:
            self.metrics.invalid.inc(1, {"protocol": "http"})
            return JSONResponse(error_body(error_message(e)), status_code=400)
        render = Renderer(req, self.cfg.model, chat)
        if not body.stream:
            return render.full([first] + [c async for c in stream])
        return StreamingResponse(self._sse(render, first, stream, chat), media_type="text/event-stream")

    @staticmethod
    async def _sse(render: Renderer, first: ServedChunk, rest: AsyncIterator[ServedChunk], chat: bool):
        if chat:
            yield render.event(None)
        async for chunk in _prepend(first, rest):
            if chunk.output.text or chunk.output.finish_reason:  # steps whose text is held back send nothing
                yield render.event(chunk)
        yield DONE

