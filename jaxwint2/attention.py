"""Grouped-query self-attention with interleaved-pair RoPE, with or without the paged KV cache.

Owns the attention sub-block of a decoder layer: the fused ``qkv`` projection (columns
``[Q | K | V]``), RoPE, the masked fp32 softmax and the ``o`` projection. Two paths share one
masking rule, "key position ``<=`` query position, and the key exists":

* no cache (``model(token_ids)``): keys are this call's own tokens;
* paged cache (``model.step``): new K/V are written to their slots first, then each row gathers
  all its blocks (:mod:`jaxwint2.kv_cache`) and attends to every position up to its own.

It knows nothing of how blocks are allocated, and has no kernel of its own: the softmax is plain
XLA, kept simple so that a Pallas decode-attention kernel can replace :func:`attend` later.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from . import kv_cache as kvc
from .config import ErnieConfig
from .formats import WeightFormat
from .layers import Linear, _precision, apply_rope

_MASKED = -1e30  # finite: a fully masked (padding) query row stays NaN-free


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
           k_pos: jax.Array) -> jax.Array:
    """Causal GQA attention, softmax in fp32.

    Args:
      q: ``[B, T, n_heads, d]``; query head ``j`` reads kv head ``j // (n_heads / n_kv)``.
      k, v: ``[B, S, n_kv, d]``.
      q_pos: int ``[B, T]`` absolute query positions.
      k_pos: int ``[B, S]`` absolute key positions; ``-1`` = no key there.

    Returns:
      ``[B, T, n_heads, d]`` in ``q.dtype``.
    """
    b, t, nh, d = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, t, nkv, nh // nkv, d)
    prec = _precision(q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32,
                        precision=prec) * (d ** -0.5)  # [B, n_kv, g, T, S]
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32,
                     precision=prec)
    return out.reshape(b, t, nh, d).astype(q.dtype)


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
            k_all, v_all = kvc.read_layer(cache, layer, batch)
            out = attend(q, k_all, v_all, positions, batch.key_positions)

        if self.axis_name is None:
            return self.o(out.reshape(b, t, n_q * d)), cache
        # Row-parallel o: each rank's fp32 partial sum is reduced, then rounded once, like the
        # single-device matmul's fp32 accumulator (a bf16 reduction would round tp + 1 times).
        y = self.o(out.reshape(b, t, n_q * d), out_dtype=jnp.float32)
        return jax.lax.psum(y, self.axis_name).astype(x.dtype), cache
