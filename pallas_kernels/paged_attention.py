"""Decode attention over the paged KV cache: one query token per row, keys read block by block.

``paged_attention(q, k_cache, v_cache, block_tables, lengths)`` computes, for each row ``b`` and
query head ``j`` (reading kv head ``j // (n_heads / n_kv)``)::

    out[b, j] = softmax(q[b, j] . K_b^T * d^-0.5) V_b      over the first lengths[b] keys

where key ``i`` of row ``b`` lives in block ``block_tables[b, i // bs]`` at offset ``i % bs``
(``jaxwint2.kv_cache``'s layout ``[L, num_blocks, bs, n_kv, d]``, optionally indexed by
``layer``). A row with ``lengths[b] == 0`` gets zeros. Softmax statistics are fp32; the
probabilities meet ``V`` in its dtype (bf16), as in ``jaxwint2.attention``.

The Pallas kernel (Triton lowering, as ``kernel_triton.py``; it runs under ``interpret=True`` on a
CPU) reads every needed key block straight from the cache, so nothing of size
``[B, context, n_kv, d]`` is ever written: the XLA path gathers each row's blocks into such a copy
and transposes it for the batched matmuls (measured on an H100, ERNIE-4.5-21B at batch 64 and 2K
context: 5.0 of 18.3 ms per decode step in that gather/transpose alone). Grid ``(B, n_kv,
splits)``: the ``g`` query heads sharing a kv head form one MMA tile (padded to 16 rows); with
``splits > 1`` each program covers a contiguous share of the row's blocks and the partial
(max, sum, accumulator) triples are merged in jnp (flash-decoding), which keeps the GPU busy when
``B * n_kv`` is small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MASKED = -1e30
_ROWS = 16  # the MMA's minimum M: the g query heads of one kv head, zero-padded


def paged_attention_reference(q, k_cache, v_cache, block_tables, lengths, *, layer=None):
    """Pure-jnp twin: gather each row's blocks, masked fp32 softmax (see module docstring)."""
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    b, nh, d = q.shape
    _, bs, nkv, _ = k_cache.shape
    k = k_cache[block_tables].reshape(b, -1, nkv, d)  # [B, S, nkv, d]
    v = v_cache[block_tables].reshape(b, -1, nkv, d)
    qg = q.reshape(b, nkv, nh // nkv, d)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(visible[:, None, None], s, _MASKED)
    m = s.max(-1, keepdims=True)
    p = jnp.where(visible[:, None, None], jnp.exp(s - m), 0.0)
    l_sum = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.maximum(l_sum, 1e-30)
    return out.reshape(b, nh, d).astype(q.dtype)


def _kernel(tables_ref, lengths_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
            group: int, block_size: int, blocks_per_split: int, table_len: int, num_blocks: int,
            scale: float):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d = q_ref.shape[-1]
    rows = jnp.arange(_ROWS, dtype=jnp.int32)
    q = plgpu.load(q_ref.at[b, pl.ds(h * group, _ROWS), :], mask=(rows < group)[:, None],
                   other=0.0)  # [16, d]
    length = lengths_ref[b]
    first = s * blocks_per_split
    last = jnp.minimum(jnp.minimum(first + blocks_per_split, table_len),
                       (length + block_size - 1) // block_size)
    base = layer_ref[0] * num_blocks
    offs = jnp.arange(block_size, dtype=jnp.int32)
    # fp32 inputs get fp32 dots (Triton would use TF32); bf16 the tensor cores' bf16 MMA.
    precision = (jax.lax.DotAlgorithmPreset.F32_F32_F32 if q_ref.dtype == jnp.float32
                 else None)

    def body(j, carry):
        m, l_sum, acc = carry
        blk = base + tables_ref[b, j]
        k = k_ref[blk, :, h, :]  # [bs, d]
        v = v_ref[blk, :, h, :]
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * scale  # [16, bs]
        visible = (j * block_size + offs < length)[None, :]
        sc = jnp.where(visible, sc, _MASKED)
        m_new = jnp.maximum(m, sc.max(axis=1))
        p = jnp.where(visible, jnp.exp(sc - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l_sum = l_sum * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, precision=precision,
                                             preferred_element_type=jnp.float32)
        return m_new, l_sum, acc

    init = (jnp.full((_ROWS,), _MASKED, jnp.float32), jnp.zeros((_ROWS,), jnp.float32),
            jnp.zeros((_ROWS, d), jnp.float32))
    m, l_sum, acc = jax.lax.fori_loop(first, jnp.maximum(last, first), body, init)
    acc_ref[s, b, h] = acc
    m_ref[s, b, h] = m
    l_ref[s, b, h] = l_sum


@functools.partial(jax.jit, static_argnames=("splits", "num_warps", "interpret"))
def _paged_attention_pallas(q, k_cache, v_cache, block_tables, lengths, layer, *, splits: int,
                            num_warps: int, interpret: bool):
    b, nh, d = q.shape
    num_layers, nb, bs, nkv, _ = k_cache.shape
    group = nh // nkv
    p = block_tables.shape[1]
    per = -(-p // splits)
    # [L, NB, ...] -> [L*NB, ...]: a free reshape; the kernel adds layer * NB to block ids.
    kf = k_cache.reshape(num_layers * nb, bs, nkv, d)
    vf = v_cache.reshape(num_layers * nb, bs, nkv, d)
    kernel = functools.partial(_kernel, group=group, block_size=bs, blocks_per_split=per,
                               table_len=p, num_blocks=nb, scale=d**-0.5)
    f32 = jnp.float32
    acc, m, l_sum = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((splits, b, nkv, _ROWS, d), f32),
                   jax.ShapeDtypeStruct((splits, b, nkv, _ROWS), f32),
                   jax.ShapeDtypeStruct((splits, b, nkv, _ROWS), f32)),
        grid=(b, nkv, splits),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="paged_attention",
    )(block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
      jnp.reshape(layer, (1,)).astype(jnp.int32), q, kf, vf)
    # Merge the splits (flash-decoding): rescale each partial to the global max.
    m_all = m.max(axis=0)  # [b, nkv, 16]
    w = jnp.exp(m - m_all[None])  # empty splits: exp(-1e30 - m) = 0, or 1 with l = acc = 0
    num = (acc * w[..., None]).sum(axis=0)
    den = (l_sum * w).sum(axis=0)
    out = num / jnp.maximum(den, 1e-30)[..., None]  # no visible key: 0 / tiny = 0
    return out[:, :, :group].reshape(b, nh, d).astype(q.dtype)


def _splits_for(b: int, nkv: int, p: int) -> int:
    """Enough programs for ~2 waves on a 132-SM GPU, each split >= 4 blocks."""
    want = max(1, -(-264 // (b * nkv)))
    return max(1, min(want, p // 4 or 1, 16))


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    layer: jax.Array | int | None = None, splits: int | None = None,
                    implementation: str | None = None) -> jax.Array:
    """Decode attention of ``q [B, n_heads, d]`` over the paged cache -> ``[B, n_heads, d]``.

    Args:
      q: one query token per row.
      k_cache, v_cache: ``[num_blocks, bs, n_kv, d]``, or ``[L, num_blocks, bs, n_kv, d]`` with
        ``layer`` (read in place: the kernel takes the whole stack).
      block_tables: int32 ``[B, P]`` physical block of each row's ``i``-th key block.
      lengths: int32 ``[B]`` keys visible to each row (its query position + 1; 0 = none).
      splits: key-range splits per (row, kv head); ``None`` picks one from the shapes.
      implementation: ``"pallas"`` (interpret mode on a CPU), ``"xla"`` (the jnp reference) or
        ``None`` (Pallas on a GPU, the reference elsewhere).

    Raises:
      NotImplementedError: shapes the kernel does not take (``n_heads / n_kv > 16``, block size
        or head dim below 16 or not a power of two), when ``implementation="pallas"``.
    """
    if implementation not in ("pallas", "xla", None):
        raise ValueError(f"implementation must be 'pallas', 'xla' or None, got {implementation!r}")
    if k_cache.ndim == 4:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    elif layer is None:
        raise ValueError(f"a [L, ...] cache {k_cache.shape} needs layer=")
    on_gpu = jax.default_backend() == "gpu"
    if implementation == "xla" or (implementation is None and not on_gpu):
        return paged_attention_reference(q, k_cache, v_cache, block_tables, lengths, layer=layer)
    b, nh, d = q.shape
    _, _, bs, nkv, _ = k_cache.shape
    problems = [msg for bad, msg in (
        (nh % nkv or nh // nkv > _ROWS, f"n_heads/n_kv = {nh}/{nkv} must be an integer <= 16"),
        (bs < 16 or bs & (bs - 1), f"block size {bs} must be a power of two >= 16"),
        (d < 16 or d & (d - 1), f"head dim {d} must be a power of two >= 16")) if bad]
    if problems:
        if implementation == "pallas":
            raise NotImplementedError("; ".join(problems))
        return paged_attention_reference(q, k_cache, v_cache, block_tables, lengths, layer=layer)
    splits = splits or _splits_for(b, nkv, block_tables.shape[1])
    return _paged_attention_pallas(q, k_cache, v_cache, block_tables, lengths,
                                   jnp.asarray(layer, jnp.int32), splits=splits,
                                   num_warps=4, interpret=not on_gpu)
