"""Blockwise (online-softmax) attention against a dense NumPy oracle kept in this file.

The oracle is the masking rule written out: key ``s`` is visible to query ``t`` iff
``0 <= k_pos[s] <= q_pos[t]``; softmax over the visible keys; a query that sees no key returns 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxwint2 import kv_cache as kvc
from jaxwint2.attention import attend as _attend_eager
from pallas_kernels import paged_attention

attend = jax.jit(_attend_eager, static_argnames=("block_k", "q_chunk", "skip"))


def dense_reference(q, k, v, q_pos, k_pos):
    """fp64 dense GQA attention: ``q [B,T,nh,d]``, ``k, v [B,S,nkv,d]`` -> ``[B,T,nh,d]``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    b, t, nh, d = q.shape
    g = nh // k.shape[2]
    k = np.repeat(k, g, axis=2)  # query head j reads kv head j // g
    v = np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B,T,S]
    s = np.where(visible[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(visible[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / np.where(den > 0, den, 1)
    return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(rng, b, t, s, nh, nkv, d, dtype=np.float32):
    return ((rng.standard_normal((b, t, nh, d)) * 2).astype(dtype),
            (rng.standard_normal((b, s, nkv, d)) * 2).astype(dtype),
            rng.standard_normal((b, s, nkv, d)).astype(dtype))


def _check(got, want, tol):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def _ragged_case(rng):
    """B=3, GQA 6/2: padding keys, per-row lengths, and fully masked query rows."""
    b, t, s = 3, 21, 37
    q, k, v = _qkv(rng, b, t, s, 6, 2, 16)
    k_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    k_pos[0, 30:] = -1                      # row 0: right-padded keys
    k_pos[1, [3, 4, 11, 20]] = -1           # row 1: holes
    k_pos[2] = rng.permutation(s)           # row 2: keys in no particular order
    q_pos = np.stack([np.arange(9, 9 + t), np.arange(16, 16 + t), np.arange(t) * 2 - 4])
    q_pos = q_pos.astype(np.int32)
    q_pos[0, -3:] = -1                      # padding queries: fully masked
    q_pos[1, 0] = 2                          # sees keys 0..2 only
    return q, k, v, q_pos, k_pos            # row 2's q_pos < 0 for its first 2 queries


@pytest.mark.parametrize("block_k,q_chunk,skip", [
    (None, None, None),   # one step: the whole score matrix fits
    (8, 4, True),         # block_k, q_chunk do not divide S=37, T=21
    (8, 4, False),        # static trip count: every block
    (16, 32, None),       # one query chunk, several key blocks
    (64, 5, None),        # one key block, several query chunks
])
def test_blockwise_matches_dense_fp32(block_k, q_chunk, skip):
    q, k, v, q_pos, k_pos = _ragged_case(np.random.default_rng(0))
    got = attend(q, k, v, q_pos, k_pos, block_k=block_k, q_chunk=q_chunk, skip=skip)
    _check(got, dense_reference(q, k, v, q_pos, k_pos), 2e-5)
    assert np.all(np.asarray(got)[0, -3:] == 0)  # padding queries return zeros


def test_blockwise_matches_dense_bf16():
    q, k, v, q_pos, k_pos = _ragged_case(np.random.default_rng(1))
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    got = attend(q, k, v, q_pos, k_pos, block_k=8, q_chunk=4)
    assert got.dtype == jnp.bfloat16
    _check(got, dense_reference(q, k, v, q_pos, k_pos), 3e-2)


def test_prefill_chunk_with_offset():
    """Queries at positions 100..163 over keys 0..163 (a second prefill chunk)."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 2, 64, 164, 8, 2, 32)
    q_pos = np.broadcast_to(np.arange(100, 164, dtype=np.int32), (2, 64))
    k_pos = np.broadcast_to(np.arange(164, dtype=np.int32), (2, 164))
    want = dense_reference(q, k, v, q_pos, k_pos)
    for block_k, q_chunk in [(48, 16), (32, 64), (None, None)]:
        _check(attend(q, k, v, q_pos, k_pos, block_k=block_k, q_chunk=q_chunk), want, 2e-5)


def test_decode_rows_with_different_context_lengths():
    rng = np.random.default_rng(3)
    b, s = 4, 100
    q, k, v = _qkv(rng, b, 1, s, 4, 1, 16)
    q_pos = np.array([[0], [17], [63], [99]], np.int32)
    k_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    want = dense_reference(q, k, v, q_pos, k_pos)
    for block_k in (16, 30, None):
        _check(attend(q, k, v, q_pos, k_pos, block_k=block_k), want, 2e-5)


def test_skipped_blocks_are_not_read():
    """NaN in V past every query's position: a visited block would poison the output."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 8, 64, 2, 1, 8)
    q_pos = np.broadcast_to(np.arange(20, 28, dtype=np.int32), (2, 8))
    k_pos = np.broadcast_to(np.arange(64, dtype=np.int32), (2, 64))
    want = dense_reference(q, k, v, q_pos, k_pos)
    v[:, 32:] = np.nan  # blocks 2, 3 of 16 keys: no query reaches position 32
    _check(attend(q, k, v, q_pos, k_pos, block_k=16), want, 2e-5)
    # all-padding blocks are skipped too
    k_pos = k_pos.copy()
    k_pos[:, 32:] = -1
    q_pos = q_pos + 40
    _check(attend(q, k, v, q_pos, k_pos, block_k=16),
           dense_reference(q, k, np.nan_to_num(v), q_pos, k_pos), 2e-5)


def _paged_setup(rng, dtype=np.float32):
    """B=2 rows over a shuffled cache of 12 blocks of 4; row 1's table reaches past its context."""
    num_blocks, bs, nkv, d = 12, 4, 2, 16
    cache = kvc.KVCache(k=jnp.asarray(rng.standard_normal((2, num_blocks, bs, nkv, d)), dtype),
                        v=jnp.asarray(rng.standard_normal((2, num_blocks, bs, nkv, d)), dtype))
    tables = np.array([[5, 2, 7, 0, 9], [1, 3, 4, 6, 11]], np.int32)
    return cache, tables


@pytest.mark.parametrize("t,block_k", [(1, None), (1, 4), (6, 12), (6, None)])
def test_attend_over_gathered_blocks_matches_dense(t, block_k):
    """The model's prefill path: rows' blocks gathered (kv_cache.read_layer), then attend."""
    rng = np.random.default_rng(5)
    cache, tables = _paged_setup(rng)
    positions = np.stack([np.arange(13, 13 + t), np.arange(2, 2 + t)]).astype(np.int32)
    positions[1, -1:] = -1 if t > 1 else positions[1, -1:]
    q = rng.standard_normal((2, t, 6, 16)).astype(np.float32)
    batch = kvc.paged_batch(jnp.asarray(positions), jnp.asarray(tables), cache)
    k_all, v_all = kvc.read_layer(cache, 1, batch)
    want = dense_reference(q, k_all, v_all, positions, batch.key_positions)
    got = jax.jit(lambda q: attend(q, k_all, v_all, positions, batch.key_positions,
                                   block_k=block_k, q_chunk=4))(q)
    _check(got, want, 2e-5)


def test_paged_kernel_never_reads_blocks_past_the_context():
    """The decode path (Pallas paged attention, interpret mode): poisoned blocks after each
    row's last position leave the result unchanged."""
    rng = np.random.default_rng(6)
    shape = (1, 12, 16, 2, 16)  # the kernel takes blocks of >= 16 tokens
    cache = kvc.KVCache(k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                        v=jnp.asarray(rng.standard_normal(shape), jnp.float32))
    tables = np.array([[5, 2, 7, 0, 9], [1, 3, 4, 6, 11]], np.int32)
    positions = np.array([[40], [33]], np.int32)  # both rows end in their table's 3rd block
    q = rng.standard_normal((2, 1, 6, 16)).astype(np.float32)
    batch = kvc.paged_batch(jnp.asarray(positions), jnp.asarray(tables), cache)
    want = dense_reference(q, *kvc.read_layer(cache, 0, batch), positions, batch.key_positions)
    poisoned = np.asarray(cache.v).copy()
    poisoned[0, tables[:, 3:]] = np.nan  # table entries 3, 4 of both rows
    got = paged_attention(jnp.asarray(q[:, 0]), cache.k, jnp.asarray(poisoned),
                          jnp.asarray(tables), jnp.asarray(positions[:, 0] + 1), layer=0,
                          implementation="pallas")
    _check(np.asarray(got)[:, None], want, 2e-5)


def test_blockwise_memory_is_far_below_the_dense_score_matrix():
    t, nh, d = 4096, 2, 32
    q = jax.ShapeDtypeStruct((1, t, nh, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(lambda *a: _attend_eager(*a, block_k=512, q_chunk=512)).lower(
        q, kv, kv, pos, pos).compile()
    dense_scores = nh * t * t * 4  # 128 MiB
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("no memory_analysis on this backend")
    assert stats.temp_size_in_bytes < dense_scores / 8, stats.temp_size_in_bytes
