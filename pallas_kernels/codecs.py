"""In-kernel tile decoders: packed weight bytes -> the bf16 (or f32) operand of one tensor-core dot.

This module owns how each runtime weight format (``jaxwint2/layout.py``) is turned, one
``[bk, bn]`` K-block of one expert at a time, into MMA operands inside a Pallas kernel. It knows
nothing about grids, routing or epilogues (``kernel_triton.py``), and its arithmetic is the
traced twin of the exact decode spec (``wint2.py`` §3.1, ``reference.dequantize``).

**Planes.** A stored row of a packed format holds ``P`` consecutive K rows (``P`` = 4 for WINT2,
2 for WINT4, 1 otherwise). Rather than interleaving decoded rows back into K order (a register
shuffle), a codec returns ``P`` *planes* of ``[bk/P, bn]``: plane ``t`` holds K rows
``k0 + P*p + t``. The caller permutes the activation columns once, outside the kernel, with
:func:`plane_permutation`, so that plane ``t`` meets a contiguous ``[bm, bk/P]`` slice of x.

**Arithmetic (bit-exact with the reference decode).**

* WINT2: ``u`` (byte, 0..255) -> ``float(u)`` via the magic-number trick
  ``bitcast(0x4B000000 | u) - 2^23`` (exact, no int->float conversion instruction);
  ``c = floor(fma(u, cs, zp) + 0.5)`` in fp32 (an explicit ``fma.rn.f32`` on the GPU);
  ``c + 2^23`` is exact, so its bits are ``0x4B000000 | code`` and each 6-bit window
  ``(bits >> s) & 63`` is read off them directly; ``q = bitcast(0x4B000000 | w) - (2^23 + 32)``
  exactly; ``W = bf16(q * (nib * super_scale))`` — the product is exact in fp32, so the cast is
  the reference's single rounding. Valid checkpoints have codes in ``[0, 2^23)`` (they are
  15-bit); negative codes are outside the format. Compiled, mode ``"mma_gs"`` gets its exact
  integers ``q`` from the same arithmetic written in PTX (:func:`_wint2_q_bf16x2_ptx`: floor as
  ``add.rm``, two bf16 weights per register); interpret mode runs the jnp expression.
* WINT4 / WINT8: the integer ``q`` is exact in bf16, so the codec returns ``q`` and the kernel
  applies the per-column ``weight_scale`` to the fp32 accumulator (one multiply per output
  instead of one per weight). This equals the reference's ``bf16(q * s)`` per weight up to that
  rounding of the reference itself, and exactly for a one-hot row of x. Compiled, the
  GEMV-style mode's fp32 WINT8 operand comes from PTX (:data:`_PTX_INT8_F32`: the magic-number
  trick on four bytes at once) instead of a conversion instruction per weight.
* bf16: the weight as stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .wint2 import GROUP_SIZE

_MAGIC_I = 0x4B000000  # bits of 2^23 as fp32: 2^23 + i for 0 <= i < 2^23 has these high bits
_MAGIC_F = 8388608.0  # 2^23
_WINT2_SHIFTS = (9, 6, 3, 0)


def _as_f32(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _as_i32(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one weight format is read and decoded inside the kernel.

    Attributes:
      fmt: the runtime format name.
      planes: K rows per stored row (``P``).
      leaves: leaf names of the ``<linear>`` dict, in the order the kernel receives their refs.
      column_scaled: the kernel multiplies the accumulator by ``leaves[-1][e, n]`` (WINT4/8).
      min_block_k: the smallest K block the codec can decode (WINT2: two 64-row groups per
        scale byte).
    """

    fmt: str
    planes: int
    leaves: tuple[str, ...]
    column_scaled: bool = False
    min_block_k: int = 16

    # -- per program: per-column constants, loaded once --------------------------------------
    def columns(self, refs: Sequence[Any], g, n0, bn: int) -> Any:
        if self.fmt != "wint2":
            return None
        _, _, ss_ref, cs_ref, zp_ref = refs
        cols = pl.ds(n0, bn)
        load = lambda r: r[g, cols].astype(jnp.float32)[None, :]  # noqa: E731  [1, bn]
        return load(ss_ref), load(cs_ref), load(zp_ref)

    def column_scale(self, refs: Sequence[Any], g, n0, bn: int) -> jax.Array:
        return refs[-1][g, pl.ds(n0, bn)].astype(jnp.float32)[None, :]  # [1, bn]

    # -- per K block: decode into P planes of [bk/P, bn] ---------------------------------------
    def planes_of(self, refs: Sequence[Any], consts: Any, g, kb, bk: int, n0, bn: int,
                  dtype, *, ptx_fma: bool = False) -> list[jax.Array]:
        rows = bk // self.planes
        cols = pl.ds(n0, bn)
        if self.fmt == "bf16":
            return [refs[0][g, pl.ds(kb * rows, rows), cols].astype(dtype)]
        if self.fmt == "wint8":
            q = refs[0][g, pl.ds(kb * rows, rows), cols]  # [bk, bn] int8
            if ptx_fma and INT_PTX_DECODE and dtype == jnp.float32:
                return [_wint8_f32_ptx(q)]
            return [q.astype(jnp.float32).astype(dtype)]
        if self.fmt == "wint4":
            b = refs[0][g, pl.ds(kb * rows, rows), cols].astype(jnp.int32)  # [bk/2, bn]
            return [_nibble_to_float(b, 4 * t).astype(dtype) for t in range(2)]
        return _wint2_planes(refs, consts, g, kb, bk, cols, bn, dtype, ptx_fma)


