"""Every size a client controls is bounded, and inputs that used to pass validation and then crash are refused."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import deploy.ingress as ingress
from actors.sampling import SamplingParams
from deploy.convert import request_from_proto
from deploy.request import GenerationRequest, RequestError, RequestLimits, check_limits, validated
from specd_api.v1 import specd_pb2 as pb

LIMITS = RequestLimits(max_request_id_chars=8, max_stop_strings=2, max_stop_chars=4, max_prompt_chars=50,
                       max_messages=2)


def _req(prompt="hi", request_id="r1", **params) -> GenerationRequest:
    return validated(GenerationRequest, request_id=request_id, prompt=prompt, params=SamplingParams(**params))


@pytest.mark.parametrize("seed", [-1, 1 << 63, 1 << 70])
def test_seeds_numpy_or_torch_cannot_take_are_refused(seed):
    with pytest.raises(RequestError, match=r"seed must be in \[0, 2\^63\)"):
        _req(seed=seed)
    _req(seed=(1 << 63) - 1)


def test_unknown_chat_role_is_refused_over_grpc_as_a_request_error():
    msg = pb.GenerateRequest(max_tokens=4)
    msg.chat.messages.add(role="wizard", content="hello")
    with pytest.raises(RequestError, match="role"):
        request_from_proto(msg)
    msg.chat.messages[0].role = "user"
    assert request_from_proto(msg).messages[0].role == "user"


@pytest.mark.parametrize("kwargs, message", [
    ({"request_id": "x" * 9}, "request_id has 9 characters"),
    ({"stop": ("a", "b", "c")}, "3 stop strings"),
    ({"stop": ("abcde",)}, "longer than 4"),
    ({"prompt": "y" * 51}, "prompt has 51 characters"),
    ({"max_new_tokens": 300}, "max_tokens 300 is over this server's limit of 256"),
])
def test_over_a_limit_is_a_request_error(kwargs, message):
    params = {k: v for k, v in kwargs.items() if k in ("stop", "max_new_tokens")}
    req = _req(**{k: v for k, v in kwargs.items() if k in ("request_id", "prompt")}, **params)
    with pytest.raises(RequestError, match=message):
        check_limits(req, LIMITS, max_tokens_limit=256)


def test_within_the_limits_passes():
    check_limits(_req(stop=("ab", "cd"), max_new_tokens=256), LIMITS, max_tokens_limit=256)
    msgs = validated(GenerationRequest, request_id="r", messages=({"role": "user", "content": "a"},) * 3,
                     params=SamplingParams())
    with pytest.raises(RequestError, match="3 chat messages"):
        check_limits(msgs, LIMITS, 256)


def test_http_bodies_over_the_limit_get_400(monkeypatch):
    app = FastAPI()
    app.add_middleware(ingress._BoundedBody)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    monkeypatch.setattr(ingress, "BODY_LIMIT", [1000])
    client = TestClient(app)
    assert client.post("/echo", content=b"x" * 1000).json() == {"n": 1000}
    big = client.post("/echo", content=b"x" * 1001)
    assert big.status_code == 400 and "over 1000 bytes" in big.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"x" * 400

    assert client.post("/echo", content=chunks()).status_code == 400


@pytest.fixture(scope="module")
def small_app(serve_node):
    """The smallest real app (ingress + a tiny-llama verifier, no drafters) on the session's Serve node."""
    from ray import serve

    from deploy import local
    from deploy.config import DeploymentOptions, ServeConfig

    cfg = ServeConfig(name="limits", route_prefix="/limits", model="tiny-llama", default_method="ar",
                      trigram_methods=(), aux_methods=(), trigram_placement="colocated", torch_threads=1,
                      http_port=serve_node.http_port, grpc_port=serve_node.grpc_port,
                      verifier=DeploymentOptions(num_cpus=0.1, resources={}))
    local.deploy(cfg)
    try:
        yield cfg
    finally:
        serve.delete(cfg.name)


def _request_of_size(size: int) -> pb.GenerateRequest:
    """A GenerateRequest whose serialized size is exactly ``size`` bytes (the prompt fills it)."""
    msg = pb.GenerateRequest(max_tokens=4)
    n = size
    for _ in range(4):  # the prompt's length prefix is a varint: settle it in a few steps
        msg.prompt = "x" * n
        n += size - msg.ByteSize()
    assert msg.ByteSize() == size
    return msg


def test_grpc_messages_over_the_proxy_limit_are_refused_and_the_server_stays_up(small_app):
    """What the gRPC proxy actually applies is ``limits.max_message_bytes`` (Ray's default is 2 GiB): a message
    one byte over it is RESOURCE_EXHAUSTED at the proxy, one at the limit reaches the app (which refuses its
    prompt as INVALID_ARGUMENT), and the server answers normally after."""
    import os

    import grpc

    from specd.client import SpecdClient

    limit = small_app.limits.max_message_bytes
    assert os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(limit)  # what the proxy read at its start
    with SpecdClient(f"127.0.0.1:{small_app.grpc_port}", application=small_app.name, timeout=120) as client:
        assert len(client.generate("warm up", max_tokens=2).token_ids) == 2
        calls = {"unary": lambda m: client.stub.Generate(m, metadata=client.metadata, timeout=120),
                 "stream": lambda m: list(client.stub.GenerateStream(m, metadata=client.metadata, timeout=120))}
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as over:
                call(_request_of_size(limit + 1))
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, over.value.details())
            with pytest.raises(grpc.RpcError) as at:
                call(_request_of_size(limit))
            assert at.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, at.value.details())
            assert "prompt has" in at.value.details()
        assert len(client.generate("still up", max_tokens=4).token_ids) == 4
        assert client.health() == "SERVING"
