"""OpenAI-compatible request and response bodies (pydantic only).

Owns the wire format of ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and errors:
field names and order follow OpenAI's API reference; fields beyond it (``top_k``,
``stop_token_ids``, ``ignore_eos``) are documented extras; unknown fields are accepted and logged
(clients send many harmless ones). Requests turn themselves into engine
:class:`~serve.request.SamplingParams` via ``to_sampling_params``.

Knows nothing about the engine, tokenizers or HTTP routing.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .request import SamplingParams

log = logging.getLogger(__name__)

MAX_N = 16
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra(self):
        if self.model_extra:
            log.info("%s: ignoring fields %s", type(self).__name__, sorted(self.model_extra))
        return self


# ---- errors and models ----

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxwint2"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- shared request parts ----

class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Sampling fields common to chat and completions (OpenAI order, then extras)."""

    n: int = Field(1, ge=1, le=MAX_N)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1: off.")
    stop_token_ids: list[TokenId] | None = Field(
        None, description="Token ids that end generation, besides end-of-sequence.")
    ignore_eos: bool = Field(False, description="Do not stop at end-of-sequence tokens.")

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.stop, list) and any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.stop == "":
            raise ValueError("stop strings must be non-empty")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=max(self.top_k, 0), seed=self.seed,
                              stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                              ignore_eos=self.ignore_eos)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---- chat ----

class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool | None = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._sampling_params(max_tokens)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


# ---- completions ----

class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool | None = False
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of text or token-id prompts (OpenAI allows a batch)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return self._sampling_params(self.max_tokens or default_max_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


def unsupported(req: Any) -> str | None:
    """The first requested feature this server does not implement (answered with a 400)."""
    if getattr(req, "logprobs", None):
        return "logprobs"
    if getattr(req, "echo", None):
        return "echo"
    if getattr(req, "suffix", None):
        return "suffix"
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name, None):
            return name
    return None
