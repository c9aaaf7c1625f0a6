"""Grouped-query self-attention with interleaved-pair RoPE, with or without the paged KV cache.

Owns the attention sub-block of a decoder layer: the fused ``qkv`` projection (columns
``[Q | K | V]``), RoPE, the blockwise fp32 softmax and the ``o`` projection. All paths share one
masking rule, "key position ``<=`` query position, and the key exists (position ``>= 0``)":

* no cache (``model(token_ids)``): keys are this call's own tokens (:func:`attend`);
* paged cache, several tokens per row (prefill chunks): new K/V are written to their slots
  first, then each row's blocks are gathered (:func:`jaxwint2.kv_cache.read_layer`) and
  :func:`attend` runs over them. Gathering first matters: inside ``attend``'s key-block loop (an
  XLA while loop) the whole cache would be loop state, which XLA copies (2 x 14 GB at 300B);
* paged cache, one token per row (decode): the Pallas paged-attention kernel
  (:func:`pallas_kernels.paged_attention`) reads the cache blocks in place, when the weights'
  ``kernels`` setting says Pallas (``"auto"`` on a GPU); otherwise the gather path above.

The softmax of :func:`attend` is flash-attention style in plain ``jnp``/``lax`` (runs on CPU and
GPU): queries are split into chunks of ``q_chunk`` rows, keys into blocks of ``block_k``; each
step computes one ``[B, n_kv, g, q_chunk, block_k]`` fp32 score block and folds it into a running
max, running sum and rescaled fp32 accumulator. Peak memory is one score block (sized by
:data:`SCORE_BLOCK_BYTES`) instead of the whole ``[B, heads, T, S]`` matrix. A key block that no
query of the chunk can see (every key padding, or after the chunk's last query position) is not
visited: the loop runs over the list of needed blocks with a dynamic trip count. Problems whose
whole score matrix fits in one block (decode, small prefill) run as a single step with no loop.

It knows nothing of how blocks are allocated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import paged_attention

from . import kv_cache as kvc
from .config import ErnieConfig
from .formats import WeightFormat
from .layers import Linear, _precision, apply_rope

_MASKED = -1e30  # finite: a fully masked (padding) query row stays NaN-free

# fp32 bytes of one step's score block [B, heads, q_chunk, block_k]. The step's other temporaries
# (exp'd scores, probabilities in v.dtype) add about 1.5x this. 300B, B=1, 64 heads: q_chunk 2048
# x block_k 512, so an 8K prefill takes 4 query chunks and visits 4 + 8 + 12 + 16 key blocks.
SCORE_BLOCK_BYTES = 256 << 20
# Keys per block when the score matrix does not fit in one step. 512 keeps the per-step matmuls
# large (M = g * q_chunk, N = 512, K = head_dim) while causal skipping stays fine-grained.
BLOCK_K = 512

def _floor_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _plan(b: int, nh: int, t: int, s: int, block_k: int | None,
          q_chunk: int | None) -> tuple[int, int]:
    """``(q_chunk, block_k)`` for ``T=t`` queries over ``S=s`` keys."""
    elems = max(SCORE_BLOCK_BYTES // 4 // (b * nh), 1)  # q_chunk * block_k that fit one step
    if block_k is None and q_chunk is None and t * s <= elems:
        tc, bk = t, s  # one step: decode, or a prefill small enough to score densely
    else:
        if q_chunk is None:
            q_chunk = _floor_pow2(max(elems // (block_k or BLOCK_K), 1))
        tc = min(t, q_chunk)
        if block_k is None:  # few queries (decode of a big batch): larger key blocks
            block_k = max(BLOCK_K, _floor_pow2(elems // tc))
        bk = min(block_k, s)
    return tc, bk


def _attend_blocks(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                   k_pos: jax.Array, *, block_k: int, q_chunk: int,
                   skip: bool | None) -> jax.Array:
    """Online-softmax GQA attention of ``q [B, T, nh, d]`` over ``k, v [B, S, n_kv, d]``.

    ``S`` is a multiple of ``block_k``; ``k_pos [B, S]`` are the keys' positions (``-1`` = no
    key). ``skip``: loop only over the blocks some query of the chunk can see, with a
    dynamic trip count (on XLA-GPU a device-to-host sync per step, small next to a step of
    ``SCORE_BLOCK_BYTES``); ``None`` = whenever there is more than one block.
    """
    b, t, nh, d = q.shape
    n_kv = k.shape[2]
    g = nh // n_kv
    n_blocks = k_pos.shape[1] // block_k
    skip = n_blocks > 1 if skip is None else skip
    prec = _precision(q.dtype)
    scale = d ** -0.5

    # Queries in chunks: pad T to a multiple of q_chunk with position -1 (sees nothing).
    n_chunks = -(-t // q_chunk)
    if pad := n_chunks * q_chunk - t:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    k_blocks = k_pos.reshape(b, n_blocks, block_k)

    def chunk(qc: jax.Array, qp: jax.Array) -> jax.Array:
        """``qc [B, Tc, n_kv, g, d]``, ``qp [B, Tc]`` -> ``[B, n_kv, g, Tc, d]`` in ``q.dtype``."""

        def step(j, carry):
            m, den, acc = carry  # [B, n_kv, g, Tc] x2, [B, n_kv, g, Tc, d], all fp32
            kb = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=1)  # [B, bk, ..]
            vb = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=1)
            kp = jax.lax.dynamic_slice_in_dim(k_pos, j * block_k, block_k, axis=1)  # [B, bk]
            s = jnp.einsum("btkgd,bskd->bkgts", qc, kb, preferred_element_type=jnp.float32,
                           precision=prec) * scale  # [B, n_kv, g, Tc, bk]
            visible = (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] >= 0)  # [B, Tc, bk]
            s = jnp.where(visible[:, None, None], s, _MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1))
            alpha = jnp.exp(m - m_new)  # 0 once a row sees its first key: drops masked terms
            p = jnp.exp(s - m_new[..., None])
            den = alpha * den + p.sum(axis=-1)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vb,
                            preferred_element_type=jnp.float32, precision=prec)
            return m_new, den, alpha[..., None] * acc + pv

        tc = qc.shape[1]
        init = (jnp.full((b, n_kv, g, tc), _MASKED, jnp.float32),
                jnp.zeros((b, n_kv, g, tc), jnp.float32),
                jnp.zeros((b, n_kv, g, tc, d), jnp.float32))
        if n_blocks == 1:
            m, den, acc = step(jnp.int32(0), init)
        elif skip:
            # Block j is needed iff some row has a key there that one of its queries can see.
            last = qp.max(axis=1)  # [B]
            needed = ((k_blocks >= 0) & (k_blocks <= last[:, None, None])).any(axis=(0, 2))
            order = jnp.nonzero(needed, size=n_blocks, fill_value=0)[0].astype(jnp.int32)
            m, den, acc = jax.lax.fori_loop(0, needed.sum(dtype=jnp.int32),
                                          lambda i, c: step(order[i], c), init)
        else:
            m, den, acc = jax.lax.fori_loop(0, n_blocks, step, init)
        # den >= 1 wherever m is a real score; a query that saw no key at all returns 0.
        out = jnp.where((m > _MASKED / 2)[..., None], acc / den[..., None], 0.0)
        return out.astype(q.dtype)

    q = q.reshape(b, n_chunks, q_chunk, n_kv, g, d)
    q_pos = q_pos.reshape(b, n_chunks, q_chunk)
    if n_chunks == 1:
        out = chunk(q[:, 0], q_pos[:, 0])[None]
    else:  # a scan: one chunk's score block live at a time
        out = jax.lax.map(lambda xs: chunk(*xs), (jnp.moveaxis(q, 1, 0), jnp.moveaxis(q_pos, 1, 0)))
    # [n_chunks, B, n_kv, g, Tc, d] -> [B, T, nh, d]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, n_chunks * q_chunk, nh, d)
    return out[:, :t]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
           block_k: int | None = None, q_chunk: int | None = None,
           skip: bool | None = None) -> jax.Array:
    """Causal GQA attention, softmax in fp32, blockwise over keys (flash-attention style).

    Args:
      q: ``[B, T, n_heads, d]``; query head ``j`` reads kv head ``j // (n_heads / n_kv)``.
      k, v: ``[B, S, n_kv, d]``.
      q_pos: int ``[B, T]`` absolute query positions; ``-1`` = padding query.
      k_pos: int ``[B, S]`` absolute key positions; ``-1`` = no key there.
      block_k, q_chunk: keys per block and queries per chunk; ``None`` = sized by
        :data:`SCORE_BLOCK_BYTES` (a single step when the whole score matrix fits).
      skip: visit only the key blocks some query can see (see :func:`_attend_blocks`).

    Key ``s`` is visible to query ``t`` iff ``0 <= k_pos[s] <= q_pos[t]``. A query that sees no
    key (padding) returns zeros.

    Returns:
      ``[B, T, n_heads, d]`` in ``q.dtype``.
    """
    b, t, nh, _ = q.shape
    s = k.shape[1]
    tc, bk = _plan(b, nh, t, s, block_k, q_chunk)
    if pad := _round_up(s, bk) - s:  # whole blocks: pad with keys that do not exist
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=-1)

    return _attend_blocks(q, k, v, q_pos, k_pos, block_k=bk, q_chunk=tc, skip=skip)


class Attention(nnx.Module):
    """The attention sub-block: ``o(attend(rope(q), rope(k), v))``.

    Example:
      >>> attn = Attention(cfg, params["layers"][0]["attn"], WeightFormat("wint8"))
      >>> y, _ = attn(x, positions)                       # full causal forward, no cache
      >>> y, cache = attn(x, positions, kv=(cache, layer_index, batch))  # paged cache
    """

    def __init__(self, cfg: ErnieConfig, params: Mapping[str, Mapping[str, jax.Array]],
                 fmt: WeightFormat, *, axis_name: str | None = None):
        self.qkv = Linear(params["qkv"], fmt)
        self.o = Linear(params["o"], fmt)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.axis_name = axis_name

    def __call__(self, x: jax.Array, positions: jax.Array,
                 kv: tuple[kvc.KVCache, jax.Array, kvc.PagedBatch] | None = None
                 ) -> tuple[jax.Array, kvc.KVCache | None]:
        """``x [B, T, H]`` at ``positions [B, T]`` -> ``([B, T, H], updated cache or None)``.

        Under tensor parallelism (``axis_name`` set) this rank holds a slice of the heads and
        the ``o`` output is summed over the axis.
        """
        b, t, _ = x.shape
        d = self.head_dim
        qkv = self.qkv(x)  # [B, T, (nh_local + 2 nkv_local) d]
        # Heads held here: all of them, or this rank's share of a head-sharded qkv.
        n_kv = qkv.shape[-1] // d // (self.num_heads // self.num_kv_heads + 2)
        n_q = qkv.shape[-1] // d - 2 * n_kv
        q = qkv[..., : n_q * d].reshape(b, t, n_q, d)
        k = qkv[..., n_q * d: (n_q + n_kv) * d].reshape(b, t, n_kv, d)
        v = qkv[..., (n_q + n_kv) * d:].reshape(b, t, n_kv, d)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)

        if kv is None:
            out = attend(q, k, v, positions, positions)
            cache = None
        else:
            cache, layer, batch = kv
            cache = kvc.write_layer(cache, layer, k, v, batch)
            impl = self.qkv.fmt.implementation_for_input(q)
            if t == 1 and (impl == "pallas" or (impl is None and jax.default_backend() == "gpu")):
                # Decode: the Pallas paged-attention kernel reads the cache blocks in place.
                lengths = jnp.maximum(positions[:, 0] + 1, 0)
                out = paged_attention(q[:, 0], *kvc.values(cache), batch.block_tables, lengths,
                                      layer=layer, implementation=impl)[:, None]
            else:
                # Gather the rows' blocks first: inside attend's key-block loop (an XLA while
                # loop) the whole cache would be loop state, which XLA copies (2 x 14 GB at 300B).
                k_all, v_all = kvc.read_layer(cache, layer, batch)
                out = attend(q, k_all, v_all, positions, batch.key_positions)

        if self.axis_name is None:
            return self.o(out.reshape(b, t, n_q * d)), cache
        # Row-parallel o: each rank's fp32 partial sum is reduced, then rounded once, like the
        # single-device matmul's fp32 accumulator (a bf16 reduction would round tp + 1 times).
        y = self.o(out.reshape(b, t, n_q * d), out_dtype=jnp.float32)
        return jax.lax.psum(y, self.axis_name).astype(x.dtype), cache
