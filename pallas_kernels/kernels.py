"""Pallas entry points behind ``api.quant_matmul`` / ``api.quant_grouped_matmul``.

This module owns everything between the public op and the kernel launch: shape and dtype
validation (anything the kernel cannot run raises ``NotImplementedError`` naming the
constraint), the one-time column permutation of x (plane order, and the WINT2 ``"shuffled"``
K order folded into the same gather), the traced tile table of a grouped call, and the choice of
tuning config. It computes exactly what ``reference.quant_(grouped_)matmul_reference`` computes
(see ``kernel_triton.py`` for the function and its rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import config as config_lib
from .codecs import CODECS, plane_permutation
from .kernel_triton import INT32_OFFSETS_SAFE_LIMIT, LARGE_REFS_OK, grouped_matmul
from .wint2 import shuffled_k_index


def _check(cond: bool, msg: str):
    if not cond:
        raise NotImplementedError(msg)


def _validate(x, w, fmt, k_order, activation, row_scale, cfg) -> tuple[int, int, int]:
    _check(fmt in CODECS, f"{fmt=} is not one of {sorted(CODECS)}")
    codec = CODECS[fmt]
    missing = [leaf for leaf in codec.leaves if leaf not in w]
    _check(not missing, f"{fmt=} weights lack leaves {missing}")
    _check(x.ndim == 2, f"x must be [M, K], got shape {x.shape}")
    _check(x.dtype in (jnp.bfloat16, jnp.float32), f"x.dtype={x.dtype} must be bf16 or f32")
    _check(k_order == "natural" or fmt == "wint2",
           f"{k_order=} only applies to wint2 weights, not {fmt=}")
    _check(k_order in ("natural", "shuffled"), f"{k_order=} must be 'natural' or 'shuffled'")
    _check(activation in (None, "swiglu"), f"{activation=} must be None or 'swiglu'")
    m, k = x.shape
    packed = w[codec.leaves[0]]
    n = packed.shape[-1]
    _check(packed.shape[-2] * codec.planes == k,
           f"x has K={k} but the {fmt} weight {codec.leaves[0]} {packed.shape} implies "
           f"K={packed.shape[-2] * codec.planes}")
    n_out = n // 2 if activation == "swiglu" else n
    _check(activation != "swiglu" or n % 2 == 0, f"swiglu needs an even N, got {n=}")
    bk, bn = cfg.block_k, cfg.block_n
    _check(bk >= codec.min_block_k, f"{fmt} needs block_k >= {codec.min_block_k}, got {bk=}")
    _check(bk // codec.planes >= 16, f"block_k/planes must be >= 16 (MMA depth), got {bk=}")
    _check(k % bk == 0, f"K={k} must be divisible by block_k={bk}")
    _check(n_out % bn == 0, f"N_out={n_out} must be divisible by block_n={bn}")
    _check(row_scale is None or row_scale.shape == (m,),
           f"row_scale must be [M]=({m},), got {None if row_scale is None else row_scale.shape}")
    return m, k, n_out


def _column_order(k: int, bk: int, planes: int, k_order: str) -> np.ndarray:
    perm = plane_permutation(k, bk, planes)
    if k_order == "shuffled":
        # W_shuffled = W_natural[idx] along K, so x @ W_shuffled == x[:, argsort(idx)] @ W_natural.
        perm = np.argsort(shuffled_k_index(k)).astype(np.int32)[perm]
    return perm


def _permute_columns(x: jax.Array, k: int, bk: int, planes: int, k_order: str) -> jax.Array:
    if planes == 1 and k_order == "natural":
        return x
    if k_order == "natural":  # a transpose, cheaper than a gather
        m = x.shape[0]
        return x.reshape(m, k // bk, bk // planes, planes).swapaxes(-1, -2).reshape(m, k)
    return jnp.take(x, jnp.asarray(_column_order(k, bk, planes, k_order)), axis=1)


def tile_table(group_sizes: jax.Array, m: int, bm: int, *, layer=None,
               num_layers: int = 1) -> tuple[jax.Array, ...]:
    """Traced ``(group, block, lo, hi)`` int32 ``[ceil(M/bm) + min(E, M)]`` for rows sorted by
    group.

    With ``layer`` (of ``num_layers`` stacked layers whose experts are folded into one group
    axis, ``kernels._weights``) group ``g`` becomes ``layer * E + g`` and padding tiles point
    past the last layer's groups.

    Tile t covers rows ``[lo, hi)`` of group ``group`` inside the aligned row block ``block``
    (rows ``block*bm .. block*bm + bm``). Rows past ``sum(group_sizes)`` form group ``E``
    (written as zeros). Unused trailing tiles have ``lo == hi == 0``. Bound: each of the at most
    ``min(E + 1, M)`` non-empty groups (padding included) adds at most one tile to the
    ``ceil(M/bm)`` row blocks beyond the first group's; at one token (M = 8 rows of 64 experts)
    that is 9 tiles, not 65 (each tile is a column of programs, and empty ones still launch).
    """
    e = group_sizes.shape[0]
    starts, ends = _group_bounds(group_sizes, m)
    sizes = ends - starts
    first, last = starts // bm, (ends - 1) // bm
    ntiles = jnp.where(sizes > 0, last - first + 1, 0)
    tile_end = jnp.cumsum(ntiles)
    tile_begin = tile_end - ntiles
    t = jnp.arange(pl_cdiv(m, bm) + min(e, m), dtype=jnp.int32)
    grp, valid = _tile_groups(tile_end, t, e)
    blk = first[grp] + t - tile_begin[grp]
    lo = jnp.maximum(starts[grp], blk * bm)
    hi = jnp.minimum(ends[grp], blk * bm + bm)
    zero = jnp.zeros_like(t)
    grp = _fold_layer(jnp.where(valid, grp, zero), e, layer, num_layers)
    return grp, jnp.where(valid, blk, zero), jnp.where(valid, lo, zero), jnp.where(valid, hi, zero)


def _group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """``(starts, ends)`` int32 ``[E+1]`` of each group's sorted rows, clipped to ``m``; group E
    holds the rows past ``sum(group_sizes)`` (padding)."""
    sizes = group_sizes.astype(jnp.int32)
    sizes = jnp.concatenate([sizes, jnp.maximum(m - sizes.sum(), 0)[None]])
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends


def _tile_groups(tile_end: jax.Array, t: jax.Array, e: int) -> tuple[jax.Array, jax.Array]:
    """Group of each tile ``t`` (the number of groups whose tiles end at or before it; at most
    ``e``) and whether ``t`` is a tile at all. A dense compare (one small fusion) rather than
    ``jnp.searchsorted``, whose while loop costs ~0.3 ms on a GPU."""
    grp = jnp.minimum((tile_end[None, :] <= t[:, None]).sum(axis=1), e).astype(jnp.int32)
    return grp, t < tile_end[-1]


def _fold_layer(grp: jax.Array, e: int, layer, num_layers: int) -> jax.Array:
    """Group ids of layer ``layer`` in the folded ``[L*E]`` group axis; padding past them all."""
    if layer is None:
        return grp
    return jnp.where(grp < e, grp + jnp.asarray(layer, jnp.int32) * e, num_layers * e)


def expert_tiles(group_sizes: jax.Array, m: int, bm: int, *, layer=None,
                 num_layers: int = 1) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Tiles that start at their group's first row: ``(group, row0, hi)``, ``src``.

    :func:`tile_table` cuts the sorted rows at fixed ``bm``-row boundaries, so a group of ``r``
    rows straddling one costs two tiles, and every tile decodes its group's whole weight
    matrix: at 8-64 rows an expert most groups straddle one (300B at 256 tokens, 64-row tiles:
    94 tiles for 64 experts). Here every group's rows start a new tile: ``ceil(r / bm)`` tiles a
    group (64 at 256 tokens). The rows are laid out again for it: padded row ``p`` of block ``t``
    (``t * bm <= p < t * bm + bm``) holds sorted row ``src[p]``, so tile ``t`` reads x block
    ``t`` and writes sorted rows ``[row0, hi)`` of the output (the block's rows past ``hi``
    repeat others and are not stored): unlike :func:`tile_table`, no block index or ``lo``.

    Returns int32 ``[T]`` each, ``T = m // bm + min(E + 1, m)`` (a bound on the tiles: each
    non-empty group, the padding group included, adds at most one partial tile), and ``src``
    int32 ``[T * bm]``. Rows past ``sum(group_sizes)`` form group ``E`` (written as zeros);
    unused trailing tiles have ``row0 == hi``. ``layer``: as :func:`tile_table`.
    """
    e = group_sizes.shape[0]
    starts, ends = _group_bounds(group_sizes, m)
    ntiles = (ends - starts + bm - 1) // bm
    tile_end = jnp.cumsum(ntiles)
    t = jnp.arange(m // bm + min(e + 1, m), dtype=jnp.int32)
    grp, valid = _tile_groups(tile_end, t, e)
    row0 = starts[grp] + (t - (tile_end - ntiles)[grp]) * bm
    hi = jnp.minimum(ends[grp], row0 + bm)
    zero = jnp.zeros_like(t)
    row0, hi, grp = (jnp.where(valid, a, zero) for a in (row0, hi, grp))
    src = jnp.minimum(row0[:, None] + jnp.arange(bm, dtype=jnp.int32), m - 1).reshape(-1)
    return (_fold_layer(grp, e, layer, num_layers), row0, hi), src


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _weights(w: dict, fmt: str, grouped: bool, stacked: bool) -> tuple[jax.Array, ...]:
    """The kernel's ``[G, ...]`` operands: experts (and stacked layers) folded into ``G``.

    Folding leading axes is a free reshape of a contiguous buffer, so a layer stack reaches the
    kernel by reference; the kernel picks the layer through the group ids of its tile table.
    """
    leaves = tuple(w[leaf] for leaf in CODECS[fmt].leaves)
    if grouped and stacked:
        return tuple(a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]) for a in leaves)
    return leaves if grouped or stacked else tuple(a[None] for a in leaves)


