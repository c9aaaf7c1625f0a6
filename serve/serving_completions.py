"""``/v1/completions``: OpenAI (legacy) completions <-> engine.

Owns prompt handling (text, token ids, or a batch of either: choice ``i`` of prompt ``p`` has
index ``p * n + i``), the full response and the SSE stream ending in ``data: [DONE]``. Knows
nothing about routing, metrics or how the engine batches.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse
from .serving_base import SSE_DONE, OpenAIServing, ServingError, bad_request, finish_reason, sse


class OpenAIServingCompletion(OpenAIServing):
    """Example:
      >>> serving = OpenAIServingCompletion(engine, tokenizer, model_name="ernie")
      >>> resp = await serving.create(CompletionRequest(prompt="Hello"))
    """

    def prompt_ids(self, req: CompletionRequest) -> list[list[int]]:
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise bad_request(str(e), "prompt") from e
        return [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """A full response, or an SSE stream; raises :class:`ServingError` before any output."""
        self.check_request(req)
        prompts = self.prompt_ids(req)
        lens = [len(p) for p in prompts]
        params = self.sampling_params(req, lens, 16)
        request_id = self.new_id("cmpl")
        subs = self.submit(prompts, params, req.n, request_id)
        if req.stream:
            return self._stream(req, request_id, subs, lens)
        return await self._full(request_id, subs, lens)

    async def _full(self, request_id, subs, lens) -> CompletionResponse:
        texts, reasons, num_output = await self.collect(subs)
        choices = [CompletionChoice(index=i, text=texts[i], finish_reason=reasons[i])
                   for i in range(len(subs))]
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=self.usage(lens, num_output))

    async def _stream(self, req, request_id, subs, lens) -> AsyncIterator[str]:
        created = int(time.time())
        num_output = 0
        try:
            async for index, out in self.merge(subs):
                if out.finished:
                    num_output += out.num_output_tokens
                if out.text or out.finished:
                    choice = CompletionChoice(index=index, text=out.text,
                                              finish_reason=finish_reason(out.finish_reason))
                    yield sse(CompletionChunk(id=request_id, created=created,
                                              model=self.model_name, choices=[choice]))
        except ServingError as e:
            yield sse(e.response())
            yield SSE_DONE
            return
        if req.include_usage:
            yield sse(CompletionChunk(id=request_id, created=created, model=self.model_name,
                                      choices=[], usage=self.usage(lens, num_output)))
        yield SSE_DONE
