"""Offline batched generation over the paged KV cache: ``generate(model, prompts, ...)``.

One prefill step (ragged prompts right-padded to a bucketed length, padding at position ``-1``)
then one decode step per token, each a single compiled call of ``model.step`` fused with
:func:`jaxwint2.sampling.sample`, the cache donated. Shapes come from fixed buckets (batch and
prompt length rounded up to powers of two, block-table width likewise), so a second call with
similar sizes compiles nothing. The host never waits inside a step: the next step is dispatched
with the previous step's token *array*, and the previous tokens are read back while it runs.

Each row owns a contiguous range of cache blocks; this module is the simplest possible block
allocator and knows nothing of continuous batching (the serving engine's job) or tokenizers.

Example:
  >>> out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, temperature=0.0)
  >>> out  # one list of new token ids per prompt, stop token excluded
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .sampling import sample, step_keys

MIN_PROMPT_BUCKET = 16
MIN_CONTEXT_BUCKET = 256  # tokens of cache per row: short requests share one compiled shape


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two ``>= max(n, minimum)``."""
    n = max(int(n), int(minimum))
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _sample_step(graphdef):
    """``step`` + ``sample`` as one jitted call: (state, ...) -> (tokens [B], cache)."""

    def fn(state, tokens, positions, block_tables, cache, logits_at, seeds, num_generated,
           temperature, top_p, top_k):
        model = nnx.merge(graphdef, state)
        logits, cache = model.step(tokens, positions, block_tables, cache, logits_at=logits_at)
        keys = step_keys(seeds, num_generated)
        return sample(logits, keys, temperature, top_p, top_k), cache

    return jax.jit(fn, donate_argnums=(4,))


def _per_row(name: str, value, n: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr, dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or one value per prompt ({n}), "
                         f"got shape {arr.shape}")
    return arr


def generate(model, prompt_token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float | Sequence[float] = 1.0, top_p: float | Sequence[float] = 1.0,
             top_k: int | Sequence[int] = 0, seed: int | Sequence[int] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             block_size: int = 16) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: an :class:`~jaxwint2.model.ErnieForCausalLM`.
      prompt_token_ids: one non-empty list of token ids per prompt (ragged allowed).
      max_new_tokens: most tokens to generate per prompt.
      temperature, top_p, top_k: scalars or one value per prompt (see
        :func:`jaxwint2.sampling.sample`; ``temperature=0`` is greedy).
      seed: one seed for every prompt (a prompt's samples then do not depend on its batch
        mates), one per prompt, or ``None`` for fresh randomness.
      stop_token_ids: ids that end a sequence (excluded from the output); default the config's
        ``eos_token_id``; ``[]`` to never stop early.
      block_size: KV cache block size.

    Returns:
      The generated ids of each prompt.
    """
    cfg = model.config
    if isinstance(prompt_token_ids, np.ndarray):
        prompt_token_ids = prompt_token_ids.tolist()
    prompts = [list(map(int, p)) for p in prompt_token_ids]
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt_token_ids[{i}] is empty")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt_token_ids[{i}] has ids outside [0, {cfg.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = {cfg.eos_token_id} if stop_token_ids is None else {int(t) for t in stop_token_ids}

    n = len(prompts)
    rows = bucket(n)
    lengths = np.array([len(p) for p in prompts] + [1] * (rows - n), np.int32)
    t_prompt = bucket(lengths.max(), MIN_PROMPT_BUCKET)
    blocks_per_row = bucket(-(-(t_prompt + max_new_tokens) // block_size),
                            -(-MIN_CONTEXT_BUCKET // block_size))
    block_tables = np.arange(rows * blocks_per_row, dtype=np.int32).reshape(rows, blocks_per_row)

    tokens = np.zeros((rows, t_prompt), np.int32)
    positions = np.full((rows, t_prompt), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    positions[n:, 0] = 0  # padding rows: one dummy token each

    if seed is None:
        seeds = np.frombuffer(os.urandom(4 * n), np.uint32)
    else:
        seeds = _per_row("seed", seed, n, np.int64).astype(np.uint32)
    pad = rows - n
    seeds = np.concatenate([seeds, np.zeros(pad, np.uint32)])
    temp = np.concatenate([_per_row("temperature", temperature, n, np.float32),
                           np.zeros(pad, np.float32)])
    tp = np.concatenate([_per_row("top_p", top_p, n, np.float32), np.ones(pad, np.float32)])
    tk = np.concatenate([_per_row("top_k", top_k, n, np.int32), np.zeros(pad, np.int32)])

    graphdef, state = nnx.split(model)
    step = _sample_step(graphdef)
    cache = model.init_cache(rows * blocks_per_row, block_size)
    sampling = (jnp.asarray(temp), jnp.asarray(tp), jnp.asarray(tk))

    out: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    next_tok, cache = step(state, tokens, positions, block_tables, cache, lengths - 1, seeds,
                           np.zeros(rows, np.int32), *sampling)
    zeros = np.zeros(rows, np.int32)
    for i in range(max_new_tokens):
        pending = next_tok
        if i + 1 < max_new_tokens:  # dispatch step i+1 before reading step i's tokens
            pos = (lengths + i)[:, None]
            next_tok, cache = step(state, pending[:, None], pos, block_tables, cache, zeros,
                                   seeds, np.full(rows, i + 1, np.int32), *sampling)
        host = np.asarray(jax.device_get(pending))
        for r in np.flatnonzero(~done):
            t = int(host[r])
            if t in stops:
                done[r] = True
            else:
                out[r].append(t)
        if done.all():
            break
    return out