def _run(x, w, group_sizes, *, interpret, fmt, k_order="natural", activation=None,
         row_scale=None, out_dtype=None, config=None, layer=None):
    grouped = group_sizes is not None
    stacked = layer is not None
    codec = CODECS.get(fmt)
    _check(codec is not None, f"{fmt=} is not one of {sorted(CODECS)}")
    packed = w.get(codec.leaves[0])
    want = ("[L, " if stacked else "[") + ("E, K, N]" if grouped else "K, N]")
    _check(packed is not None and packed.ndim == (3 if grouped else 2) + stacked,
           f"{'grouped' if grouped else 'dense'} {fmt} weights must be {want}-shaped")
    e = packed.shape[-3] if grouped else 1
    num_layers = packed.shape[0] if stacked else 1
    m = x.shape[0]
    n = packed.shape[-1]
    n_out = n // 2 if activation == "swiglu" else n
    cfg = config or config_lib.get_config(fmt, m, x.shape[-1], n_out, activation=activation,
                                          num_groups=e)
    m, k, n_out = _validate(x, w, fmt, k_order, activation, row_scale, cfg)
    _check(cfg.mode != "mma_gs" or fmt == "wint2", f"mode='mma_gs' is for wint2, not {fmt=}")
    _check((k // cfg.block_k) % cfg.split_k == 0,
           f"K/block_k = {k // cfg.block_k} K blocks must divide into split_k={cfg.split_k}")
    if grouped:
        _check(group_sizes.shape == (e,), f"group_sizes must be [E]=({e},), got "
               f"{group_sizes.shape}")
    else:
        group_sizes = jnp.full((1,), m, jnp.int32)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    planes = 1 if cfg.mode == "mma_merged" else CODECS[fmt].planes  # x order the kernel reads
    xp = _permute_columns(x, k, cfg.block_k, planes, k_order)
    tiles = tile_table(group_sizes, m, cfg.block_m, layer=layer, num_layers=num_layers)
    rs = None if row_scale is None else row_scale.astype(jnp.float32)
    operands = _weights(w, fmt, grouped, stacked)
    if not interpret and not LARGE_REFS_OK:
        big = [a.shape for a in operands
               if a.dtype.itemsize < 4 and a.size >= INT32_OFFSETS_SAFE_LIMIT]
        _check(not big, f"operands {big} have >= 2**31 elements, which this jax's Pallas Triton "
               "lowering addresses with 32-bit offsets")
    return grouped_matmul(xp, operands, tiles, rs, fmt=fmt,
                          activation=activation, out_dtype=out_dtype, cfg=cfg,
                          interpret=interpret)


def quant_matmul(x, w, *, interpret: bool, config: config_lib.TuningConfig | None = None, **kw):
    """Dense ``epilogue(x @ W)``; see ``api.quant_matmul`` for the arguments."""
    return _run(x, w, None, interpret=interpret, config=config, **kw)


def quant_grouped_matmul(x, w, group_sizes, *, interpret: bool,
                         config: config_lib.TuningConfig | None = None, **kw):
    """Grouped ``epilogue(x[rows of e] @ W[e])``; see ``api.quant_grouped_matmul``."""
    return _run(x, w, group_sizes, interpret=interpret, config=config, **kw)
