"""The engine's device side: scheduled chunks -> bucketed arrays -> ``model.step_jit`` -> tokens.

Owns the paged KV cache array (created by ``model.init_cache``), the shape buckets and the
sampling call. Each step runs at most two model calls, each with a shape taken from a fixed set
so that nothing recompiles once every bucket has been seen:

* decode rows (one token each): ``tokens [B, 1]`` with ``B`` a power of two up to
  ``max_num_seqs``;
* prefill chunks: ``tokens [Bp, T]`` with ``Bp`` a power of two up to ``max_prefill_seqs`` and
  ``T`` a power of two (at least 16) up to ``max_prefill_chunk``;
* block tables ``[B, P]`` with ``P`` a power of two of blocks up to ``max_blocks_per_seq``, so
  attention over short contexts does not pay for ``max_model_len``.

Padding rows and tokens carry position ``-1`` (the model neither writes nor reads them). Each
distinct shape is one compilation, counted for ``/metrics``. Sampling is
``jaxwint2.sampling.sample`` with keys ``fold_in(key(seed), n_generated)``, so a request's tokens
never depend on its batch mates.

Knows nothing about requests' lifecycles, queues or text; the scheduler decides *what* runs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxwint2 import sampling

from .scheduler import ScheduledChunk

log = logging.getLogger(__name__)

MIN_PREFILL_LEN = 16


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` up to ``hi``, with ``hi`` itself always last."""
    out, b = [], 1
    while b < hi:
        if b >= lo:
            out.append(b)
        b *= 2
    return (*out, hi)


def bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _checked(buckets: Sequence[int], needed: int, name: str) -> tuple[int, ...]:
    buckets = tuple(sorted(buckets))
    if buckets[0] < 1 or buckets[-1] < needed:
        raise ValueError(f"{name}={buckets} must be positive and reach {needed}")
    return buckets


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_prefill_seqs: int
    max_prefill_chunk: int
    max_blocks_per_seq: int
    max_num_batched_tokens: int = 1 << 30
    min_block_bucket: int = 4
    # explicit bucket sets (ascending; the last one covers the maximum); empty = powers of two
    decode_buckets: tuple[int, ...] = ()
    prefill_batch_buckets: tuple[int, ...] = ()
    prefill_len_buckets: tuple[int, ...] = ()
    block_buckets: tuple[int, ...] = ()


def seed32(seed: int) -> int:
    """The 32-bit seed of ``jaxwint2.sampling.step_keys``; identity below 2**32, so the server
    and offline ``jaxwint2.generate`` sample the same tokens for the same seed."""
    s = seed % 2**64
    return s if s < 2**32 else ((s & 0xFFFFFFFF) ^ ((s >> 32) * 0x9E3779B1)) & 0xFFFFFFFF


@functools.lru_cache(maxsize=8)
def _sampler(sample: Callable) -> Callable:
    """``sample`` under jit with per-row keys ``fold_in(key(seed), num_generated)``; cached so
    that every engine in a process shares one compilation per batch size."""

    def sample_rows(logits, seeds, counters, temperature, top_p, top_k):
        return sample(logits, sampling.step_keys(seeds, counters), temperature, top_p, top_k)

    return jax.jit(sample_rows)


@dataclasses.dataclass
class _Batch:
    """Host arrays of one model call plus the request ids of its real rows."""

    request_ids: list[str | None]    # None for rows that are not sampled
    tokens: np.ndarray               # int32 [B, T]
    positions: np.ndarray            # int32 [B, T]
    block_tables: np.ndarray         # int32 [B, P]
    logits_at: np.ndarray            # int32 [B]
    seeds: np.ndarray                # uint32 [B]
    counters: np.ndarray             # int32 [B]
    temperature: np.ndarray          # f32 [B]
    top_p: np.ndarray                # f32 [B]
    top_k: np.ndarray                # int32 [B]


