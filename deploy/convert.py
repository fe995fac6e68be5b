"""Conversions between specd.v1 proto messages (specd_api.v1 stubs) and the project's own objects (nothing more)."""

from __future__ import annotations

import uuid

import numpy as np
import torch

from actors.draft import Draft
from actors.drafter import DraftOptions, Feedback
from actors.stats import GenerationStats, StepOutput
from actors.sampling import SamplingParams
from deploy.request import GenerationRequest, validated
from specd_api.v1 import specd_pb2 as pb

FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
FINISH_NAME = {v: k for k, v in FINISH.items()}


def sampling_fields(s: pb.SamplingOptions) -> dict:
    """The SamplingParams fields a SamplingOptions sets (unset optionals keep the defaults)."""
    out = {name: getattr(s, name) for name in ("temperature", "top_p", "top_k", "seed") if s.HasField(name)}
    return out | {"stop": tuple(s.stop), "ignore_eos": s.ignore_eos}


def request_from_proto(msg: pb.GenerateRequest) -> GenerationRequest:
    params = validated(SamplingParams, max_new_tokens=msg.max_tokens, **sampling_fields(msg.sampling))
    kind = msg.WhichOneof("input")
    inputs = {
        "prompt": {"prompt": msg.prompt},
        "chat": {"messages": tuple({"role": m.role, "content": m.content} for m in msg.chat.messages)},  # validated below
        "prompt_ids": {"prompt_ids": tuple(msg.prompt_ids.ids)},
        None: {"prompt": ""},
    }[kind]
    drafting = msg.drafting
    return validated(
        GenerationRequest, request_id=msg.request_id or uuid.uuid4().hex, model=msg.model or None,
        method=msg.method or None, params=params, speculate=not drafting.disable_speculation,
        max_draft_tokens=drafting.max_draft_tokens if drafting.HasField("max_draft_tokens") else None,
        **{k: getattr(drafting, k) for k in DraftOptions.model_fields if drafting.HasField(k)}, **inputs,
    )


def stats_to_proto(s: GenerationStats, method: str) -> pb.GenerationStats:
    return pb.GenerationStats(
        prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens, target_forwards=s.target_forwards,
        drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens,
        accepted_per_position=s.accepted_per_position, tokens_per_forward=s.tokens_per_forward, seconds=s.seconds,
        prefill_seconds=s.prefill_seconds, draft_seconds=s.draft_seconds, lossless=s.lossless, method=method,
    )


def chunk_to_proto(out: StepOutput, method: str) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(text=out.text, token_ids=out.token_ids, finish_reason=FINISH[out.finish_reason])
    if out.finish_reason:
        chunk.stats.CopyFrom(stats_to_proto(out.stats, method))
    return chunk


def response_to_proto(chunks: list[pb.GenerateChunk], request_id: str) -> pb.GenerateResponse:
    """Join a stream's chunks into the unary response."""
    resp = pb.GenerateResponse(text="".join(c.text for c in chunks), request_id=request_id)
    for c in chunks:
        resp.token_ids.extend(c.token_ids)
    resp.finish_reason = chunks[-1].finish_reason
    resp.stats.CopyFrom(chunks[-1].stats)
    return resp


# ---- draft steps between the verifier and a drafter-pool replica ----

def draft_to_proto(d: Draft) -> pb.DraftTree:
    msg = pb.DraftTree(tokens=d.tokens.tolist(), parents=d.parents.tolist())
    if d.q is not None:
        msg.q_vocab = d.q.shape[1]
        msg.q = d.q.float().contiguous().numpy().astype("<f4").tobytes()
    msg.logq.extend(d.logq.tolist())  # [n] or empty, like the field
    if d.p_accept is not None:
        msg.p_accept.extend(d.p_accept.tolist())
    return msg


def draft_from_proto(msg: pb.DraftTree) -> Draft:
    q = None
    if msg.q_vocab:
        q = torch.from_numpy(np.frombuffer(msg.q, "<f4").reshape(len(msg.tokens), msg.q_vocab).copy())
    p_accept = np.asarray(msg.p_accept, np.float64) if len(msg.p_accept) else None
    return Draft(np.asarray(msg.tokens, np.int64), np.asarray(msg.parents, np.int64), q, p_accept=p_accept,
                 logq=np.asarray(msg.logq, np.float64))


def feedback_to_proto(f: Feedback) -> pb.DraftFeedback:
    # q stays behind: the drafter only matches the tree against the draft it produced.
    msg = pb.DraftFeedback(draft=pb.DraftTree(tokens=f.draft.tokens.tolist(), parents=f.draft.parents.tolist()),
                           accepted_nodes=f.accepted_nodes, new_tokens=f.new_tokens)
    if f.target_topk is not None:
        msg.topk = f.target_topk.shape[1]
        msg.target_topk.extend(f.target_topk.reshape(-1).tolist())
    return msg


def feedback_from_proto(msg: pb.DraftFeedback, draft: Draft) -> Feedback:
    """``draft`` is the drafter's own object for this tree; the verifier may have verified only a prefix of it
    (the batch budget), which is what the drafter is told about."""
    topk = torch.tensor(list(msg.target_topk), dtype=torch.long).reshape(-1, msg.topk) if msg.topk else None
    return Feedback(draft.prefix(len(msg.draft.tokens)), list(msg.accepted_nodes), list(msg.new_tokens), topk)


def params_to_sampling(p: SamplingParams) -> pb.SamplingOptions:
    msg = pb.SamplingOptions(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, stop=p.stop,
                             ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def params_from_step(msg: pb.DraftStepRequest) -> SamplingParams:
    return SamplingParams(max_new_tokens=max(1, msg.max_new_tokens), **sampling_fields(msg.sampling))
