"""What chat and completions serving share: errors, limits, submission of n choices, merging.

Owns the translation of engine failures into OpenAI error classes (:class:`ServingError` with an
HTTP status), the ``max_model_len`` / ``max_tokens`` checks, the fan-out of one HTTP request into
``len(prompts) * n`` engine requests, and the merge of their streams in arrival order. Leaving a
merged stream early (client gone) cancels every sub-stream, which aborts it in the engine.

Knows nothing about HTTP routing or Prometheus, and nothing about the engine beyond
:class:`~serve.engine.EngineClient`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence

from pydantic import BaseModel

from .engine import EngineClient, EngineError, QueueFullError
from .protocol import ErrorInfo, ErrorResponse, UsageInfo, random_id, unsupported
from .request import FinishReason, RequestOutput, SamplingParams


class ServingError(Exception):
    """An OpenAI-style error with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.status))


def bad_request(message: str, param: str | None = None) -> ServingError:
    return ServingError(400, message, "invalid_request_error", param)


@dataclasses.dataclass(frozen=True)
class SubRequest:
    index: int                       # choice index: prompt_index * n + j
    prompt_len: int
    stream: AsyncIterator[RequestOutput]


def finish_reason(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"   # abort: output ended early


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """Base of the per-endpoint handlers.

    Example:
      >>> serving = OpenAIServingChat(engine, tokenizer, model_name="ernie")
      >>> body_or_stream = await serving.create(request)
    """

    def __init__(self, engine: EngineClient, tokenizer, model_name: str):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name

    # ---- checks ----
    def check_request(self, req) -> None:
        if req.model is not None and req.model != self.model_name:
            raise ServingError(404, f"The model {req.model!r} does not exist; this server "
                               f"serves {self.model_name!r}.", "not_found_error", "model")
        if (feature := unsupported(req)) is not None:
            raise bad_request(f"{feature} is not supported by this server", feature)

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text))
        except (ValueError, TypeError) as e:          # e.g. lone surrogates in the JSON string
            raise bad_request(f"cannot tokenize the prompt: {e}", "prompt") from e

    def sampling_params(self, req, prompt_lens: Sequence[int],
                        default_max_tokens: int | None) -> SamplingParams:
        """Check lengths against ``max_model_len`` and build the engine's params."""
        limit = self.engine.max_model_len
        longest = max(prompt_lens)
        if min(prompt_lens) == 0:
            raise bad_request("the prompt is empty", "prompt")
        if longest >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens; the "
                              f"prompt has {longest} tokens (at least one token must be "
                              "generated).", "messages" if hasattr(req, "messages") else "prompt")
        room = limit - longest
        try:
            params = req.to_sampling_params(default_max_tokens or room)
        except ValueError as e:
            raise bad_request(str(e)) from e
        if params.max_tokens > room:
            raise bad_request(f"This model's maximum context length is {limit} tokens; "
                              f"{longest} prompt tokens + max_tokens={params.max_tokens} "
                              "exceed it.", "max_tokens")
        return params

    # ---- engine ----
    def submit(self, prompts: Sequence[list[int]], params: SamplingParams, n: int,
               request_id: str) -> list[SubRequest]:
        """Submit ``len(prompts) * n`` engine requests (seed ``s + j`` for choice ``j``)."""
        subs: list[SubRequest] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    sub_params = params if params.seed is None or j == 0 else \
                        dataclasses.replace(params, seed=params.seed + j)
                    index = p * n + j
                    stream = self.engine.submit(ids, sub_params, f"{request_id}-{index}")
                    subs.append(SubRequest(index, len(ids), stream))
        except BaseException as e:
            for i in range(len(subs)):
                self.engine.abort(f"{request_id}-{subs[i].index}")
            if isinstance(e, ValueError):
                raise bad_request(str(e), "prompt") from e
            if isinstance(e, QueueFullError):
                raise ServingError(503, f"The server is overloaded: {e}",
                                   "service_unavailable") from e
            if isinstance(e, EngineError):
                raise ServingError(503, str(e), "service_unavailable") from e
            raise
        return subs

    @staticmethod
    async def merge(subs: Sequence[SubRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all sub-requests in arrival order; closing it aborts the unfinished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(sub: SubRequest) -> None:
            try:
                async for out in sub.stream:
                    queue.put_nowait((sub.index, out))
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((sub.index, e))

        tasks = [asyncio.ensure_future(pump(s)) for s in subs]
        try:
            remaining = len(subs)
            while remaining:
                index, out = await queue.get()
                if isinstance(out, Exception):
                    raise ServingError(500, f"generation failed: {out}", "server_error") \
                        from out
                yield index, out
                remaining -= out.finished
        finally:
            for t in tasks:
                t.cancel()

    @classmethod
    async def collect(cls, subs: Sequence[SubRequest]
                      ) -> tuple[list[str], list[str | None], int]:
        """Drain all sub-requests: per-choice text and finish reason, total output tokens."""
        texts = [""] * len(subs)
        reasons: list[str | None] = [None] * len(subs)
        num_output = 0
        async for index, out in cls.merge(subs):
            texts[index] += out.text
            if out.finished:
                reasons[index] = finish_reason(out.finish_reason)
                num_output += out.num_output_tokens
        return texts, reasons, num_output

    @staticmethod
    def usage(prompt_lens: Sequence[int], num_output_tokens: int) -> UsageInfo:
        prompt = sum(prompt_lens)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=num_output_tokens,
                         total_tokens=prompt + num_output_tokens)

    @staticmethod
    def new_id(prefix: str) -> str:
        return random_id(prefix)
