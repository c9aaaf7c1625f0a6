"""``/v1/chat/completions``: OpenAI chat <-> engine.

Owns rendering the messages with the tokenizer's chat template, the full response, and the SSE
stream (a role chunk per choice, content deltas, a finish chunk per choice, an optional usage
chunk, then ``data: [DONE]``). Knows nothing about routing, metrics or how the engine batches.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    DeltaMessage,
)
from .serving_base import SSE_DONE, OpenAIServing, ServingError, bad_request, finish_reason, sse


class OpenAIServingChat(OpenAIServing):
    """Example:
      >>> serving = OpenAIServingChat(engine, tokenizer, model_name="ernie")
      >>> resp = await serving.create(ChatCompletionRequest(messages=[...]))
    """

    def render(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ValueError, TypeError, KeyError) as e:
            raise bad_request(f"cannot apply the chat template: {e}", "messages") from e
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    async def create(self, req: ChatCompletionRequest
                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A full response, or an SSE stream; raises :class:`ServingError` before any output."""
        self.check_request(req)
        prompt = self.render(req)
        params = self.sampling_params(req, [len(prompt)], None)
        request_id = self.new_id("chatcmpl")
        subs = self.submit([prompt], params, req.n, request_id)
        if req.stream:
            return self._stream(req, request_id, subs, len(prompt))
        return await self._full(req, request_id, subs, len(prompt))

    async def _full(self, req, request_id, subs, prompt_len) -> ChatCompletionResponse:
        texts, reasons, num_output = await self.collect(subs)
        choices = [ChatCompletionChoice(index=i, message=ChatMessageOut(content=texts[i]),
                                        finish_reason=reasons[i]) for i in range(len(subs))]
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=self.usage([prompt_len], num_output))

    async def _stream(self, req, request_id, subs, prompt_len) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                           choices=choices, usage=usage))

        for sub in subs:
            yield chunk([ChatCompletionChunkChoice(index=sub.index,
                                                   delta=DeltaMessage(role="assistant",
                                                                      content=""))])
        num_output = 0
        try:
            async for index, out in self.merge(subs):
                if out.text:
                    yield chunk([ChatCompletionChunkChoice(
                        index=index, delta=DeltaMessage(content=out.text))])
                if out.finished:
                    num_output += out.num_output_tokens
                    yield chunk([ChatCompletionChunkChoice(
                        index=index, delta=DeltaMessage(),
                        finish_reason=finish_reason(out.finish_reason))])
        except ServingError as e:
            yield sse(e.response())
            yield SSE_DONE
            return
        if req.include_usage:
            yield chunk([], self.usage([prompt_len], num_output))
        yield SSE_DONE
