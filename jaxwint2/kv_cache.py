"""The paged KV cache: storage, slot arithmetic, per-layer write and gather.

Layout: ``k, v: [L, num_blocks, block_size, n_kv, head_dim]`` in the compute dtype. A sequence
owns a list of physical blocks (its row of ``block_tables [B, P]``); its token at absolute
position ``pos`` lives in block ``block_tables[b, pos // block_size]`` at offset
``pos % block_size``. Position ``-1`` marks padding: such tokens are never written.

This module owns that arithmetic and nothing else: it does not know which blocks are free (the
caller's allocator: ``jaxwint2.generate`` or the serving engine) nor how attention uses the
gathered keys (``jaxwint2.attention``). :func:`read_layer` is a plain XLA gather of each row's
blocks (prefill chunks); decode reads the cache in place in ``pallas_kernels.paged_attention``.

Storage: a bf16 cache created on XLA:CPU holds the values' uint16 bit patterns. XLA:CPU has no
bf16 gather or scatter: it widens the *whole* cache operand to f32 and back on every layer of
every step (measured: a 4-layer tiny model with a 128 MB cache took ~0.5 s per decode step), while
an integer gather/scatter touches only the rows it moves. :func:`write_layer` and
:func:`read_layer` convert at the boundary (bitcasts); :func:`values` gives the cache in its value
dtype. On GPUs the cache is plain bf16.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Paged K/V storage for all layers (a pytree; donate it to ``model.step_jit``).

    Example:
      >>> cache = model.init_cache(num_blocks=64, block_size=16)
      >>> logits, cache = model.step_jit(tokens, positions, block_tables, cache)
    """

    k: jax.Array  # [L, num_blocks, block_size, n_kv, head_dim]
    v: jax.Array  # [L, num_blocks, block_size, n_kv, head_dim]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the cached values (bf16 also when stored as bit patterns)."""
        return _value_dtype(self.k.dtype)

    @classmethod
    def create(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
               head_dim: int, dtype) -> KVCache:
        """Zero-filled cache (zeros, not garbage: masked slots must stay finite)."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        store = storage_dtype(dtype)  # bf16 zeros and uint16 zeros are the same bits
        return cls(k=jnp.zeros(shape, store), v=jnp.zeros(shape, store))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


def storage_dtype(dtype) -> jnp.dtype:
    """How values of ``dtype`` are stored on the default backend (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.uint16)
    return dtype


def _value_dtype(storage) -> jnp.dtype:
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(storage) == jnp.uint16 else jnp.dtype(storage)


def _to_storage(x: jax.Array, storage) -> jax.Array:
    x = x.astype(_value_dtype(storage))
    return jax.lax.bitcast_convert_type(x, storage) if x.dtype != storage else x


def _to_values(x: jax.Array) -> jax.Array:
    value = _value_dtype(x.dtype)
    return jax.lax.bitcast_convert_type(x, value) if x.dtype != value else x


def values(cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """``k, v`` in the value dtype (a bitcast; a copy where the cache holds bit patterns)."""
    return _to_values(cache.k), _to_values(cache.v)


class PagedBatch(NamedTuple):
    """Per-step addressing shared by all layers (computed once per step, inside the jit)."""

    slots: jax.Array         # int32 [B*T] flat slot of each new token; out of range = padding
    block_tables: jax.Array  # int32 [B, P]
    key_positions: jax.Array  # int32 [B, P*block_size]: absolute position of each gathered key


def paged_batch(positions: jax.Array, block_tables: jax.Array, cache: KVCache) -> PagedBatch:
    """Slots to write and key positions to read for ``positions [B, T]`` (``-1`` = padding)."""
    bs = cache.block_size
    b, t = positions.shape
    p = block_tables.shape[1]
    valid = positions >= 0
    safe = jnp.where(valid, positions, 0)
    block_idx = jnp.minimum(safe // bs, p - 1)
    block = jnp.take_along_axis(block_tables, block_idx, axis=1)  # [B, T]
    slots = block * bs + safe % bs
    # Padding (and positions beyond the table) go to an out-of-range slot: dropped on write.
    in_table = valid & (safe < p * bs)
    slots = jnp.where(in_table, slots, cache.num_blocks * bs).reshape(b * t)
    key_positions = jnp.broadcast_to(jnp.arange(p * bs, dtype=jnp.int32), (b, p * bs))
    return PagedBatch(slots.astype(jnp.int32), block_tables.astype(jnp.int32), key_positions)


def write_layer(cache: KVCache, layer: jax.Array | int, k: jax.Array, v: jax.Array,
                batch: PagedBatch) -> KVCache:
    """Scatter new ``k, v [B, T, n_kv, d]`` of layer ``layer`` into their slots (in place)."""
    n_layers, nb, bs, nkv, d = cache.k.shape
    flat_k = cache.k.reshape(n_layers, nb * bs, nkv, d)
    flat_v = cache.v.reshape(n_layers, nb * bs, nkv, d)
    k = _to_storage(k.reshape(-1, nkv, d), cache.k.dtype)
    v = _to_storage(v.reshape(-1, nkv, d), cache.v.dtype)
    flat_k = flat_k.at[layer, batch.slots].set(k, mode="drop")
    flat_v = flat_v.at[layer, batch.slots].set(v, mode="drop")
    return KVCache(k=flat_k.reshape(cache.k.shape), v=flat_v.reshape(cache.v.shape))


def read_layer(cache: KVCache, layer: jax.Array | int,
               batch: PagedBatch) -> tuple[jax.Array, jax.Array]:
    """Gather each row's blocks of layer ``layer`` -> ``k, v [B, P*block_size, n_kv, d]``."""
    # One gather with the layer index folded in: slicing ``cache.k[layer]`` first would copy
    # the whole layer (all blocks of every sequence) before picking this batch's blocks.
    k = cache.k[layer, batch.block_tables]  # [B, P, bs, n_kv, d]
    v = cache.v[layer, batch.block_tables]
    b, n, bs, nkv, d = k.shape
    return (_to_values(k).reshape(b, n * bs, nkv, d), _to_values(v).reshape(b, n * bs, nkv, d))
