"""OpenAI-compatible HTTP: request bodies -> GenerationRequest, served chunks -> response JSON / SSE events.

Compatible with what vLLM and Ray Serve LLM clients send for /v1/completions and /v1/chat/completions
(one choice, text only); specd's own knobs ride along as extra fields (method, max_draft_tokens,
disable_speculation), and the final response or event carries specd's stats under "specd".
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from actors.drafter import DraftOptions
from actors.sampling import SamplingParams
from deploy.request import ChatMessage, GenerationRequest, RequestError, validated
from deploy.verifier import ServedChunk


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name.")
    max_tokens: int = Field(16, description="New tokens at most (OpenAI's default 16).")
    max_completion_tokens: int | None = Field(None, description="Chat's newer name for max_tokens.")
    temperature: float = Field(1.0, description="OpenAI's default is 1.0 (sampling); 0 = greedy.")
    top_p: float = Field(1.0, description="Nucleus mass in (0, 1].")
    top_k: int = Field(0, description="vLLM extension; 0 = off.")
    n: int = Field(1, description="Only 1 is supported.")
    stream: bool = Field(False, description="Server-sent events.")
    stop: str | list[str] | None = Field(None, description="Stop strings.")
    seed: int | None = Field(None, description="Sampling seed.")
    ignore_eos: bool = Field(False, description="vLLM extension.")
    user: str | None = Field(None, description="Accepted and ignored.")
    method: str | None = Field(None, description="specd: decoding method.")
    max_draft_tokens: int | None = Field(None, description="specd: per-step draft budget.")
    disable_speculation: bool = Field(False, description="specd: decode autoregressively.")
    gamma: int | None = Field(None, description="specd: sd / mtad / mmtad draft depth.")
    beam_width: int | None = Field(None, description="specd: mtad / mmtad beams per depth.")
    tau: float | None = Field(None, description="specd: mtad / mmtad joint likelihood-ratio threshold.")

    def to_request(self, **inputs: Any) -> GenerationRequest:
        if self.n != 1:
            raise RequestError("n must be 1")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        params = validated(SamplingParams, max_new_tokens=self.max_completion_tokens or self.max_tokens,
                           temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                           stop=stop, ignore_eos=self.ignore_eos)
        return validated(GenerationRequest, request_id=uuid.uuid4().hex, model=self.model, method=self.method,
                         params=params, max_draft_tokens=self.max_draft_tokens,
                         speculate=not self.disable_speculation,
                         **{name: getattr(self, name) for name in DraftOptions.model_fields}, **inputs)


class CompletionRequest(_Common):
    prompt: str | list[int] = Field(..., description="Text, or token ids.")

    def to_generation(self) -> GenerationRequest:
        if isinstance(self.prompt, list):
            return self.to_request(prompt_ids=tuple(self.prompt))
        return self.to_request(prompt=self.prompt)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., description="Chat turns.")

    def to_generation(self) -> GenerationRequest:
        return self.to_request(messages=tuple(self.messages))


def error_body(message: str, status: int = 400) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": status}}


class Renderer:
    """Shapes one request's chunks as OpenAI objects (``chat`` picks the chat.completion flavour)."""

    def __init__(self, req: GenerationRequest, model: str, chat: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        self.model, self.chat, self.created = model, chat, int(time.time())

    def _base(self, suffix: str = "") -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        body = {"content": text} if text is not None else {}
        return {"index": 0, key: ({"role": "assistant"} | body) if not delta or text is None else body,
                "logprobs": None, "finish_reason": finish}

    def _usage(self, last: ServedChunk) -> dict:
        s = last.output.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                "total_tokens": s.prompt_tokens + s.new_tokens}

    def full(self, chunks: list[ServedChunk]) -> dict:
        text = "".join(c.output.text for c in chunks)
        last = chunks[-1]
        return self._base() | {"choices": [self._choice(text, last.output.finish_reason, delta=False)],
                               "usage": self._usage(last), "specd": specd_stats(last)}

    def event(self, chunk: ServedChunk | None) -> str:
        """One SSE event: ``None`` is the chat stream's opening role delta."""
        if chunk is None:
            body = self._base(".chunk") | {"choices": [self._choice(None, None, delta=True)]}
        else:
            o = chunk.output
            body = self._base(".chunk" if self.chat else "") | {
                "choices": [self._choice(o.text, o.finish_reason, delta=True)]}
            if o.finish_reason:
                body |= {"usage": self._usage(chunk), "specd": specd_stats(chunk)}
        return f"data: {json.dumps(body)}\n\n"


def specd_stats(chunk: ServedChunk) -> dict:
    return chunk.output.stats.as_dict() | {"method": chunk.method}


DONE = "data: [DONE]\n\n"
