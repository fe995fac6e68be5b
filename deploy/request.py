"""The project's own request object: what the gRPC servicer and the OpenAI routes convert into."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.drafter import DraftOptions
from actors.sampling import SamplingParams


class RequestError(ValueError):
    """A bad request: INVALID_ARGUMENT on gRPC, 400 on HTTP. The server stays up."""


SEED_LIMIT = 1 << 63


class RequestLimits(BaseModel):
    """What one request may ask of a replica: every size a client controls is bounded (ServeConfig.limits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_id_chars: int = Field(128, ge=1, description="Longest request_id (it keys logs and drafter state).")
    max_stop_strings: int = Field(16, ge=0, description="Stop strings per request (each is scanned every token).")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop string.")
    max_prompt_chars: int = Field(
        400_000, ge=1, description="Prompt text (all chat messages together) in characters: bounds what the "
        "replica tokenizes before it can check the token count against the model's context.")
    max_messages: int = Field(256, ge=1, description="Chat turns per request.")
    max_message_bytes: int = Field(
        4 << 20, ge=1024, description="Largest gRPC message and HTTP body the proxies accept (bytes).")


def check_max_tokens(max_tokens: int, limit: int) -> None:
    """The one max_tokens bound and its one message (also what ListModels reports as max_tokens_limit)."""
    if max_tokens > limit:
        raise RequestError(f"max_tokens {max_tokens} is over this server's limit of {limit}")


def check_limits(req: GenerationRequest, limits: RequestLimits, max_tokens_limit: int) -> None:
    """RequestError for a request over ``limits``: at the ingress, before a replica spends work on it."""
    check_max_tokens(req.params.max_new_tokens, max_tokens_limit)
    if len(req.request_id) > limits.max_request_id_chars:
        raise RequestError(f"request_id has {len(req.request_id)} characters; the limit is {limits.max_request_id_chars}")
    stop = req.params.stop
    if len(stop) > limits.max_stop_strings:
        raise RequestError(f"{len(stop)} stop strings; the limit is {limits.max_stop_strings}")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise RequestError(f"a stop string is longer than {limits.max_stop_chars} characters")
    if req.messages is not None and len(req.messages) > limits.max_messages:
        raise RequestError(f"{len(req.messages)} chat messages; the limit is {limits.max_messages}")
    chars = len(req.prompt or "") + sum(len(m.content) for m in req.messages or ())
    if chars > limits.max_prompt_chars:
        raise RequestError(f"prompt has {chars} characters; the limit is {limits.max_prompt_chars}")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"] = Field(..., description="Who speaks this turn.")
    content: str = Field(..., description="The message text.")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(..., min_length=1, description="Unique id: keys drafter state and logs.")
    model: str | None = Field(None, description="Must name the served model when set.")
    prompt: str | None = Field(None, description="Raw prompt text (no chat template).")
    messages: tuple[ChatMessage, ...] | None = Field(None, description="Chat turns, rendered with the chat template.")
    prompt_ids: tuple[int, ...] | None = Field(None, description="Pre-tokenized prompt.")
    method: str | None = Field(None, description="Decoding method; None = the server's default.")
    params: SamplingParams = Field(..., description="Sampling, stop strings and max new tokens.")
    max_draft_tokens: int | None = Field(None, ge=0, description="Per-request cap on draft nodes per step.")
    speculate: bool = Field(True, description="False: decode autoregressively whatever the method.")
    gamma: int | None = Field(None, ge=1, le=64, description="sd / mtad / mmtad: draft depth (None = server's).")
    beam_width: int | None = Field(None, ge=1, le=32, description="mtad / mmtad: beams per depth.")
    tau: float | None = Field(None, gt=0, description="mtad / mmtad: joint likelihood-ratio threshold.")

    @model_validator(mode="after")
    def _seed_in_range(self) -> GenerationRequest:
        seed = self.params.seed
        if seed is not None and not 0 <= seed < SEED_LIMIT:  # numpy refuses negatives, torch overflows past 2^63
            raise ValueError(f"seed must be in [0, 2^63), got {seed}")
        return self

    def draft_options(self) -> dict:
        return {name: getattr(self, name) for name in DraftOptions.model_fields}

    @model_validator(mode="after")
    def _one_nonempty_input(self) -> GenerationRequest:
        given = [x for x in (self.prompt, self.messages, self.prompt_ids) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, messages, prompt_ids")
        if not given[0] or (self.prompt is not None and not self.prompt.strip()):
            raise ValueError("empty prompt")
        return self


def error_message(error: RequestError) -> str:
    """The message alone: a RequestError raised in another replica arrives wrapped with its traceback."""
    return str(getattr(error, "cause", None) or error)


def validated(make, *args, **kwargs):
    """Call a pydantic constructor; a validation failure becomes a RequestError with a readable message."""
    try:
        return make(*args, **kwargs)
    except ValidationError as e:
        msgs = [(f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
                for err in e.errors()]
        raise RequestError("; ".join(msgs)) from None
