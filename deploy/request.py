"""The project's own request object: what the gRPC servicer and the OpenAI routes convert into."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.drafter import DraftOptions
from actors.sampling import SamplingParams


class RequestError(ValueError):
    """A bad request: INVALID_ARGUMENT on gRPC, 400 on HTTP. The server stays up."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(..., min_length=1, description="system | user | assistant")
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