class ModelRunner:
    """Runs scheduled chunks on the device and samples their next tokens.

    Example:
      >>> runner = ModelRunner(model, RunnerConfig(num_blocks=256, block_size=16, max_num_seqs=8,
      ...     max_prefill_seqs=4, max_prefill_chunk=64, max_blocks_per_seq=32))
      >>> runner.execute(sched_out.chunks)   # {request_id: token}
    """

    def __init__(self, model, config: RunnerConfig, *, sample_fn: Callable | None = None):
        self.model = model
        self.config = config
        c = config
        self.cache = model.init_cache(c.num_blocks, c.block_size)
        self._step = model.step_jit      # bound once: the model's weights are fixed
        self.decode_buckets = _checked(c.decode_buckets or pow2_buckets(1, c.max_num_seqs),
                                       c.max_num_seqs, "decode_buckets")
        self.prefill_batch_buckets = _checked(
            c.prefill_batch_buckets or pow2_buckets(1, c.max_prefill_seqs), c.max_prefill_seqs,
            "prefill_batch_buckets")
        self.prefill_len_buckets = _checked(
            c.prefill_len_buckets or pow2_buckets(min(MIN_PREFILL_LEN, c.max_prefill_chunk),
                                                  c.max_prefill_chunk),
            c.max_prefill_chunk, "prefill_len_buckets")
        self.block_buckets = _checked(
            c.block_buckets or pow2_buckets(min(c.min_block_bucket, c.max_blocks_per_seq),
                                            c.max_blocks_per_seq),
            c.max_blocks_per_seq, "block_buckets")
        self._sample = _sampler(sample_fn or sampling.sample)
        self._shapes: set[tuple] = set()
        self._lock = threading.Lock()
        self.num_compilations = 0

    # ---- shapes ----
    def _note_shape(self, *key) -> None:
        with self._lock:
            if key not in self._shapes:
                self._shapes.add(key)
                self.num_compilations += 1
                log.info("compiling %s", key)

    @property
    def shapes(self) -> frozenset[tuple]:
        return frozenset(self._shapes)

    def _block_bucket(self, blocks: int) -> int:
        return bucket(max(blocks, 1), self.block_buckets)

    # ---- batches ----
    def _empty(self, b: int, t: int, p: int) -> _Batch:
        return _Batch(
            request_ids=[None] * b,
            tokens=np.zeros((b, t), np.int32),
            positions=np.full((b, t), -1, np.int32),
            block_tables=np.zeros((b, p), np.int32),
            logits_at=np.zeros((b,), np.int32),
            seeds=np.zeros((b,), np.uint32),
            counters=np.zeros((b,), np.int32),
            temperature=np.zeros((b,), np.float32),
            top_p=np.ones((b,), np.float32),
            top_k=np.zeros((b,), np.int32),
        )

    def _build(self, chunks: Sequence[ScheduledChunk], b: int, t: int) -> _Batch:
        bs = self.config.block_size
        blocks = max(math.ceil((c.start + c.num_tokens) / bs) for c in chunks)
        batch = self._empty(b, t, self._block_bucket(blocks))
        for i, c in enumerate(chunks):
            req, n = c.req, c.num_tokens
            batch.tokens[i, :n] = req.token_ids[c.start:c.start + n]
            batch.positions[i, :n] = np.arange(c.start, c.start + n)
            batch.block_tables[i, :len(req.block_ids)] = req.block_ids
            batch.logits_at[i] = n - 1
            if c.sample:
                p = req.params
                batch.request_ids[i] = req.request_id
                batch.seeds[i] = seed32(req.seed)
                batch.counters[i] = req.num_output_tokens
                batch.temperature[i] = p.temperature
                batch.top_p[i] = p.top_p
                batch.top_k[i] = p.top_k
        return batch

    def _launch(self, batch: _Batch) -> jax.Array:
        b, t = batch.tokens.shape
        self._note_shape("step", b, t, batch.block_tables.shape[1])
        self._note_shape("sample", b)
        logits, self.cache = self._step(
            jnp.asarray(batch.tokens), jnp.asarray(batch.positions),
            jnp.asarray(batch.block_tables), self.cache, logits_at=jnp.asarray(batch.logits_at))
        return self._sample(logits, batch.seeds, batch.counters, batch.temperature,
                            batch.top_p, batch.top_k)

    def execute(self, chunks: Sequence[ScheduledChunk]) -> dict[str, int]:
        """Run one step; returns the new token of every chunk that samples."""
        decode = [c for c in chunks if c.num_tokens == 1]
        prefill = [c for c in chunks if c.num_tokens > 1]
        launched: list[tuple[_Batch, jax.Array]] = []
        if decode:
            batch = self._build(decode, bucket(len(decode), self.decode_buckets), 1)
            launched.append((batch, self._launch(batch)))
        if prefill:
            b = bucket(len(prefill), self.prefill_batch_buckets)
            t = bucket(max(c.num_tokens for c in prefill), self.prefill_len_buckets)
            batch = self._build(prefill, b, t)
            launched.append((batch, self._launch(batch)))
        tokens = jax.device_get([tok for _, tok in launched])    # one host sync per step
        out: dict[str, int] = {}
        for (batch, _), toks in zip(launched, tokens, strict=True):
            for rid, tok in zip(batch.request_ids, toks.tolist(), strict=True):
                if rid is not None:
                    out[rid] = int(tok)
        return out

    # ---- warm-up ----
    def warmup_shapes(self, level: str) -> list[tuple[int, int, int]]:
        """Shapes ``(B, T, P)`` compiled before serving, each at the smallest ``P`` it can have:
        ``none``; ``minimal`` (the smallest decode and prefill shapes); ``all`` (every decode
        bucket and every prefill batch x length bucket the scheduler can produce)."""
        p = self.block_buckets[0]

        def p_for(t: int) -> int:   # a chunk of t tokens spans at least ceil(t / bs) blocks
            return self._block_bucket(math.ceil(t / self.config.block_size))

        if level == "none":
            return []
        if level == "minimal":
            t = self.prefill_len_buckets[0]
            return [(self.decode_buckets[0], 1, p), (self.prefill_batch_buckets[0], t, p_for(t))]
        if level == "all":
            return ([(b, 1, p) for b in self.decode_buckets]
                    + [(b, t, p_for(t)) for b, t in self._reachable_prefill_shapes()])
        raise ValueError(f"warmup level {level!r} is not one of none/minimal/all")

    def _reachable_prefill_shapes(self) -> list[tuple[int, int]]:
        """Prefill buckets ``(Bp, T)`` the scheduler can produce: the fewest rows and the
        shortest longest-chunk that land in a bucket must fit the padded-area budget."""
        out = []
        for i, b in enumerate(self.prefill_batch_buckets):
            rows = self.prefill_batch_buckets[i - 1] + 1 if i else 1
            for j, t in enumerate(self.prefill_len_buckets):
                longest = self.prefill_len_buckets[j - 1] + 1 if j else 2
                if rows * longest <= self.config.max_num_batched_tokens:
                    out.append((b, t))
        return out

    def warmup(self, level: str = "minimal") -> None:
        """Compile the step and sampler for a set of shapes with all-padding batches (positions
        ``-1``: the cache is left untouched)."""
        for b, t, p in self.warmup_shapes(level):
            jax.block_until_ready(self._launch(self._empty(b, t, p)))
