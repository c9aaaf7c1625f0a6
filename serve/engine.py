"""The inference engine: token ids in, token ids (and text deltas) out, with continuous batching.

Owns the step loop. A background thread repeats *schedule -> run on device -> update*: new
requests and aborts are taken in at step boundaries, the :class:`~serve.scheduler.Scheduler`
decides what runs, the :class:`~serve.runner.ModelRunner` runs it on the paged KV cache, and the
outputs (token ids plus detokenized text, stop strings applied) are handed to the asyncio loop of
each caller in one batch per step. :meth:`Engine.submit` is an async generator of
:class:`~serve.request.RequestOutput`; leaving it early (a client disconnect cancels the task)
aborts the request and frees its blocks.

The HTTP layer depends only on the :class:`EngineClient` protocol defined here. Knows nothing
about HTTP, OpenAI's formats or Prometheus (an optional :class:`StatsObserver` receives timings).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from .block_manager import BlockManager, kv_bytes_per_block, num_blocks_for_budget
from .detokenizer import IncrementalDetokenizer
from .request import FinishReason, Request, RequestOutput, SamplingParams
from .runner import ModelRunner, RunnerConfig
from .scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request (a server fault, not the client's)."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Engine sizing.

    Args:
      max_num_seqs: requests decoded together at most.
      max_model_len: prompt + output tokens of one request.
      block_size: tokens per KV-cache block.
      kv_cache_bytes: memory budget of the KV cache; ``num_blocks`` is derived from it (capped at
        ``max_num_seqs`` requests of ``max_model_len`` tokens).
      num_blocks: explicit block count (overrides ``kv_cache_bytes``).
      max_num_batched_tokens: tokens per step (decodes plus prefill chunks).
      max_prefill_chunk: prompt tokens of one request per step (chunked prefill).
      max_prefill_seqs: requests prefilled in one step.
      max_waiting: queued requests beyond which ``submit`` raises :class:`QueueFullError`.
      enable_prefix_caching: share the KV blocks of common prompt prefixes.
      warmup: shapes compiled before ``ready``: ``none``, ``minimal`` or ``all``.
      decode_buckets, prefill_batch_buckets, prefill_len_buckets, block_buckets: explicit
        shape buckets of the runner (default: powers of two); fewer buckets, fewer compilations.
    """

    max_num_seqs: int = 64
    max_model_len: int = 2048
    block_size: int = 16
    kv_cache_bytes: int = 256 << 20
    num_blocks: int | None = None
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 256
    max_prefill_seqs: int = 8
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    warmup: str = "minimal"
    decode_buckets: tuple[int, ...] = ()
    prefill_batch_buckets: tuple[int, ...] = ()
    prefill_len_buckets: tuple[int, ...] = ()
    block_buckets: tuple[int, ...] = ()

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot for ``/metrics`` and tests."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    kv_cache_usage: float
    num_compilations: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_steps: int


class StatsObserver(Protocol):
    """Receives per-step and per-request timings (``serve.metrics`` implements it)."""

    def on_step(self, *, ttfts: Sequence[float], itls: Sequence[float],
                num_generation_tokens: int, num_prefill_tokens: int) -> None: ...

    def on_finish(self, *, finish_reason: str, e2e_latency: float, num_prompt_tokens: int,
                  num_output_tokens: int) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    """What the serving layer needs from an engine (a fake one satisfies it in tests)."""

    @property
    def ready(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               request_id: str) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


@dataclasses.dataclass(eq=False)
class _Tracked:
    """Engine-thread state of one request beyond what the scheduler keeps."""

    req: Request
    detok: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    first_token_time: float | None = None
    last_token_time: float | None = None


