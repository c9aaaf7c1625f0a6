"""The Mosaic WINT2 kernel's operands, from x and the group sizes, in one small Triton kernel.

Before each grouped projection, ``kernel_mosaic.grouped_matmul`` needs:

- the tile table ``(group, row0, hi)`` (``kernels.expert_tiles``: every expert starts a tile);
- x's rows gathered into their tiles' blocks, columns in plane order (``bk = 256``, 4 planes,
  with the checkpoint's ``"shuffled"`` K order undone in the same gather);
- on the mma.sync path, each row's weighted sums over every 64-row scale group
  (``kernel_mosaic.group_sums``);
- with fp16 planes, x scaled per row by a power of two into fp16's range, the x8 planes'
  columns by 1/8, rounded to fp16 (``fp16_row_scales``, ``fp16_plane_columns``), and the
  inverse row scales for the epilogue.

Composed from jnp ops (:func:`expert_operands_reference`), XLA runs this as ~11 small kernels
before the up_gate projection and ~5 before the down: at one token (300B, H100) about 35 of the
expert FFN's 149 µs, and ~460 µs of its ~4 ms at 1024 tokens (ncu, ``results/NOTES.md`` §48).
:func:`expert_operands` computes the same arrays in one launch: program ``p`` owns padded row
``p`` of tile ``p // bm``; it rebuilds the (tiny) tile table from the group sizes (two
cumulative sums over the experts), writes its tile's entry if it is the tile's first row,
reads its source row and writes the row's operands. The table's arithmetic is
``expert_tiles``'s; on the rows the matmul stores, the x values are bit-identical to the jnp
composition and the group sums equal it up to fp32 summation order.

Triton (Pallas's Triton backend) rather than Mosaic GPU: the work is gathers, a row reduction
and a handful of reshapes, which Triton lowers directly; Mosaic GPU's layout inference would
need each of them spelled out in warpgroup layouts, for a kernel that moves a few hundred KB.
CI runs the kernel in interpret mode on a CPU against the jnp composition.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import kernel_mosaic as km
from . import reference
from .kernels import _column_order, _permute_columns, expert_tiles
from .wint2 import GROUP_SIZE

# The largest power-of-two piece of a row handled at once, and warps a program (NOTES §48's A/B)
_CHUNK, _NUM_WARPS = 1024, 4


class ExpertOperands(NamedTuple):
    """What ``kernel_mosaic.grouped_matmul`` takes besides the weights."""
    tiles: tuple[jax.Array, jax.Array, jax.Array]  # (group, row0, hi) int32 [T]
    # Rows [T * bm, K] bf16 (fp16 with fp16 planes), plane order, and [T * bm, K / 64] fp32
    # group sums (mma.sync only). Row i of tile t holds sorted row row0 + i where row0 + i < hi;
    # the tile's other rows are never stored by the kernel: left unwritten by the Triton
    # launch, copies of other rows in the reference.
    x_planes: jax.Array
    sums: jax.Array | None
    row_inv: jax.Array | None  # [M] fp32 inverse row scales (fp16 planes only)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_tiles(m: int, bm: int, e: int) -> int:
    return m // bm + min(e + 1, m)  # expert_tiles' bound


def swiglu_rows(partials):
    """The bf16 rows that a SwiGLU projection split over K hands the next one: its fp32 partial
    sums ``[S, M, 2N]`` (gate | up) added, ``silu(gate) * up`` in fp32, rounded to bf16."""
    return reference.apply_epilogue(partials.sum(0), "swiglu", None).astype(jnp.bfloat16)


def expert_operands_reference(x, group_sizes, *, bm: int, sums: bool, fp16: bool,
                              k_order: str = "natural", layer=None, num_layers: int = 1,
                              swiglu_partials: bool = False) -> ExpertOperands:
    """The jnp composition that :func:`expert_operands` fuses (the spec for its tests)."""
    if swiglu_partials:
        x = swiglu_rows(x)
    m, k = x.shape
    tiles, src = expert_tiles(group_sizes, m, bm, layer=layer, num_layers=num_layers)
    row_inv = None
    if fp16:
        scale, row_inv = km.fp16_row_scales(x)
        x = x.astype(jnp.float32) * scale[:, None]
    xp = jnp.take(_permute_columns(x, k, km.BLOCK_K, 4, k_order), src, axis=0)
    if fp16:
        xp = km.fp16_plane_columns(xp)
    offsets = km.FP16_PLANE_OFFSETS if fp16 else km.BF16_PLANE_OFFSETS
    return ExpertOperands(tiles, xp, km.group_sums(xp, offsets) if sums else None, row_inv)


def _tile_of(gs_ref, t, *, m: int, e: int, bm: int):
    """``expert_tiles``' ``(group, row0, hi)`` of tile ``t`` (before the layer fold), from
    the group sizes. Vectors run over the ``E`` experts (padded to a power of two, as Triton
    needs); the padding group ``E`` (rows past the sizes' sum) is handled as scalars."""
    e2 = _next_pow2(e)
    idx = jnp.arange(e2, dtype=jnp.int32)
    real = idx < e
    sizes = jnp.where(real, gs_ref[jnp.minimum(idx, e - 1)].astype(jnp.int32), 0)
    incl = jnp.cumsum(sizes)
    starts, ends = jnp.minimum(incl - sizes, m), jnp.minimum(incl, m)
    ntiles = (ends - starts + bm - 1) // bm
    tile_end = jnp.cumsum(ntiles)
    total, real_tiles = jnp.sum(sizes), jnp.sum(ntiles)
    pad_start = jnp.minimum(total, m)  # the padding group's rows [pad_start, m)
    pad_end = real_tiles + (m - pad_start + bm - 1) // bm  # its tiles end there: all tiles
    grp = jnp.minimum(jnp.sum((real & (tile_end <= t)).astype(jnp.int32))
                      + (pad_end <= t).astype(jnp.int32), e)

    def at(v):  # v[grp] for a real group
        return jnp.sum(jnp.where(idx == grp, v, 0))

    is_pad = grp >= e
    start = jnp.where(is_pad, pad_start, at(starts))
    end = jnp.where(is_pad, m, at(ends))
    first_tile = jnp.where(is_pad, real_tiles, at(tile_end - ntiles))
    row0 = start + (t - first_tile) * bm
    hi = jnp.minimum(end, row0 + bm)
    valid = t < pad_end
    return (jnp.where(valid, grp, 0), jnp.where(valid, row0, 0), jnp.where(valid, hi, 0))


def _operands_kernel(gs_ref, layer_ref, *refs, m: int, k: int, e: int, bm: int,
                     num_layers: int | None, sums: bool, fp16: bool, shuffled: bool,
                     pieces: int, swiglu: bool):
    cols_ref, x_ref, grp_ref, row0_ref, hi_ref, xp_ref, *rest = (
        refs if shuffled else (None, *refs))
    sums_ref = rest[0] if sums else None
    inv_ref = rest[-1] if fp16 else None
    p = pl.program_id(0)  # padded row p; piece j of its K (one piece: the grid is 1-D)
    j = pl.program_id(1) if pieces > 1 else 0
    t, i = p // bm, p % bm
    grp, row0, hi = _tile_of(gs_ref, t, m=m, e=e, bm=bm)
    if num_layers is not None:  # kernels._fold_layer
        grp = jnp.where(grp < e, grp + layer_ref[0] * e, num_layers * e)

    @pl.when((i == 0) if pieces == 1 else (i == 0) & (j == 0))
    def _():
        one = pl.ds(t, 1)
        for ref, v in ((grp_ref, grp), (row0_ref, row0), (hi_ref, hi)):
            plgpu.store(ref.at[one], jnp.full((1,), v, jnp.int32))

    @pl.when(row0 + i < hi)  # a tile's padding rows are never stored: left unwritten
    def _():
        _row_operands(p, j, row0 + i, x_ref, cols_ref, xp_ref, sums_ref, inv_ref, k=k,
                      fp16=fp16, pieces=pieces, swiglu=swiglu)


def _row_operands(p, j, src, x_ref, cols_ref, xp_ref, sums_ref, inv_ref, *, k: int, fp16: bool,
                  pieces: int, swiglu: bool):
    """Piece ``j`` (of ``pieces`` equal runs of K) of row ``p`` of the x planes and its group
    sums, from sorted row ``src`` of x (``swiglu``: of :func:`swiglu_rows` of the partial sums
    ``x_ref [S, M, 2K]``)."""
    # Triton's vectors have power-of-two lengths: K (a multiple of 256) in equal chunks of one,
    # each as 4 planes of [chunk / 256 steps, 64]: column 256 b + 64 t + c of the plane-ordered
    # row is K row 256 b + 4 c + t (before the "shuffled" order's gather).
    kp = k // pieces
    chunk = min(kp & -kp, _CHUNK)
    steps = jnp.arange(chunk // km.BLOCK_K, dtype=jnp.int32)[:, None] * km.BLOCK_K
    lanes = jnp.arange(64, dtype=jnp.int32)[None, :]

    def row_values(col):  # x[src, col] as fp32
        if not swiglu:
            return x_ref[src, col].astype(jnp.float32)
        # swiglu_rows: the splits' sums of the gate and up columns, silu(gate) * up, bf16
        gate, up = (functools.reduce(jnp.add, (x_ref[s, src, off + col]
                                               for s in range(x_ref.shape[0])))
                    for off in (0, k))
        return reference.swiglu(gate, up).astype(jnp.bfloat16).astype(jnp.float32)

    def plane_of(c, t):  # plane t of chunk c: (its columns in x_planes, x's values there)
        at = c * chunk + steps + 64 * t + lanes
        col = c * chunk + steps + 4 * lanes + t if cols_ref is None else cols_ref[at]
        return at, row_values(col)

    first = j * (kp // chunk)  # the piece's first chunk
    planes = [plane_of(first + c, t) for c in range(kp // chunk) for t in range(4)]
    if fp16:  # fp16_row_scales, frexp's exponent from the float bits
        # The whole row's largest |x|. One piece: its planes are the row (elementwise over them
        # first, then one reduction across threads). Several: every piece reads the whole row
        # again, in one contiguous pass in x's own column order (past K, column K - 1 again),
        # not plane by plane in the plane order's strided gathers: the fused down's launch at
        # one token took 8.2 µs that way against 3.1 with bf16 planes (results/NOTES.md §75).
        if pieces == 1:
            row = [v for _, v in planes]
        else:
            row = [row_values(jnp.minimum(jnp.arange(_next_pow2(k), dtype=jnp.int32), k - 1))]
        amax = jnp.max(functools.reduce(jnp.maximum, (jnp.abs(v) for v in row)))
        biased = (jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF
        ex = jnp.maximum(jnp.where(amax > 0, biased - 126, 0), km.FP16_MIN_EXPONENT)
        scale = jax.lax.bitcast_convert_type((141 - ex) << 23, jnp.float32)  # 2^(14 - e)
        inv = jax.lax.bitcast_convert_type((113 + ex) << 23, jnp.float32)  # 2^(e - 14)
        store_inv = functools.partial(plgpu.store, inv_ref.at[pl.ds(src, 1)],
                                      jnp.full((1,), inv, jnp.float32))
        if pieces == 1:
            store_inv()
        else:
            pl.when(j == 0)(store_inv)

    offsets = km.FP16_PLANE_OFFSETS if fp16 else km.BF16_PLANE_OFFSETS
    for c in range(kp // chunk):
        weighted = 0.0  # sum_t c_t x_t elementwise, then one reduction a 16-column group
        for t in range(4):
            at, v = planes[4 * c + t]
            if fp16:  # fp16_plane_columns
                v = (v * scale) * km._F16_X_SCALE[t]
                v = v.astype(jnp.float16).astype(jnp.float32)
                v = jnp.where(jnp.abs(v) < 2.0**-14, v * 0.0, v)  # reduce_precision's flush
            xp_ref[p, at] = v.astype(xp_ref.dtype)
            weighted += offsets[t] * v
        if sums_ref is not None:  # group_sums: 16 columns of each plane a scale group
            group_sum = jnp.sum(weighted.reshape(chunk // km.BLOCK_K, 4, 16), axis=2)
            g = ((first + c) * (chunk // GROUP_SIZE) + steps // GROUP_SIZE
                 + jnp.arange(4, dtype=jnp.int32)[None, :])
            sums_ref[p, g] = group_sum


@functools.partial(jax.jit, static_argnames=("bm", "sums", "fp16", "k_order", "num_layers",
                                             "interpret", "pieces", "swiglu_partials"))
def _expert_operands(x, group_sizes, layer, *, bm, sums, fp16, k_order, num_layers, interpret,
                     pieces=1, swiglu_partials=False):
    m, k = x.shape[-2], x.shape[-1] // (2 if swiglu_partials else 1)
    e = group_sizes.shape[0]
    rows = _num_tiles(m, bm, e) * bm
    tiles = jax.ShapeDtypeStruct((rows // bm,), jnp.int32)
    out_shape = [tiles, tiles, tiles,
                 jax.ShapeDtypeStruct((rows, k), jnp.float16 if fp16 else jnp.bfloat16)]
    if sums:
        out_shape.append(jax.ShapeDtypeStruct((rows, k // GROUP_SIZE), jnp.float32))
    if fp16:
        out_shape.append(jax.ShapeDtypeStruct((m,), jnp.float32))
    shuffled = k_order != "natural"
    cols = (jnp.asarray(_column_order(k, km.BLOCK_K, 4, k_order)),) if shuffled else ()
    kernel = functools.partial(_operands_kernel, m=m, k=k, e=e, bm=bm, num_layers=num_layers,
                               sums=sums, fp16=fp16, shuffled=shuffled, pieces=pieces,
                               swiglu=swiglu_partials)
    grp, row0, hi, xp, *rest = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(rows, pieces) if pieces > 1 else (rows,),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        name="wint2_expert_operands",
    )(group_sizes.astype(jnp.int32), layer, *cols, x)
    return ExpertOperands((grp, row0, hi), xp, rest[0] if sums else None,
                          rest[-1] if fp16 else None)


def expert_operands(x, group_sizes, *, bm: int, sums: bool, fp16: bool,
                    k_order: str = "natural", layer=None, num_layers: int = 1,
                    implementation: str | None = None, pieces: int = 1,
                    swiglu_partials: bool = False) -> ExpertOperands:
    """The Mosaic kernel's operands for rows ``x [M, K]`` (bf16, sorted by group) and
    ``group_sizes [E]``: one Triton launch (``implementation="pallas"``, the default on a GPU;
    interpret mode elsewhere), or the jnp composition (``"xla"``). ``sums``: the mma.sync
    path's group sums; ``fp16``: fp16 planes. ``layer`` (traced): as ``kernels.expert_tiles``.
    ``pieces``: programs a row, each taking ``K / pieces`` columns (a multiple of 256), for
    launches of a few rows whose programs each walk a whole row in turn (at one token: 8 rows,
    one program an SM on 8 SMs); measured, it pays for a fused FFN's down (bf16 planes from
    the partial sums) at 8 rows and loses elsewhere (``results/NOTES.md`` §55), which
    ``kernel_mosaic.ffn_plan`` follows. ``swiglu_partials``: ``x`` is a SwiGLU projection's fp32
    split-K partial sums ``[S, M, 2K]`` (gate | up) and the rows are :func:`swiglu_rows` of
    them, computed here instead of by an XLA epilogue between the two projections."""
    if implementation not in (None, "pallas", "xla"):
        raise ValueError(f"implementation must be 'pallas', 'xla' or None, got {implementation!r}")
    if swiglu_partials and (x.ndim != 3 or x.dtype != jnp.float32 or x.shape[-1] % 2):
        raise ValueError("swiglu_partials takes fp32 partial sums [S, M, 2K], got "
                         f"{x.dtype} {x.shape}")
    k = x.shape[-1] // (2 if swiglu_partials else 1)
    if pieces < 1 or k % pieces or (k // pieces) % km.BLOCK_K:
        raise ValueError(f"pieces={pieces} must split K={k} into multiples of {km.BLOCK_K}")
    kw = dict(bm=bm, sums=sums, fp16=fp16, k_order=k_order, swiglu_partials=swiglu_partials)
    if implementation == "xla":
        return expert_operands_reference(x, group_sizes, layer=layer, num_layers=num_layers, **kw)
    layer_arr = jnp.zeros((1,), jnp.int32) if layer is None else (
        jnp.asarray(layer, jnp.int32).reshape(1))
    return _expert_operands(x, group_sizes, layer_arr, num_layers=None if layer is None
                            else num_layers, interpret=jax.default_backend() != "gpu",
                            pieces=pieces, **kw)

