"""The served app on a real local Ray Serve (one cluster per session, tiny models; one SmolLM2 test).

Config under test: tiny-llama target, tiny-llama:1 as the auxiliary draft model (sd) on 2 drafter
replicas, the tri-gram pool remote, the verifier autoscaled within [1, 1]; the session's node
(conftest.serve_node) offers exactly the pools this needs (draft_pool 3, verify_pool 1) plus one
verify_pool slot for the SmolLM2 app.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import requests

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from actors.drafter import NoDrafter, with_options  # noqa: E402
from actors.engine import Engine  # noqa: E402
from actors.methods import make_drafter  # noqa: E402
from actors.models import load_model  # noqa: E402
from actors.sampling import SamplingParams  # noqa: E402
from deploy import local  # noqa: E402
from deploy.config import DeploymentOptions, ServeConfig, render_serve_config  # noqa: E402
from specd.client import SpecdClient  # noqa: E402
from specd_api.v1 import specd_pb2 as pb  # noqa: E402

PROMPTS = ["hello world", "the quick brown fox", "0123456789", "speculative decoding is"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def served(serve_node):
    cfg = ServeConfig(
        model="tiny-llama", draft_model="tiny-llama:1", default_method="sd", http_port=serve_node.http_port,
        grpc_port=serve_node.grpc_port, torch_threads=1, max_tokens_limit=256,
        verifier=DeploymentOptions(num_cpus=0.2, resources={"verify_pool": 1}, max_ongoing_requests=16,
                                   autoscaling_config={"min_replicas": 1, "max_replicas": 1,
                                                       "target_ongoing_requests": 8}),
        aux_drafter=DeploymentOptions(num_replicas=2, num_cpus=0.1, resources={"draft_pool": 1}),
    )
    local.deploy(cfg)
    try:
        yield cfg
    finally:
        serve.delete(cfg.name)


@pytest.fixture(scope="module")
def client(served):
    with SpecdClient(f"127.0.0.1:{served.grpc_port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def reference():
    """Greedy tokens of the embedded engine, per prompt text (what every lossless method must return)."""
    target = load_model("tiny-llama")
    engine = Engine(target)
    params = SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True)
    return {p: engine.run(target.tokenizer(p)["input_ids"], params, NoDrafter()).token_ids for p in PROMPTS}


@pytest.mark.parametrize("method", ["ar", "sd"])
def test_unary_and_stream_match_embedded_engine(client, reference, method):
    for prompt in PROMPTS:
        r = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, method=method)
        chunks = list(client.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, method=method))
        assert list(r.token_ids) == reference[prompt]
        assert [t for c in chunks for t in c.token_ids] == reference[prompt]
        assert r.finish_reason == chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert r.stats.method == method and r.stats.lossless and r.stats.new_tokens == MAX_TOKENS
        assert all(not c.HasField("stats") for c in chunks[:-1]) and chunks[-1].stats.new_tokens == MAX_TOKENS
    if method == "sd":
        assert r.stats.drafted_tokens > 0  # the remote drafter really drafted


def test_a_unary_call_crosses_from_the_verifier_as_one_chunk(served, reference):
    """Unary calls ask the verifier for the whole output: one object to the ingress, not one per step."""
    from deploy.request import GenerationRequest

    verifier = serve.get_deployment_handle("Verifier", served.name).options(stream=True)
    params = SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True)
    prompt = PROMPTS[0]
    chunks = {whole: list(verifier.generate.remote(
        GenerationRequest(request_id=f"whole-{whole}", prompt=prompt, method="ar", params=params), whole))
        for whole in (False, True)}
    assert len(chunks[False]) == MAX_TOKENS  # ar: a step per token
    assert len(chunks[True]) == 1
    joined = chunks[True][0].output
    assert joined.token_ids == [t for c in chunks[False] for t in c.output.token_ids] == reference[prompt]
    assert joined.text == "".join(c.output.text for c in chunks[False])
    assert joined.finish_reason == "length" and joined.stats.new_tokens == MAX_TOKENS


def test_pools_hold_replicas_and_overflow_stays_pending(served):
    deployments = serve.status().applications[served.name].deployments
    assert deployments["AuxDrafter"].replica_states == {"RUNNING": 2}
    assert deployments["Verifier"].replica_states == {"RUNNING": 1}
    assert ray.available_resources().get("draft_pool", 0) == 0  # 2 aux + 1 tri-gram replica fill the pool

    @serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"draft_pool": 1}})
    class Overflow:
        def __call__(self) -> str:
            return "never"

    serve._run(Overflow.bind(), name="overflow", route_prefix=None, _blocking=False)
    try:
        time.sleep(5)
        status = serve.status().applications["overflow"]
        assert status.status == "DEPLOYING"
        assert status.deployments["Overflow"].replica_states.get("RUNNING", 0) == 0
    finally:
        serve.delete("overflow")


def test_a_failing_deploy_is_reported_at_once_not_waited_out(served):
    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("no model here")

    serve._run(Broken.bind(), name="broken", route_prefix=None, _blocking=False)
    try:
        with pytest.raises(local.DeployError, match="no model here"):
            local.wait_running(["broken"], timeout_s=3600)  # DEPLOY_FAILED ends the wait, not the bound
    finally:
        serve.delete("broken")


def test_eight_concurrent_streams(served, client, reference):
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        chunks = list(client.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, method="sd"))
        results[i] = ([t for c in chunks for t in c.token_ids], chunks[-1].finish_reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8
    for i, (tokens, reason) in results.items():
        assert tokens == reference[PROMPTS[i % len(PROMPTS)]] and reason == pb.FINISH_REASON_LENGTH
    # Affinity: every step of a request met its state on the replica that started it (no rebuilds);
    # unkeyed calls land on random replicas, so 20 of them see both.
    pool = serve.get_deployment_handle("AuxDrafter", served.name)
    assert {pool.stats.remote().result()["rebuilds"] for _ in range(20)} == {0}


BAD = {
    "empty prompt": dict(prompt=""),
    "prompt over the context": dict(prompt=[65] * 4096),
    "max_tokens 0": dict(max_tokens=0),
    "max_tokens over the limit": dict(max_tokens=100_000),
    "negative temperature": dict(temperature=-0.5),
    "top_p 0": dict(top_p=0.0),
    "top_p over 1": dict(top_p=1.5),
    "unknown method": dict(method="nope"),
    "unknown model": dict(model="gpt-5"),
    "tau for a lossless method": dict(method="ar", tau=2.0),
    "beam_width for sd": dict(method="sd", beam_width=2),
    "gamma 0": dict(method="mtad", gamma=0),
    "tau 0": dict(method="mtad", tau=0.0),
    "max_tokens over SamplingParams' own bound": dict(max_tokens=1 << 21),
    "negative seed": dict(temperature=1.0, seed=-1),
    "request_id over the limit": dict(request_id="x" * 129),
    "too many stop strings": dict(stop=["a"] * 17),
    "unknown chat role": dict(prompt=None, messages=[{"role": "wizard", "content": "hi"}]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_are_invalid_argument(client, case):
    kwargs = dict(prompt="hello", max_tokens=8) | BAD[case]
    for call in (client.generate, lambda **k: list(client.stream(**k))):
        with pytest.raises(grpc.RpcError) as err:
            call(**kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert err.value.details() and "Traceback" not in err.value.details()
        if case.startswith("max_tokens over"):  # one limit, one message (what ListModels reports)
            assert "over this server's limit of 256" in err.value.details()
    assert len(client.generate("still up", max_tokens=4).token_ids) > 0


@pytest.mark.parametrize("capped", [False, True])
def test_mtad_served_with_request_options_matches_embedded(client, capped):
    """The remote drafter's approximate rule and the request's gamma / beam_width / tau reach the engine."""
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    opts = dict(gamma=3, beam_width=2, tau=0.3)
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=7, ignore_eos=True)
    drafter = with_options(make_drafter("mtad", target, draft), **opts)
    expected = Engine(target).run(target.tokenizer(PROMPTS[3])["input_ids"], params, drafter)
    r = client.generate(PROMPTS[3], max_tokens=MAX_TOKENS, method="mtad", temperature=1.0, seed=7, ignore_eos=True,
                        max_draft_tokens=8 if capped else None, **opts)
    assert list(r.token_ids) == expected.token_ids
    assert not r.stats.lossless and r.stats.method == "mtad"
    assert r.stats.drafted_tokens == expected.stats.drafted_tokens > 0
    assert r.stats.accepted_tokens == expected.stats.accepted_tokens


def test_cancelled_stream_frees_the_sequence(served, client):
    stream = client.stream("cancel me", max_tokens=256, ignore_eos=True, method="sd", request_id="cancel-1")
    next(stream)
    next(stream)
    stream.close()  # cancels the RPC
    verifier = serve.get_deployment_handle("Verifier", served.name)
    deadline = time.time() + 20
    while verifier.live_requests.remote().result() and time.time() < deadline:
        time.sleep(0.2)
    assert verifier.live_requests.remote().result() == 0
    # The drafter replica that held the request (reached through the same affinity id) dropped its state.
    pool = serve.get_deployment_handle("AuxDrafter", served.name).options(multiplexed_model_id="cancel-1")
    while pool.stats.remote().result()["sessions"] and time.time() < deadline:
        time.sleep(0.2)
    assert pool.stats.remote().result()["sessions"] == 0


def test_health_serving(served):
    # A Kubernetes gRPC probe sends no `application` metadata: with one app the proxy routes it anyway.
    with SpecdClient(f"127.0.0.1:{served.grpc_port}", application=None, timeout=30) as bare:
        assert bare.health() == "SERVING"
        assert bare.health("specd.v1.Specd") == "SERVING"
        with pytest.raises(grpc.RpcError) as err:
            bare.health("no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    r = requests.get(f"http://127.0.0.1:{served.http_port}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "SERVING"


def test_openai_completions_stream(served, reference):
    base = f"http://127.0.0.1:{served.http_port}"
    models = requests.get(f"{base}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "tiny-llama"
    body = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events = _sse(requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=60))
    assert events[-1] == "[DONE]" and len(events) > 2
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS
    full = requests.post(f"{base}/v1/completions", json=body | {"stream": False}, timeout=60).json()
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full["choices"][0]["text"]
    bad = requests.post(f"{base}/v1/completions", json=body | {"top_p": 0}, timeout=30)
    assert bad.status_code == 400 and "top_p" in bad.json()["error"]["message"]


def _sse(response) -> list:
    import json

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_metrics_are_exported(served, client, serve_node):
    client.generate("count me", max_tokens=8, method="sd", ignore_eos=True)
    names = {"ray_specd_generation_tokens_total", "ray_specd_time_to_first_token_seconds_bucket",
             "ray_specd_spec_decode_num_draft_tokens_total", "ray_specd_request_success_total"}
    deadline, found = time.time() + 40, set()
    while time.time() < deadline and not names <= found:  # replicas push every few seconds
        text = requests.get(f"http://127.0.0.1:{serve_node.metrics_port}/metrics", timeout=10).text
        found = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_specd_")}
        time.sleep(2)
    assert names <= found


@pytest.mark.smollm2
def test_smollm2_from_the_rendered_config(served, smollm2):
    """SmolLM2 as a second app, deployed declaratively from render_serve_config (KubeRay's path), tri-gram
    drafter colocated: chat greedy output over gRPC and OpenAI SSE equals the embedded engine."""
    cfg = ServeConfig(name="smol", route_prefix="/smol", model="smollm2-135m", torch_threads=1,
                      trigram_placement="colocated", grpc_port=served.grpc_port, http_port=served.http_port,
                      verifier=DeploymentOptions(num_cpus=0.2, resources={"verify_pool": 1}))
    both = render_serve_config(served)
    both["applications"] += render_serve_config(cfg)["applications"]
    local.deploy_config(both)  # waits on readiness itself: Ray's 60 s bound fails on a busy 2-core machine
    try:
        messages = [{"role": "user", "content": "Name three colors."}]
        ids = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
        want = Engine(smollm2).run(ids, SamplingParams(max_new_tokens=16), NoDrafter())
        with SpecdClient(f"127.0.0.1:{served.grpc_port}", application="smol", timeout=120) as c:
            assert c.models().chat
            chunks = list(c.stream(messages=messages, max_tokens=16))
        assert [t for ch in chunks for t in ch.token_ids] == want.token_ids
        body = {"messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
        events = _sse(requests.post(f"http://127.0.0.1:{served.http_port}/smol/v1/chat/completions", json=body,
                                    stream=True, timeout=120))
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
        assert text == want.text and events[-1] == "[DONE]"
    finally:
        serve.delete("smol")
