"""Continuous-batching policy: which requests run in the next step, and how many tokens each.

Owns the waiting queue and the running set. Every step gets a token budget
(``max_num_batched_tokens``); running decodes are served first (one token each) so a long prompt
never stalls them, then unfinished prefills and newly admitted requests share what is left in
chunks of at most ``max_prefill_chunk`` tokens (chunked prefill). Prefill rows run padded to
the longest chunk, so their padded area (rows x longest chunk) is kept within the budget too.
A request that cannot get a KV block preempts the most recently admitted running request, which
frees its blocks and later resumes by recomputing its tokens (vLLM's recompute preemption).
Requests join and leave only at step boundaries.

Knows nothing about devices, tensors, tokenizers or HTTP: plain Python over
:class:`~serve.request.Request` and :class:`~serve.block_manager.BlockManager`, unit-tested alone.
"""

from __future__ import annotations

import collections
import dataclasses

from .block_manager import BlockManager
from .request import FinishReason, Request, RequestStatus


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one step.

    Args:
      max_num_seqs: running requests at most (the largest decode batch).
      max_num_batched_tokens: tokens fed to the model per step, decodes and prefill chunks together.
      max_prefill_chunk: tokens of one request's prompt per step.
      max_prefill_seqs: requests prefilled in one step.
      max_model_len: prompt + output tokens of one request.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 256
    max_prefill_seqs: int = 8
    max_model_len: int = 2048

    def __post_init__(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (one decode token each)")
        if not 1 <= self.max_prefill_chunk <= self.max_num_batched_tokens:
            raise ValueError(f"max_prefill_chunk={self.max_prefill_chunk} must be in "
                             f"1..max_num_batched_tokens={self.max_num_batched_tokens}")


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``req.token_ids[start:start + num_tokens]`` run this step; ``sample`` when the
    chunk ends at the request's last token (a new token is then drawn from its logits)."""

    req: Request
    start: int
    num_tokens: int
    sample: bool

    @classmethod
    def of(cls, req: Request, num_tokens: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return cls(req, start, num_tokens, start + num_tokens == len(req.token_ids))


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Example:
      >>> sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8,
      ...                                   max_prefill_chunk=8), BlockManager(16, 4))
      >>> sched.add(req); out = sched.schedule()
      >>> finished = sched.update(out, sampled_tokens)
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue ----
    def add(self, req: Request) -> None:
        if req.request_id in self._by_id:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self._by_id[req.request_id] = req
        self.waiting.append(req)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """Remove a request wherever it is and free its blocks (abort or stop)."""
        req = self._by_id.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self.bm.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        return req

    # ---- one step ----
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.bm.free(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _fit(self, req: Request, n: int, preempted: list[Request]) -> bool:
        """Allocate slots for a running request, preempting later-admitted ones if needed."""
        while not self.bm.allocate_slots(req, n):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        # 1. running decodes first, then running (partial) prefills; admission order within each.
        decodes = [r for r in self.running if r.num_tokens_to_compute == 1]
        prefills = [r for r in self.running if r.num_tokens_to_compute > 1]
        rows, longest = 0, 0      # prefill rows so far and their longest chunk

        def prefill_size(n: int) -> int:
            """Chunk size for one more prefill row: rows are padded to the longest chunk, so
            keep ``rows x longest`` within the token budget (shrinking the chunk if that helps)."""
            if n <= 1 or rows == 0:
                return n
            if rows >= cfg.max_prefill_seqs:
                return 0
            if (rows + 1) * max(longest, n) <= cfg.max_num_batched_tokens:
                return n
            return min(n, longest) if (rows + 1) * longest <= cfg.max_num_batched_tokens else 0

        for req in decodes + prefills:
            if req.status is not RequestStatus.RUNNING:    # preempted by an earlier row
                continue
            n = prefill_size(min(req.num_tokens_to_compute, budget, cfg.max_prefill_chunk))
            if n == 0 or not self._fit(req, n, preempted):
                continue
            chunks.append(ScheduledChunk.of(req, n))
            budget -= n
            if n > 1:
                rows, longest = rows + 1, max(longest, n)
        # 2. admit waiting requests while there is budget, room and no memory pressure.
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < cfg.max_num_seqs):
            req = self.waiting[0]
            if not req.block_ids:
                cached = self.bm.acquire_prefix(req)
                if not req.num_preemptions:
                    req.num_cached_tokens = cached
            n = prefill_size(min(req.num_tokens_to_compute, budget, cfg.max_prefill_chunk))
            if n == 0 or not self.bm.allocate_slots(req, n):
                self.bm.free(req)       # give back the prefix blocks; retry next step
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk.of(req, n))
            budget -= n
            if n > 1:
                rows, longest = rows + 1, max(longest, n)
        # A victim may have been scheduled before it was preempted: drop its stale chunk.
        chunks = [c for c in chunks if c.req.status is RequestStatus.RUNNING]
        return SchedulerOutput(chunks, preempted)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[tuple[Request, int]]:
        """Advance the requests of ``out`` after the model ran it.

        Args:
          out: what :meth:`schedule` returned.
          sampled: request id -> new token, for every chunk with ``sample``.

        Returns:
          ``(request, new_token)`` for each request that got a token; a request that is now
          finished (stop token, ``max_tokens``, ``max_model_len``) has ``finish_reason`` set and
          is already removed, its blocks freed.
        """
        new_tokens: list[tuple[Request, int]] = []
        for chunk in out.chunks:
            req = chunk.req
            if req.status is not RequestStatus.RUNNING:     # aborted while the step ran
                continue
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            self.bm.cache_full_blocks(req)
            if not chunk.sample:
                continue
            token = sampled[req.request_id]
            req.token_ids.append(token)
            new_tokens.append((req, token))
            reason = self._check_stop(req, token)
            if reason is not None:
                self.finish(req.request_id, reason)
        return new_tokens

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        if token in req.stop_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= req.params.max_tokens:
            return FinishReason.LENGTH
        if len(req.token_ids) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
