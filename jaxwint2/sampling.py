"""Token sampling: per-row temperature / top-k / top-p, and the ``SamplingParams`` of a request.

:func:`sample` is pure and jit-friendly: every parameter is a per-row array, so one compiled
function serves a batch of requests with different settings. Conventions (vLLM's):
``temperature == 0`` is greedy (argmax, ties to the lower id), ``top_k == 0`` and
``top_p == 1.0`` switch those filters off; top-k is applied first, then top-p on the
renormalised survivors (the smallest prefix of the sorted distribution whose mass reaches
``top_p``; the most likely token always survives).

Reproducibility is the caller's: pass per-row keys derived from (request seed, number of tokens
generated so far), e.g. :func:`step_keys`, and a request samples the same tokens whatever its
batch mates. This module knows nothing about models, caches or tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def step_keys(seeds: jax.Array, num_generated: jax.Array) -> jax.Array:
    """Per-row keys ``fold_in(key(seed_b), n_b)`` for ``seeds``, ``num_generated`` int ``[B]``."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
        seeds.astype(jnp.uint32), num_generated.astype(jnp.uint32))


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array) -> jax.Array:
    """Sample one token per row.

    Args:
      logits: fp32 ``[B, V]``.
      keys: ``[B]`` typed PRNG keys (:func:`step_keys`).
      temperature: ``[B]``; 0 = greedy.
      top_p: ``[B]`` in (0, 1]; 1.0 = off.
      top_k: int ``[B]``; 0 = off.

    Returns:
      int32 ``[B]`` token ids.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    t = jnp.maximum(temperature.astype(jnp.float32), 1e-6)[:, None]
    order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V] most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1) / t
    rank = jnp.arange(v, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)[:, None]
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive prefix mass
    keep = (mass_before < top_p.astype(jnp.float32)[:, None]) | (rank == 0)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)

    choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)  # index into the sorted row
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request (the shape of vLLM's / FastDeploy's ``SamplingParams``).

    Attributes:
      temperature: 0 = greedy.
      top_p: nucleus mass in (0, 1]; 1.0 = off.
      top_k: 0 = off.
      max_tokens: most tokens to generate.
      stop: strings that end the output (not included in the text).
      stop_token_ids: extra token ids that end generation (eos is always one, via the
        tokenizer).
      seed: per-request seed; ``None`` = fresh randomness.
      n: completions per prompt.

    Example:
      >>> SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=0)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def replace(self, **kw) -> SamplingParams:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_generation_config(cls, path: str | os.PathLike, **overrides) -> SamplingParams:
        """Defaults from a checkpoint's ``generation_config.json`` (if present), then overrides."""
        fields = {}
        f = os.path.join(path, "generation_config.json")
        if os.path.exists(f):
            with open(f) as fh:
                g = json.load(fh)
            if g.get("do_sample") is False:
                fields["temperature"] = 0.0
            for key in ("temperature", "top_p", "top_k"):
                if key in g and not (key == "temperature" and "temperature" in fields):
                    fields[key] = g[key]
            if "max_new_tokens" in g:
                fields["max_tokens"] = int(g["max_new_tokens"])
        fields.update(overrides)
        return cls(**fields)


def as_row_arrays(params: Sequence[SamplingParams]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(temperature f32 [B], top_p f32 [B], top_k int32 [B])`` for a batch of requests."""
    return (jnp.asarray([p.temperature for p in params], jnp.float32),
            jnp.asarray([p.top_p for p in params], jnp.float32),
            jnp.asarray([p.top_k for p in params], jnp.int32))
