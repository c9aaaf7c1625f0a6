"""The Pallas (Triton-lowered) grouped weight-only matmul: packed weights decoded in registers.

One kernel serves every format (``codecs.py``) and both ops: a dense matmul is the grouped one
with a single group. It computes, for each row r of group e (rows sorted by group)::

    y[r, :] = epilogue( sum_k x[r, k] * W_e[k, :] )        fp32 accumulation on the tensor cores
    W_e     = the codec's decode of expert e's packed tile (WINT2: bit-exact with
              dequantize_wint2; modes that scale after the dot: see codecs.py)
    epilogue: * weight_scale[e, :] (WINT4/8) ; swiglu: silu(y_gate) * y_up ; * row_scale[r]
    rows past sum(group_sizes) are written as zeros; the result is cast to out_dtype once.

Grid and tiles::

    grid = (N_out / bn, T)          axis 0 (n tiles) varies fastest: consecutive programs share
                                    one x tile (kept in L2) and sweep one expert's columns
    T    = ceil(M / bm) + min(E, M) static bound on (group, aligned bm-row block) pairs
    tile t -> (group g, block b, rows [lo, hi))   a table built in jnp (no host sync);
             g == E marks the padding rows (zeros), lo == hi an unused tile (early exit)

    program (j, t):                                     per K block kb (software pipelined):
      ┌──────────────────────────────────────────┐        bytes  [bk/P, bn]  ─ codec ─┐
      │ acc[bm, bn] f32 (x2 with swiglu)         │  <──  P planes [bk/P, bn] bf16 ─────┤ P dots
      │ for kb in range(K / bk): acc += planes   │        x slices [bm, bk/P] (plane-  ┘
      │ epilogue, masked store of rows [lo, hi)  │        permuted columns, contiguous)
      └──────────────────────────────────────────┘

Split-K (``TuningConfig.split_k = S > 1``): the grid gains a third axis; program ``s`` runs K
blocks ``[s*K/S, (s+1)*K/S)`` and stores its fp32 partial sums (column-scaled) to an
``[S, M, N]`` buffer; their sum and the rest of the epilogue (SwiGLU, row scale, cast) are one small
XLA fusion after the call. For few rows and narrow N, where ``N/bn x T`` programs cannot keep the
GPU's memory pipes busy.

Modes (``TuningConfig.mode``; the tuned table picks one per row regime):

* ``"mma"``: as drawn; one dot of depth bk/P per plane.
* ``"mma_gs"`` (WINT2): per 64-row group, P dots of depth 16 on the raw integers q, then
  ``acc += part * (nib * super_scale)``: no per-weight scale gather, multiply or rounding
  (10-15 % faster than ``"mma"`` at <= 64 tokens on the H100; rounding as in ``codecs.py``);
  compiled, the integers come from hand-written PTX (``codecs._wint2_q_bf16x2_ptx``). The tuned
  tables pick it up to ~256 tokens.
* ``"mma_merged"``: planes interleaved back to natural K order, one dot of depth bk.
* ``"fma"``: <= 8 rows per tile on CUDA-core FMAs ([bk/P, bn] fp32 partial sums per row,
  reduced once), no tensor cores, with or without a K split. GEMV-style: with bk 16-32 and K
  split 8-32 ways it is what the tuned tables pick for the dense WINT8 linears at one row (the
  tensor-core tiles left them latency-bound: 300B qkv 48.5 -> 37.2 µs on the H100) and for the
  300B's WINT4 up_gate at one token (``results/NOTES.md`` §57-58); the WINT2 experts' mma_gs
  with split-K beat its unsplit form.

At small M every active expert has exactly one tile per n tile, so its packed weights are read
from HBM exactly once; the decode runs in registers and only bf16 planes meet the MMA.

Backend, chosen by measurement (H100, jax 0.11.2, ``pallas_kernels/results/``): Pallas's
Triton lowering. It is the one Pallas GPU backend that (a) runs under ``interpret=True`` on a
CPU, so CI executes this exact kernel body, and (b) works on jax 0.10.2 and 0.11.2 alike
(Mosaic GPU's CPU interpreter is private and hangs on mixed-type matmuls in 0.10.2). Measured:
the same skeleton with bf16 weights streams at 2.7 TB/s (81 % of DRAM peak, ncu) at 1 token,
so the grid / tile-table / pipelining design is not the limit. With WINT2 (mode ``"mma_gs"``, PTX
decode) the kernel is issue-bound: 7.2 thread instructions per weight, of which the decode is
3.25; the rest is Triton's operand handling (one shared-memory load per byte in the MMA operand
layout, the x fragment re-packed for every 8-column MMA; ncu + SASS in ``results/NOTES.md`` §13).
That Mosaic GPU kernel now exists for WINT2 experts on Hopper (``kernel_mosaic.py``: weights
as wgmma's register operand from a fragment byte order, x as the shared operand; 1.6-3.5x this
kernel on the 300B expert FFN, H100, 2026-11-22) and the model uses it there
(``byte_order="fragments"``). This kernel keeps every other case: WINT4 / WINT8 / bf16, dense
WINT2, WINT2 experts off Hopper, and CPU interpret mode (CI). At >= 256 tokens the Triton MMA
path reaches 11-30 % of the bf16 matmul peak.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .codecs import CODECS, wint2_group
from .config import TuningConfig
from .reference import apply_epilogue
from .wint2 import GROUP_SIZE

# jax 0.11 deprecates the Triton lowering (see the module docstring for why it is used here);
# the warning fires at every compile of a caller's jit and says nothing actionable to them.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


# Pallas's Triton lowering picks 32-bit element offsets for refs of at most 2**32 *bytes*, but
# the offsets are signed element counts: a 1-byte ref of 2**31..2**32 elements (a stacked WINT2 /
# WINT8 weight of 2-4 GiB, e.g. ERNIE-4.5-21B's 27 up_gate expert stacks, 3.4 GB) then computes
# negative offsets (CUDA_ERROR_ILLEGAL_ADDRESS, seen on an H100 with jax 0.11.2). Refs of
# >= 2**31 elements get 64-bit offsets here. If the private hook is absent, kernels.py refuses
# such operands instead (NotImplementedError -> the reference path).
INT32_OFFSETS_SAFE_LIMIT = 2**31


def _patch_offset_width() -> bool:
    try:
        from jax._src.pallas.triton import lowering as tl

        original = tl._compute_offsets_from_indices
        dataclasses.fields(tl.BlockInfo)
    except (ImportError, AttributeError, TypeError):
        return False
    if getattr(original, "_jaxwint2_patched", False):
        return True

    def offsets_64bit_past_2g_elements(block_info, nd_indexer):
        sd = block_info.full_shape_dtype
        if math.prod(sd.shape) >= INT32_OFFSETS_SAFE_LIMIT and sd.dtype.itemsize < 4:
            # Seen as 4-byte elements the ref exceeds 2**32 bytes: the lowering goes 64-bit.
            # Strides are in elements and do not change; the dtype serves that decision only.
            block_info = dataclasses.replace(
                block_info, full_shape_dtype=jax.ShapeDtypeStruct(sd.shape, jnp.float32))
        return original(block_info, nd_indexer)

    offsets_64bit_past_2g_elements._jaxwint2_patched = True
    tl._compute_offsets_from_indices = offsets_64bit_past_2g_elements
    return True


LARGE_REFS_OK = _patch_offset_width()


def _silu(v: jax.Array) -> jax.Array:
    return v / (1.0 + jnp.exp(-v))


def _kernel(grp_ref, blk_ref, lo_ref, hi_ref, x_ref, *refs, fmt: str, num_groups: int, k: int,
            n_half: int | None, has_row_scale: bool, cfg: TuningConfig, compute_dtype,
            interpret: bool):
    codec = CODECS[fmt]
    nw = len(codec.leaves)
    w_refs = refs[:nw]
    rs_ref = refs[nw] if has_row_scale else None
    o_ref = refs[-1]
    bm, bn, bk, P = cfg.block_m, cfg.block_n, cfg.block_k, codec.planes
    m = x_ref.shape[0]

    j, t = pl.program_id(0), pl.program_id(1)
    split = cfg.split_k > 1
    s = pl.program_id(2) if split else 0  # this program's share of the K loop
    g, lo, hi = grp_ref[t], lo_ref[t], hi_ref[t]
    row0 = blk_ref[t] * bm
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)  # [bm]
    n0 = j * bn
    col_offsets = (n0,) if n_half is None else (n0, n0 + n_half)
    store_mask = ((rows >= lo) & (rows < hi))[:, None]
    # split-K: o_ref is [split_k, M, N] fp32 partial sums over all N columns (both swiglu halves)
    out_ats = ([o_ref.at[s, pl.ds(row0, bm), pl.ds(c, bn)] for c in col_offsets] if split
               else [o_ref.at[pl.ds(row0, bm), pl.ds(n0, bn)]])

    def epilogue(accs, row_scale):
        if codec.column_scaled:
            accs = tuple(a * codec.column_scale(w_refs, g, c, bn)
                         for a, c in zip(accs, col_offsets, strict=True))
        y = _silu(accs[0]) * accs[1] if n_half is not None else accs[0]
        return y if row_scale is None else y * row_scale

    def _compute_mma():
        consts = [codec.columns(w_refs, g, c, bn) for c in col_offsets]
        row_ok = (rows < m)[:, None]

        def x_slice(start, size):
            return plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(start, size)], mask=row_ok,
                              other=0.0).astype(compute_dtype)

        def body(kb, accs):
            new = []
            for c, cst, acc in zip(col_offsets, consts, accs, strict=True):
                if cfg.mode == "mma_gs":  # per 64-row group: 4 dots of depth 16, then * S
                    for jg in range(bk // GROUP_SIZE):
                        qs, scale = wint2_group(w_refs, cst, g, kb, bk, jg, c, bn,
                                                compute_dtype, ptx_fma=not interpret)
                        part = jnp.zeros((bm, bn), jnp.float32)
                        for p, q in enumerate(qs):
                            xs = x_slice(kb * bk + p * (bk // P) + jg * (GROUP_SIZE // P),
                                         GROUP_SIZE // P)
                            part = part + jnp.dot(xs, q, preferred_element_type=jnp.float32,
                                                  precision=_precision(compute_dtype))
                        acc = acc + part * scale
                    new.append(acc)
                    continue
                planes = codec.planes_of(w_refs, cst, g, kb, bk, c, bn, compute_dtype,
                                         ptx_fma=not interpret)
                if cfg.mode == "mma_merged":  # one dot of depth bk on natural-order K
                    pairs = [(x_slice(kb * bk, bk), interleave_planes(planes))]
                else:  # one dot of depth bk/P per plane, x columns plane-permuted
                    pairs = [(x_slice(kb * bk + p * (bk // P), bk // P), w)
                             for p, w in enumerate(planes)]
                for xs, w in pairs:
                    acc = acc + jnp.dot(xs, w, preferred_element_type=jnp.float32,
                                        precision=_precision(compute_dtype))
                new.append(acc)
            return tuple(new)

        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in col_offsets)
        per = k // bk // cfg.split_k  # a static trip count, also under split-K (pipelining)
        accs = jax.lax.fori_loop(0, per, lambda i, a: body(s * per + i, a), zeros)
        if split:  # partial sums (column scale is linear: applied here); the rest after the sum
            if codec.column_scaled:
                accs = tuple(a * codec.column_scale(w_refs, g, c, bn)
                             for a, c in zip(accs, col_offsets, strict=True))
            for out_at, acc in zip(out_ats, accs, strict=True):
                plgpu.store(out_at, acc, mask=store_mask)
            return
        rs = None
        if rs_ref is not None:
            rs = plgpu.load(rs_ref.at[pl.ds(row0, bm)], mask=rows < m, other=0.0)
            rs = rs.astype(jnp.float32)[:, None]
        plgpu.store(out_ats[0], epilogue(accs, rs).astype(o_ref.dtype), mask=store_mask)

    def _compute_fma():
        # GEMV-style for a few rows: no tensor cores, no operand-layout shuffles. Each row keeps
        # a [bk/P, bn] fp32 partial sum (FMAs of decoded planes with broadcast x), reduced over
        # K once after the loop.
        consts = [codec.columns(w_refs, g, c, bn) for c in col_offsets]
        rp = bk // P

        def body(kb, accs):
            new = []
            for c, cst, acc_rows in zip(col_offsets, consts, accs, strict=True):
                planes = codec.planes_of(w_refs, cst, g, kb, bk, c, bn, jnp.float32,
                                         ptx_fma=not interpret)
                acc_rows = list(acc_rows)
                for r in range(bm):
                    for p, w in enumerate(planes):
                        xs = plgpu.load(x_ref.at[row0 + r, pl.ds(kb * bk + p * rp, rp)],
                                        mask=row0 + r < m, other=0.0)
                        acc_rows[r] = acc_rows[r] + w * xs.astype(jnp.float32)[:, None]
                new.append(tuple(acc_rows))
            return tuple(new)

        zeros = tuple(tuple(jnp.zeros((rp, bn), jnp.float32) for _ in range(bm))
                      for _ in col_offsets)
        per = k // bk // cfg.split_k
        accs = jax.lax.fori_loop(0, per, lambda i, a: body(s * per + i, a), zeros)
        for r in range(bm):
            row = row0 + r
            row_mask = jnp.full((1, bn), (row >= lo) & (row < hi))
            if split:  # fp32 partial sums, column-scaled; the rest after the sum (as in mma)
                for c, a in zip(col_offsets, accs, strict=True):
                    acc_r = jnp.sum(a[r], axis=0, keepdims=True)  # [1, bn]
                    if codec.column_scaled:
                        acc_r = acc_r * codec.column_scale(w_refs, g, c, bn)
                    plgpu.store(o_ref.at[s, pl.ds(row, 1), pl.ds(c, bn)], acc_r,
                                mask=row_mask)
                continue
            rs = None
            if rs_ref is not None:
                rs = plgpu.load(rs_ref.at[pl.ds(row, 1)], mask=row < m, other=0.0)
                rs = rs.astype(jnp.float32)[None, :]
            acc_r = tuple(jnp.sum(a[r], axis=0, keepdims=True) for a in accs)  # [1, bn]
            plgpu.store(o_ref.at[pl.ds(row, 1), pl.ds(n0, bn)],
                        epilogue(acc_r, rs).astype(o_ref.dtype), mask=row_mask)

    pl.when((hi > lo) & (g < num_groups))(_compute_fma if cfg.mode == "fma" else _compute_mma)

    @pl.when((hi > lo) & (g >= num_groups))
    def _padding():
        for out_at in out_ats:
            plgpu.store(out_at, jnp.zeros((bm, bn), o_ref.dtype), mask=store_mask)


def interleave_planes(planes: list[jax.Array]) -> jax.Array:
    """``P`` planes ``[r, bn]`` (plane t = K rows P*p + t) -> ``[P*r, bn]`` in natural K order."""
    if len(planes) == 1:
        return planes[0]
    r, bn = planes[0].shape
    if len(planes) == 2:
        w = jnp.stack(planes, axis=-1)  # [r, bn, 2]
        return jnp.transpose(w, (0, 2, 1)).reshape(2 * r, bn)
    lo = jnp.stack(planes[0:2], axis=-1)  # [r, bn, 2]: t = i
    hi = jnp.stack(planes[2:4], axis=-1)  # t = 2 + i
    w = jnp.stack([lo, hi], axis=-1)  # [r, bn, i, j]: t = i + 2j
    return jnp.transpose(w, (0, 3, 2, 1)).reshape(4 * r, bn)


def _out_struct(shape, dtype, *, like: jax.Array) -> jax.ShapeDtypeStruct:
    """The output's ShapeDtypeStruct, varying over the same mesh axes as ``like`` (x's rows).

    Needed under ``shard_map(check_vma=True)``. The field is ``manual_axis_type`` (aval ``mat``)
    on jax 0.10 and ``vma`` on versions that spell it so; outside shard_map it is empty.
    """
    aval = jax.typeof(like)
    for aval_attr, kwarg in (("mat", "manual_axis_type"), ("vma", "vma")):
        value = getattr(aval, aval_attr, None)
        if value is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{kwarg: value})
            except (TypeError, ValueError):  # this jax spells the field differently
                continue
    return jax.ShapeDtypeStruct(shape, dtype)


def _precision(dtype):
    # An explicit algorithm: jax 0.11 lowers Precision.HIGHEST to TF32 inside Triton kernels.
    return jax.lax.DotAlgorithmPreset.F32_F32_F32 if dtype == jnp.float32 else None


@functools.partial(jax.jit, static_argnames=("fmt", "activation", "out_dtype", "cfg",
                                             "interpret"))
def grouped_matmul(x_planes: jax.Array, weights: tuple[jax.Array, ...],
                   tiles: tuple[jax.Array, ...], row_scale: jax.Array | None, *, fmt: str,
                   activation: str | None, out_dtype, cfg: TuningConfig,
                   interpret: bool) -> jax.Array:
    """Run the kernel on plane-permuted ``x [M, K]`` and stacked ``weights`` (codec leaf order).

    ``tiles`` is ``(group, block, lo, hi)`` int32 ``[T]`` (see ``kernels.tile_table``). Shape
    constraints are checked by the caller (``kernels.py``), which raises NotImplementedError.
    """
    m, k = x_planes.shape
    e, n = weights[0].shape[0], weights[0].shape[-1]
    n_out = n // 2 if activation == "swiglu" else n
    compute_dtype = jnp.float32 if x_planes.dtype == jnp.float32 else jnp.bfloat16
    kernel = functools.partial(
        _kernel, fmt=fmt, num_groups=e, k=k, n_half=n_out if activation == "swiglu" else None,
        has_row_scale=row_scale is not None, cfg=cfg, compute_dtype=compute_dtype,
        interpret=interpret)
    args = (*tiles, x_planes, *weights, *(() if row_scale is None else (row_scale,)))
    split = cfg.split_k
    out_shape = (_out_struct((split, m, n), jnp.float32, like=x_planes) if split > 1 else
                 _out_struct((m, n_out), out_dtype, like=x_planes))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n_out // cfg.block_n, tiles[0].shape[0], *((split,) if split > 1 else ())),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"{fmt}_grouped_matmul",
    )(*args)
    if split == 1:
        return out
    # split-K: add the partial sums, then the epilogue the kernel left out (one small fusion).
    return apply_epilogue(out.sum(axis=0), activation, row_scale).astype(out_dtype)