class Engine:
    """Continuous-batching engine over a model with the paged ``step_jit`` API.

    Example:
      >>> engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=8)).start()
      >>> async for out in engine.submit(tokenizer.encode("Hi"), SamplingParams(), "r1"):
      ...     print(out.text, end="")
      >>> engine.shutdown()
    """

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), *,
                 sample_fn=None, observer: StatsObserver | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.observer = observer
        self._sample_fn = sample_fn
        self.model_config = getattr(model, "cfg", None) or model.config
        self.vocab_size = int(self.model_config.vocab_size)
        self.eos_ids = frozenset(getattr(tokenizer, "stop_token_ids", None)
                                 or {tokenizer.eos_token_id})
        # A budget beyond every running request at full length could only hold prefix-cache
        # entries; cap it there (an explicit num_blocks is taken as given).
        self.num_blocks = config.num_blocks or min(
            num_blocks_for_budget(config.kv_cache_bytes, self.bytes_per_block),
            config.max_num_seqs * config.max_blocks_per_seq)
        self.block_manager = BlockManager(self.num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            max_prefill_chunk=config.max_prefill_chunk,
            max_prefill_seqs=config.max_prefill_seqs,
            max_model_len=config.max_model_len), self.block_manager)
        self.runner: ModelRunner | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._inbox: collections.deque[tuple[str, object]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = False
        self._error: BaseException | None = None
        self._num_steps = 0

    # ---- sizing ----
    @property
    def bytes_per_block(self) -> int:
        cfg = self.model_config
        dtype_bytes = getattr(self.model, "cache_dtype_bytes", None) or \
            np.dtype(self.model.compute_dtype).itemsize
        return kv_bytes_per_block(num_layers=cfg.num_hidden_layers,
                                  num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                  block_size=self.config.block_size, dtype_bytes=dtype_bytes)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def ready(self) -> bool:
        return self._ready and self._error is None

    # ---- lifecycle ----
    def start(self) -> Engine:
        """Allocate the cache, compile the warm-up shapes and start the step thread."""
        c = self.config
        self.runner = ModelRunner(self.model, RunnerConfig(
            num_blocks=self.num_blocks, block_size=c.block_size, max_num_seqs=c.max_num_seqs,
            max_prefill_seqs=c.max_prefill_seqs, max_prefill_chunk=c.max_prefill_chunk,
            max_blocks_per_seq=c.max_blocks_per_seq,
            max_num_batched_tokens=self.scheduler.config.max_num_batched_tokens,
            decode_buckets=c.decode_buckets,
            prefill_batch_buckets=c.prefill_batch_buckets,
            prefill_len_buckets=c.prefill_len_buckets, block_buckets=c.block_buckets),
            sample_fn=self._sample_fn)
        t0 = time.perf_counter()
        self.runner.warmup(c.warmup)
        log.info("engine: %d KV blocks of %d tokens (%.1f MiB), warm-up %r took %.1f s",
                 self.num_blocks, c.block_size, self.num_blocks * self.bytes_per_block / 2**20,
                 c.warmup, time.perf_counter() - t0)
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()
        self._ready = True
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._ready = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(EngineError("the engine was shut down"))   # no stream waits forever

    # ---- client API ----
    def _validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        n = len(prompt_ids)
        if n >= self.config.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; the maximum model length is "
                             f"{self.config.max_model_len} (prompt + at least one new token)")
        if (bad := next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        longest = min(n + params.max_tokens, self.config.max_model_len)
        if math.ceil(longest / self.config.block_size) > self.num_blocks:
            raise ValueError(f"{n} prompt tokens + max_tokens={params.max_tokens} do not fit "
                             f"in the KV cache ({self.num_blocks} blocks of "
                             f"{self.config.block_size} tokens)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               request_id: str) -> AsyncIterator[RequestOutput]:
        """Queue one request; returns an async iterator of its deltas (the last one has
        ``finish_reason``). Call it from the event loop that will consume the outputs.

        Raises ``ValueError`` (bad input), :class:`QueueFullError` or :class:`EngineError` right
        away, before anything is queued. Closing or cancelling the iterator aborts the request.
        """
        if not self.ready:
            raise EngineError(f"engine is not running: {self._error!r}" if self._error
                              else "engine is not ready")
        self._validate(prompt_ids, params)
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.scheduler.num_waiting + len(self._inbox) >= self.config.max_waiting:
            raise QueueFullError(f"{self.config.max_waiting} requests are already waiting")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        req = Request(request_id, [int(t) for t in prompt_ids], params, seed=seed,
                      stop_ids=(frozenset() if params.ignore_eos else self.eos_ids)
                      | frozenset(params.stop_token_ids))
        skip = self.eos_ids | frozenset(params.stop_token_ids)
        tracked = _Tracked(req, IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                                       stop=params.stop, skip_ids=skip),
                           asyncio.get_running_loop(), asyncio.Queue())
        self._tracked[request_id] = tracked
        self._inbox.append(("add", tracked))
        self._wake.set()
        return self._stream(tracked)

    async def _stream(self, tracked: _Tracked) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await tracked.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(tracked.req.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary and free its blocks (idempotent)."""
        self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting + len(self._inbox),
            num_blocks=bm.num_blocks, num_used_blocks=bm.num_used_blocks,
            num_cached_blocks=bm.num_cached_blocks, kv_cache_usage=bm.usage,
            num_compilations=self.runner.num_compilations if self.runner else 0,
            num_preemptions=sched.num_preemptions, prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits, num_steps=self._num_steps)

    # ---- engine thread ----
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as e:  # noqa: BLE001 - the thread must report every failure
            log.exception("engine step failed")
            self._error = e
            self._fail_all(EngineError(f"engine failure: {e!r}"))

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self.scheduler.add(item.req)
            else:
                self._finish(item, FinishReason.ABORT, deliver=True)

    def _finish(self, request_id: str, reason: FinishReason, *, deliver: bool) -> None:
        if self.scheduler.finish(request_id, reason) is None:
            return
        t = self._tracked.get(request_id)
        if t is not None and deliver:
            self._deliver({t.loop: [(t, self._output(t, (), reason))]})
        self._retire(request_id, reason)

    def _retire(self, request_id: str, reason: FinishReason) -> None:
        t = self._tracked.pop(request_id, None)
        if t is not None and self.observer is not None:
            self.observer.on_finish(finish_reason=reason.value,
                                    e2e_latency=time.monotonic() - t.req.arrival_time,
                                    num_prompt_tokens=t.req.num_prompt_tokens,
                                    num_output_tokens=t.req.num_output_tokens)

    def _output(self, t: _Tracked, token_ids: tuple[int, ...],
                reason: FinishReason | None) -> RequestOutput:
        req = t.req
        return RequestOutput(req.request_id, token_ids, t.detok.delta(final=reason is not None),
                             req.num_prompt_tokens, req.num_output_tokens, reason,
                             req.num_cached_tokens)

    def _step(self) -> None:
        sched_out = self.scheduler.schedule()
        if not sched_out.chunks:      # nothing fits right now (cannot happen with validated input)
            self._wake.wait(0.01)
            self._wake.clear()
            return
        sampled = self.runner.execute(sched_out.chunks)
        self._num_steps += 1
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        ttfts, itls = [], []
        for req, token in self.scheduler.update(sched_out, sampled):
            t = self._tracked[req.request_id]
            if t.first_token_time is None:
                t.first_token_time = now
                ttfts.append(now - req.arrival_time)
            else:
                itls.append(now - t.last_token_time)
            t.last_token_time = now
            reason = req.finish_reason
            if t.detok.add(token) and reason is None:         # a stop string matched
                reason = FinishReason.STOP
                self.scheduler.finish(req.request_id, reason)
            batches[t.loop].append((t, self._output(t, (token,), reason)))
            if reason is not None:
                self._retire(req.request_id, reason)
        if self.observer is not None:
            prefill = sum(c.num_tokens for c in sched_out.chunks if c.num_tokens > 1)
            self.observer.on_step(ttfts=ttfts, itls=itls, num_generation_tokens=len(sampled),
                                  num_prefill_tokens=prefill)
        self._deliver(batches)

    @staticmethod
    def _deliver(batches: dict) -> None:
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):   # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, err: BaseException) -> None:
        batches: dict = collections.defaultdict(list)
        for t in self._tracked.values():
            batches[t.loop].append((t, err))
        self._tracked.clear()
        self._deliver(batches)


def _put_all(items) -> None:
    for t, out in items:
        t.queue.put_nowait(out)


def load_engine(model_path: str | None = None, *, kernels: str = "auto",
                tensor_parallel_size: int = 1, config: EngineConfig = EngineConfig(),
                start: bool = True) -> tuple[Engine, object]:
    """Load a converted checkpoint (or the embedded demo model when ``model_path`` is None)
    and build an engine over it; returns ``(engine, tokenizer)``."""
    import jaxwint2
    from jaxwint2.tokenizer import Tokenizer

    if model_path is None:
        from jaxwint2.demo import ensure_demo_model

        model_path = str(ensure_demo_model())
    model = jaxwint2.load(model_path, kernels=kernels, tensor_parallel_size=tensor_parallel_size)
    tokenizer = Tokenizer.from_dir(model_path)
    engine = Engine(model, tokenizer, config)
    return (engine.start() if start else engine), tokenizer