def _nibble_to_float(b: jax.Array, shift: int) -> jax.Array:
    """``((b >> shift) & 15) - 8`` as fp32, via the magic-number trick (exact)."""
    return _as_f32(((b >> shift) & 0xF) | _MAGIC_I) - (_MAGIC_F + 8.0)


# The compiled kernel's GEMV-style mode (``"fma"``, fp32 operands) converts WINT8 bytes with
# the PTX below (False: the jnp cast, which interpret mode always uses; kept for A/B timing).
INT_PTX_DECODE = True

# 4 int8 weights (one register) -> 4 fp32, 9 instructions and no conversion unit: the sign bit
# flipped (q + 128 in each byte), each byte placed under the bits of 2^23 (``prmt``), then
# 2^23 + 128 subtracted (exact). H100, one row, GPU time: 5-17 % under the cast's
# (``results/NOTES.md`` §57). The same with a bf16 packing for the tensor-core modes (and a
# WINT4 twin) gained nothing at 1-64 rows and lost at 1024 (6-8 % on the 21B, one 300B row
# 47 %): not kept.
_PTX_INT8_F32 = """{
.reg .b32 u;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, 0x4B000000, 0x7440; prmt.b32 $1, u, 0x4B000000, 0x7441;
prmt.b32 $2, u, 0x4B000000, 0x7442; prmt.b32 $3, u, 0x4B000000, 0x7443;
sub.rn.f32 $0, $0, 0f4B000080; sub.rn.f32 $1, $1, 0f4B000080;
sub.rn.f32 $2, $2, 0f4B000080; sub.rn.f32 $3, $3, 0f4B000080;
}"""


def _wint8_f32_ptx(q: jax.Array) -> jax.Array:
    """``q.astype(f32)`` of an int8 tile without the conversion unit (compiled GPU only)."""
    [out] = plgpu.elementwise_inline_asm(
        _PTX_INT8_F32, args=[q], constraints="=r,=r,=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.float32)])
    return out


def fma_f32(a: jax.Array, b: jax.Array, c: jax.Array, *, ptx: bool) -> jax.Array:
    """``a * b + c`` with one rounding: PTX ``fma.rn.f32`` in a compiled GPU kernel.

    Triton as driven by Pallas does not reliably contract ``a * b + c`` (seen on the H100 with
    jax 0.11.2: 2 of 32768 decoded weights off), so the GPU kernel states the FMA explicitly.
    Interpret mode (``ptx=False``) evaluates the jnp expression, which XLA's CPU backend
    contracts; ``checks.check_wint2_decode_exact`` verifies both against the exact decode.
    """
    if not ptx:
        return a * b + c
    b, c = jnp.broadcast_to(b, a.shape), jnp.broadcast_to(c, a.shape)
    [out] = plgpu.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def _wint2_planes(refs, consts, g, kb, bk: int, cols, bn: int, dtype,
                  ptx_fma: bool) -> list[jax.Array]:
    qw_ref, ws_ref, *_ = refs
    ss, cs, zp = consts  # [1, bn] f32 each
    rows = bk // 4
    u = qw_ref[g, pl.ds(kb * rows, rows), cols].astype(jnp.int32)  # [bk/4, bn] bytes
    uf = _as_f32(u | _MAGIC_I) - _MAGIC_F  # float(u), exact
    code = jnp.floor(fma_f32(uf, cs, zp, ptx=ptx_fma) + 0.5)  # one rounding, then + 0.5
    bits = _as_i32(code + _MAGIC_F)  # 0x4B000000 | code

    # Group scales: plane row p of this block is K row k0 + 4p + t, in group (k0 + 4p) // 64,
    # i.e. local group p // 16, stored in scale byte p // 32 (high nibble for even groups).
    # Each thread gathers the scale bytes of its own elements (L1 hits): no layout shuffles.
    per = GROUP_SIZE // 4  # plane rows per group (16)
    p = jnp.arange(rows, dtype=jnp.int32)
    sb = ws_ref[g, kb * (bk // (2 * GROUP_SIZE)) + p // (2 * per), cols]  # [bk/4, bn] u8
    shift = jnp.where((p // per) % 2 == 0, 4, 0)[:, None]
    scale = ((sb.astype(jnp.int32) >> shift) & 0xF).astype(jnp.float32) * ss  # nib * ss, exact

    out = []
    for s in _WINT2_SHIFTS:
        q = _as_f32(((bits >> s) & 0x3F) | _MAGIC_I) - (_MAGIC_F + 32.0)  # exact, -32..31
        out.append((q * scale).astype(jnp.bfloat16).astype(dtype))  # single rounding to bf16
    return out


CODECS: dict[str, Codec] = {
    "bf16": Codec("bf16", 1, ("weight",)),
    "wint8": Codec("wint8", 1, ("quant_weight", "weight_scale"), column_scaled=True),
    "wint4": Codec("wint4", 2, ("quant_weight", "weight_scale"), column_scaled=True,
                   min_block_k=32),
    "wint2": Codec("wint2", 4, ("quant_weight", "weight_scale", "super_scales", "code_scale",
                               "code_zp"), min_block_k=2 * GROUP_SIZE),
}


def plane_permutation(k: int, bk: int, planes: int) -> np.ndarray:
    """Column order of x that makes plane ``t`` of every K block a contiguous slice.

    Returns ``perm`` with ``x_planes = x[:, perm]``: inside block ``b`` of ``bk`` columns,
    position ``t * bk/P + p`` holds K column ``b * bk + P * p + t``.
    """
    idx = np.arange(k, dtype=np.int32).reshape(k // bk, bk // planes, planes)
    return idx.swapaxes(-1, -2).reshape(k)


def wint2_group(refs, consts, g, kb, bk: int, j: int, n0, bn: int, dtype, *,
                ptx_fma: bool) -> tuple[list[jax.Array], jax.Array]:
    """WINT2 64-row group ``j`` of K block ``kb``, scale left out: ``(4 planes [16, bn], S)``.

    Plane t holds the exact integers ``q`` (-32..31, exact in bf16) of K rows
    ``k0 + 64j + 4p + t``; ``S = nib * super_scale`` ``[1, bn]`` fp32 is applied by the caller
    to the fp32 partial product of the group (``kernel mode "mma_gs"``): per weight this drops
    the scale gather, the multiply and the f32 -> bf16 rounding. The result differs from the
    reference's ``bf16(q * S)`` per weight by that rounding only (exact for a one-hot row once
    the output is rounded to bf16).
    """
    qw_ref, ws_ref, *_ = refs
    ss, cs, zp = consts
    per = GROUP_SIZE // 4  # 16 byte rows per group
    cols = pl.ds(n0, bn)
    u = qw_ref[g, pl.ds(kb * (bk // 4) + j * per, per), cols]  # [16, bn] uint8
    sb = ws_ref[g, pl.ds(kb * (bk // (2 * GROUP_SIZE)) + j // 2, 1), cols].astype(jnp.int32)
    nib = (sb >> (4 if j % 2 == 0 else 0)) & 0xF  # [1, bn]
    if ptx_fma and dtype == jnp.bfloat16 and WINT2_PTX_DECODE:
        planes = _wint2_q_bf16x2_ptx(u, cs, zp)
    else:
        uf = _as_f32(u.astype(jnp.int32) | _MAGIC_I) - _MAGIC_F
        bits = _as_i32(jnp.floor(fma_f32(uf, cs, zp, ptx=ptx_fma) + 0.5) + _MAGIC_F)
        planes = [(_as_f32(((bits >> s) & 0x3F) | _MAGIC_I) - (_MAGIC_F + 32.0)).astype(dtype)
                  for s in _WINT2_SHIFTS]
    return planes, nib.astype(jnp.float32) * ss


# The compiled kernel decodes mode "mma_gs" tiles with the hand-written PTX below (False: the
# jnp expression above, which interpret mode always uses; kept for A/B timing in bench.py).
WINT2_PTX_DECODE = True


# One byte (zero-extended to 32 bits) -> the bits 0x4B000000 | code, 5 instructions.
_PTX_CODE = """{
or.b32 $0, $1, 0x4B000000; sub.rn.f32 $0, $0, 0f4B000000;
fma.rn.f32 $0, $0, $2, $3; add.rn.f32 $0, $0, 0f3F000000; add.rm.f32 $0, $0, 0f4B000000;
}"""

_PTX_WINDOW = """{
.reg .b32 c, msk, mgh, one, k160;
mov.b32 msk, 0x003F003F; mov.b32 mgh, 0x43004300;
mov.b32 one, 0x3F803F80; mov.b32 k160, 0xC320C320;
prmt.b32 c, $2, $3, 0x5410; shr.b32 c, c, SHIFT;
lop3.b32 c, c, msk, mgh, 0xEA; fma.rn.bf16x2 $0, c, one, k160;
prmt.b32 c, $4, $5, 0x5410; shr.b32 c, c, SHIFT;
lop3.b32 c, c, msk, mgh, 0xEA; fma.rn.bf16x2 $1, c, one, k160;
}"""


def _wint2_q_bf16x2_ptx(u: jax.Array, cs: jax.Array, zp: jax.Array) -> list[jax.Array]:
    """The 4 planes of exact integers q (bf16) of a ``[r, bn]`` uint8 tile (compiled GPU only).

    Two inline-PTX steps. Codes, 5 instructions per byte::

        f = (u | 0x4B000000) - 2^23           float(u), exact (no int -> float conversion)
        f = fma.rn(f, cs, zp) + 0.5           the format's single rounding, then + 0.5 (.rn)
        f = add.rm(f, 2^23)                   2^23 + floor(f): bits are 0x4B000000 | code

    then per plane, for each pair of elements: ``prmt`` (code0 | code1 << 16), one shift, one
    ``lop3`` (``& 0x003F003F | 0x43004300``: bf16 ``128 + window`` in each half) and one
    ``fma.rn.bf16x2`` (``* 1 - 160``, exact): 2 instructions per weight, two weights a register,
    where the jnp expression converts every weight f32 -> bf16 on its own. (One asm statement
    with four outputs would form the code pairs once, not per plane; Pallas's Triton lowering
    returns one value for a multi-result inline asm in jax 0.11.2, and with that worked around
    the single statement measured 40-50 % slower on the H100: ``results/NOTES.md`` §16.)
    """
    cs, zp = jnp.broadcast_to(cs, u.shape), jnp.broadcast_to(zp, u.shape)
    # The bytes arrive one per register whatever the layout (Triton reads the tile in the MMA
    # operand layout: 4 consecutive elements of a thread are 4 different byte rows), so the code
    # step takes one zero-extended byte per instance rather than 4 packed ones.
    [bits] = plgpu.elementwise_inline_asm(
        _PTX_CODE, args=[u.astype(jnp.int32), cs, zp], constraints="=r,r,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(u.shape, jnp.int32)])
    out = jax.ShapeDtypeStruct(u.shape, jnp.bfloat16)
    return [plgpu.elementwise_inline_asm(
        _PTX_WINDOW.replace("SHIFT", str(s)), args=[bits], constraints="=r,=r,r,r,r,r", pack=4,
        result_shape_dtypes=[out])[0] for s in _WINT2_SHIFTS]
