"""The Mosaic GPU (Hopper) WINT2 grouped matmul: packed bytes decoded straight into wgmma operands.

The Triton kernel (``kernel_triton.py``) is issue-bound: Triton decodes in the mma.sync operand
layout, so it reads one byte per shared-memory load and re-packs the x fragment for every 8-column
MMA (7.2 thread instructions per weight, ``results/NOTES.md`` §13). This kernel controls both
layouts itself. It computes the *transposed* product of each tile::

    out[rows, n0:n0+64]^T = sum over K steps of  A_t [64 n, 64 k]  @  x^T [64 k, bm rows]
      A_t: plane t of the decoded weights, bf16 in *registers* (the wgmma A operand)
      x^T: the tile's x rows in shared memory (TMA, 128-byte swizzle; the wgmma B operand)

so the 64 weight columns of a warpgroup are wgmma's M side and the tokens its N side (8 to 256):
a decode step with one token per expert costs one m64n8k16 wgmma per 1024 weights, and the
expensive part, the decode, runs exactly once per weight whatever the token count.

**Fragment layout.** :func:`fragment_weights` pre-arranges the packed bytes ``[G, K/4, N]`` so that
each thread's bytes for one 256-deep K step are 32 contiguous bytes (two 16-byte shared-memory
loads, bank-conflict free): thread ``t`` = (warp w, lane l) owns rows ``n = 16w + l//4 (+8)`` and
byte columns ``p = 8j + 2(l%4) (+1)``, exactly its elements of wgmma's register A fragment. One
K step of one 64-column block is one contiguous 4 KiB chunk that TMA copies as it is; the group
scale nibbles are pre-arranged the same way (4 bytes a lane quad a step, :func:`fragment_scales`).

**Decode, per byte then per pair (inline PTX, 2.8 instructions per weight)**::

    f = bits(0x4B0000uu) - 2^23            one prmt puts the byte under the 2^23 exponent, exact
    code = add.rm(fma.rn(f, cs, zp + 0.5), 2^23)  the format's floor(fma(u, cs, zp) + 0.5), below
    pair = prmt(code_a, code_b)            two 15-bit codes, one register
    per plane s in (9, 6, 3, 0):           window w -> bf16 128 + w (lop3 with 0x4300)
      A = fma.rn.bf16x2(128 + w, nib, -160 * nib) = bf16(q * nib),  q = w - 32

By default (``to_fragments``' ``integer``, ``results/NOTES.md`` §60) the code step is one
integer multiply-add, ``code = (u * A + B) >> 16`` with per-column ``A, B`` stored by the
converter or fitted by the host (:func:`integer_codes`), in each warp whose 16 columns all have
an exact pair.

``zp + 0.5`` is formed once per program (exact while ``|zp| < 2^22``): for codes below 2^22,
adding 0.5 to a float whose ulp is at most 0.5 commutes with round-to-nearest, and at a power of
two both roundings land on it, so one fused rounding floors to the format's ``floor(fma + 0.5)``
(valid checkpoints have 15-bit codes). The group scale's nibble goes into the bf16 weight: one
rounding of the exact ``q * nib``, like the reference's one rounding of ``q * nib * super_scale``
(identical when ``|q * nib| <= 256``); the per-column ``super_scale`` multiplies the fp32
accumulator. So the wgmma accumulates the whole K range with no per-group partial sums.

**mma.sync instead of wgmma** (``MosaicConfig.mma = "sync"``, tiles of a few rows): the
decoded planes are, warp by warp, the A fragments of ``mma.sync.m16n8k16`` and the WGMMA
accumulator layout is its C layout, so each warp runs on its own (no wgmma descriptors, fences
or warpgroup waits; ``ldmatrix.x4`` reads x's fragments from the swizzled TMA tile). Each of a
K step's four 16-deep chunks is one scale group, so this path also moves the group scale out of
the weights: the planes are ``128 + w`` straight from the ``lop3`` (no bf16x2 fma, no nibble
expansion), every group accumulates its own fp32 partial sums ``P``, and ``acc += nib * (P -
160 X)`` with ``X`` x summed over the group (:func:`group_sums`). ``q * nib`` is then never
rounded to bf16: x = I reads back the format's ``bf16(q * nib * super_scale)`` exactly.
``planes="fp16"`` (the heuristic's choice at 8-row tiles; 300B at 1 token: up_gate 103 -> 91
µs, down 70 -> 59, ``results/NOTES.md`` §43): fp16 operands, whose 10-bit mantissa takes a
window at bit 0 or 3, so one shift cuts two planes (``_F16_PLANES``); x is scaled per row into
fp16's range (:func:`fp16_row_scales`, undone in the epilogue) and the x8 planes' columns by
1/8, its fp16 rounding stated with ``reduce_precision`` (:func:`fp16_plane_columns`, §44).

Tiles start at their expert's first row (``kernels.expert_tiles``, built together with x's
operands by one Triton launch, ``prologue.expert_operands``: x's rows are gathered so
that every expert begins a ``bm``-row block; an expert of up to ``bm`` rows costs one tile,
i.e. one decode of its weights, where the Triton kernel's fixed row blocks cost two for every
expert that straddles a block boundary). Program ``(t, j)`` (one warpgroup) computes ``64 *
col_blocks`` output columns (and their up-projection partners under SwiGLU) for x block t,
one fp32 accumulator per 64 columns, all fed by the same x tile, and stores the rows ``[row0,
hi)`` of its expert with per-element masked stores. The K loop is ``emit_pipeline`` (TMA into
shared memory, 2 stages: x tile, byte chunks, scale chunks; under mma.sync two K steps a
pipeline step, ``MosaicConfig.k_unroll``, so the TMA issue that runs in every warp and the
per-step barrier are paid once per 512 K rows, ``results/NOTES.md`` §50). Its schedule
(``SCHEDULES``): decode all 4 planes of a step, issue their wgmmas, wait; or cut planes one at
a time with one wgmma in flight (128 instead of 197 registers for the SwiGLU projection: 4
resident warpgroups an SM instead of 2). A K split (a third grid axis) stores fp32 partial sums
for the caller to add. Tile rows, stages, schedule, split, column blocks and K unroll come from
the device's tuned table (``config.MosaicConfig``, ``tuned/<device>.json`` section ``mosaic``)
or :func:`heuristic_config`.

**Why Mosaic GPU here** (measured on an H100, jax 0.11.2, ``results/NOTES.md`` §20-22, §33): the
same decode reaches 3.6 thread instructions per weight (ncu: 53 M warp instructions for the
1-token 300B up_gate; 3.4 on the mma.sync path, §38) against Triton's 7.2, and the 300B expert FFN
runs 1.6-3.6x faster than the
Triton kernel at 1-4096 tokens (the README's table, same runs); end to end (session 4) the 300B
decodes 42.8 -> 55.9 tok/s at batch 1 and 748 -> 867 at batch 64 (H200). Limits: bf16 x,
``K % 256 == 0``, ``N % 64 == 0`` (per shard under tensor parallelism, where each shard's bytes
are re-ordered on their own), a Hopper GPU. There is no CPU
interpreter for it (Mosaic GPU's is private and hangs on jax 0.10): CI checks the byte order,
the reference path, and that every configuration the GPU tests run lowers for CUDA (Mosaic GPU's
layout and shape checks run on a CPU); the kernel itself is tested on the GPU
(``tests/pallas_kernels/test_kernel_mosaic.py``). Its registers, shared memory and SASS can be
had without one: ``python -m pallas_kernels.offline`` compiles it through ptxas on a CPU host.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import MOSAIC_SCHEDULES, MosaicConfig, every_16_below, tuned_mosaic_config
from .reference import apply_epilogue

BLOCK_N = 64  # output columns per warpgroup (wgmma M)
BLOCK_K = 256  # K rows per pipeline step: 4 planes of 64 (one 128-byte swizzle row of x)
STEP_BYTES = BLOCK_N * BLOCK_K // 4  # 4096 packed bytes per (column block, K step)
_SHIFTS = (9, 6, 3, 0)  # code bits of planes 0..3
# Decode schedules, how much of a K step is decoded before its wgmmas are issued (live
# registers vs waits): "all" (every plane of both SwiGLU halves), "half" (one half's 4 planes,
# then wait), "one" (the code pairs once, then one plane at a time with one wgmma in flight).
# Picked per call by the tuned table or :func:`heuristic_config`; results/NOTES.md §21, §25.
SCHEDULES = MOSAIC_SCHEDULES


# --------------------------------------------------------------------------------------------
# Device layout (numpy/jnp, no GPU): a pure permutation of the packed bytes.
# --------------------------------------------------------------------------------------------


@functools.cache
def _byte_positions() -> tuple[np.ndarray, np.ndarray]:
    """``(p, n)`` of every byte of one 4 KiB fragment chunk (p: byte row in the step, n: column)."""
    f = np.arange(STEP_BYTES)
    half, t, word, byte = f // 2048, (f % 2048) // 16, (f % 16) // 4, f % 4
    warp, lane = t // 32, t % 32
    j, i, b = 4 * half + word, byte // 2, byte % 2  # k tile of 8 byte rows, row half, pair
    n = 16 * warp + lane // 4 + 8 * i
    p = 8 * j + 2 * (lane % 4) + b
    return p, n


@functools.cache
def _scale_positions() -> tuple[np.ndarray, np.ndarray]:
    """``(scale row in the step, n)`` of every byte of one 128-byte scale chunk.

    The 4 lanes of a quad share their rows, so the chunk holds one 4-byte word per quad
    ``(warp, lane // 4)``: bytes ``(row half i, scale row)``; each lane loads its quad's word.
    """
    f = np.arange(128)
    quad, byte = f // 4, f % 4
    i, srow = byte // 2, byte % 2
    return srow, 16 * (quad // 8) + quad % 8 + 8 * i


def _permute_blocks(a, rows: int, positions, *, inverse: bool = False):
    """Permute the bytes inside every ``[rows, 64]`` block of ``a [G, R, N]`` (same shape).

    Blocks are ordered (column block, row block), each flattened in ``positions`` order:
    ``out`` reshaped ``[G, N/64, R/rows, rows*64]`` holds ``a[g, rb*rows + p, nb*64 + n]`` at
    the index of ``(p, n)`` in ``positions``. ``inverse`` undoes it.
    """
    g, r, n = a.shape
    p, nn = positions
    xp = jnp if isinstance(a, jax.Array) else np
    order = p * BLOCK_N + nn
    if inverse:
        blocks = a.reshape(g, n // BLOCK_N, r // rows, rows * BLOCK_N)
        blocks = blocks[..., xp.asarray(np.argsort(order))]
        blocks = blocks.reshape(g, n // BLOCK_N, r // rows, rows, BLOCK_N)
        return blocks.transpose(0, 2, 3, 1, 4).reshape(g, r, n)
    blocks = a.reshape(g, r // rows, rows, n // BLOCK_N, BLOCK_N).transpose(0, 3, 1, 2, 4)
    blocks = blocks.reshape(g, n // BLOCK_N, r // rows, rows * BLOCK_N)[..., xp.asarray(order)]
    return blocks.reshape(g, r, n)


def fragment_weights(qw):
    """``[G, K/4, N]`` packed WINT2 bytes -> ``[G, N/64, K/256, 16, 256]`` fragment chunks."""
    g, kq, n = qw.shape
    _check_dims(4 * kq, n)
    return _permute_blocks(qw, 64, _byte_positions()).reshape(g, n // BLOCK_N, kq // 64, 16, 256)


def fragment_scales(ws):
    """``[G, K/128, N]`` scale bytes (two 64-row groups each) -> ``[G, N/64, K/256, 128]``."""
    g, k2, n = ws.shape
    _check_dims(128 * k2, n)
    return _permute_blocks(ws, 2, _scale_positions()).reshape(g, n // BLOCK_N, k2 // 2, 128)


def _check_dims(k: int, n: int) -> None:
    if k % BLOCK_K or n % BLOCK_N:
        raise NotImplementedError(
            f"the Mosaic WINT2 kernel needs K % {BLOCK_K} == 0 and N % {BLOCK_N} == 0, got "
            f"K={k}, N={n}")


# --------------------------------------------------------------------------------------------
# The kernel (Mosaic GPU; imported lazily: jax 0.10's Mosaic GPU API differs and CPUs lack it).
# --------------------------------------------------------------------------------------------

_CODE_ASM = """{{
.reg .b32 m;
mov.b32 m, 0x4B000000;
prmt.b32 m, $1, m, 0x765{byte};
sub.rn.f32 m, m, 0f4B000000;
fma.rn.f32 m, m, $2, $3;
add.rm.f32 $0, m, 0f4B000000;
}}"""

# The integer code step (``icodes``): per column ``A, B`` with ``code = (u A + B) >> 16`` for
# every byte u (``wint2.affine_codes``): the byte zero-extended, one 32-bit multiply-add, the code
# in the high half. 2 instructions a byte instead of 4 (results/NOTES.md §59, §60).
_ICODE_ASM = """{{
.reg .b32 u, z;
mov.b32 z, 0;
prmt.b32 u, $1, z, 0x444{byte};
mad.lo.u32 $0, u, $2, $3;
}}"""

# Two codes, one register: the float step leaves each code in its low half, the integer step in
# its high half.
_PAIR_ASM = {False: "prmt.b32 $0, $1, $2, 0x5410;", True: "prmt.b32 $0, $1, $2, 0x7632;"}

# A warp's columns all have an exact integer step (A != 0 marks one), else the warp takes the
# float step: ``$0 = A0`` if every lane's two columns have one, else 0 (warp-uniform).
_ICODE_WARP_ASM = """{
.reg .pred p, q;
setp.ne.s32 p, $1, 0;
setp.ne.and.s32 p, $2, 0, p;
vote.sync.all.pred q, p, 0xffffffff;
selp.b32 $0, $1, 0, q;
}"""

_PLANES_ASM = """{
.reg .b32 w, msk, mgh;
mov.b32 msk, 0x003F003F; mov.b32 mgh, 0x43004300;
shr.b32 w, $4, 9; lop3.b32 w, w, msk, mgh, 0xEA; fma.rn.bf16x2 $0, w, $5, $6;
shr.b32 w, $4, 6; lop3.b32 w, w, msk, mgh, 0xEA; fma.rn.bf16x2 $1, w, $5, $6;
shr.b32 w, $4, 3; lop3.b32 w, w, msk, mgh, 0xEA; fma.rn.bf16x2 $2, w, $5, $6;
lop3.b32 w, $4, msk, mgh, 0xEA; fma.rn.bf16x2 $3, w, $5, $6;
}"""

# The planes without the group scale: bf16 128 + w (the mma.sync path scales each group's fp32
# partial sums instead).
_RAW_PLANES_ASM = """{
.reg .b32 w, msk, mgh;
mov.b32 msk, 0x003F003F; mov.b32 mgh, 0x43004300;
shr.b32 w, $4, 9; lop3.b32 $0, w, msk, mgh, 0xEA;
shr.b32 w, $4, 6; lop3.b32 $1, w, msk, mgh, 0xEA;
shr.b32 w, $4, 3; lop3.b32 $2, w, msk, mgh, 0xEA;
lop3.b32 $3, $4, msk, mgh, 0xEA;
}"""

# fp16 planes (mma.sync path, ``planes="fp16"``): under fp16's 0x6400 (1024, ulp 1) the 10-bit
# mantissa takes a window at bit 0 (1024 + w) or at bit 3 (1024 + 8w; x's columns of those planes
# come pre-scaled by 1/8), so one shift by 6 serves planes 0 and 1 and planes 2 and 3 need none.
_F16_PLANES = ((6, 0x01F801F8), (6, 0x003F003F), (0, 0x01F801F8), (0, 0x003F003F))  # shift, mask
_F16_X_SCALE = (0.125, 1.0, 0.125, 1.0)  # x's columns of planes 0..3
_RAW_PLANES_F16_ASM = """{
.reg .b32 w, m1, m8, mg;
mov.b32 m1, 0x003F003F; mov.b32 m8, 0x01F801F8; mov.b32 mg, 0x64006400;
shr.b32 w, $4, 6;
lop3.b32 $0, w, m8, mg, 0xEA;
lop3.b32 $1, w, m1, mg, 0xEA;
lop3.b32 $2, $4, m8, mg, 0xEA;
lop3.b32 $3, $4, m1, mg, 0xEA;
}"""

# One plane without the group scale: ``(w >> shift) & mask | magic`` (bf16: mask 0x003F003F under
# 0x4300, 128 + w; fp16: ``_F16_PLANES`` under 0x6400).
_RAW_PLANE_ASM = """{{
.reg .b32 w, msk, mgh;
mov.b32 msk, {mask}; mov.b32 mgh, {magic};
{shift}lop3.b32 $0, w, msk, mgh, 0xEA;
}}"""

_PLANE_ASM = """{{
.reg .b32 w, msk, mgh;
mov.b32 msk, 0x003F003F; mov.b32 mgh, 0x43004300;
{shift}lop3.b32 w, w, msk, mgh, 0xEA; fma.rn.bf16x2 $0, w, $2, $3;
}}"""

# One scale byte -> (nib, nib) and (-160 nib, -160 nib) as bf16x2, for the high and low nibble.
_NIB_ASM = """{{
.reg .b32 v, x, z, msk, mgh, one, m128, m160, k;
mov.b32 z, 0; mov.b32 msk, 0x000F000F; mov.b32 mgh, 0x43004300; mov.b32 one, 0x3F803F80;
mov.b32 m128, 0xC300C300; mov.b32 m160, 0xC320C320; mov.b32 k, 0x46A046A0;
prmt.b32 v, $4, z, 0x4{byte}4{byte};
shr.b32 x, v, 4; lop3.b32 x, x, msk, mgh, 0xEA;
fma.rn.bf16x2 $0, x, one, m128; fma.rn.bf16x2 $1, x, m160, k;
lop3.b32 x, v, msk, mgh, 0xEA;
fma.rn.bf16x2 $2, x, one, m128; fma.rn.bf16x2 $3, x, m160, k;
}}"""


# A scale nibble as an f32 without a conversion instruction (the mma.sync path's group scaling):
# ``(w >> shift) & 15 | 0x4B000000`` is the float 2^23 + nib, exactly; the caller subtracts 2^23
# on the FMA pipe, where ``cvt.rn.f32.u32`` (I2FP) would take the ALU pipe, the 1-token kernels'
# busiest unit (results/NOTES.md §76).
_NIB_F32_ASM = """{{
.reg .b32 t, m, g;
mov.b32 m, 15; mov.b32 g, 0x4B000000;
shr.b32 t, $1, {shift};
lop3.b32 $0, t, m, g, 0xEA;
}}"""


def _mgpu():
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, vector
    from jax._src.lib.mlir.dialects import math as mlir_math
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu

    return ir, arith, gpu, llvm, memref, vector, mlir_math, mgpu, fa, mu


def _thread_rows():
    """``(tid, lane, r)`` as i32: thread in the warpgroup, lane, and its first fragment row
    ``16 * warp + lane // 4`` (the second is ``r + 8``)."""
    ir, arith, gpu, *_, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    tid = arith.remui(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), mu.c(128, i32))
    lane = arith.remui(tid, mu.c(32, i32))
    r = arith.addi(arith.muli(arith.divui(tid, mu.c(32, i32)), mu.c(16, i32)),
                   arith.divui(lane, mu.c(4, i32)))
    return tid, lane, r


def _asm(llvm, ir, text, constraints, args, n_out):
    i32 = ir.IntegerType.get_signless(32)
    if n_out == 1:
        return [llvm.inline_asm(i32, args, text, constraints, has_side_effects=False)]
    struct = llvm.inline_asm(llvm.StructType.get_literal([i32] * n_out), args, text, constraints,
                             has_side_effects=False)
    return [llvm.extractvalue(i32, struct, [k]) for k in range(n_out)]


def _scale_word(s_smem, tid):
    """Inside ``inline_mgpu``: the 32-bit scale word of thread ``tid``'s quad in a step's scale
    chunk (:func:`fragment_scales`): byte ``2 i + srow`` = (row half i, scale row srow)."""
    ir, arith, gpu, llvm, memref, vector, *_, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    soff = arith.muli(arith.divui(tid, mu.c(4, i32)), mu.c(4, i32))
    sv = vector.load(ir.VectorType.get((4,), ir.IntegerType.get_signless(8)), s_smem,
                     [arith.index_cast(ir.IndexType.get(), soff)])
    return vector.extract(vector.bitcast(ir.VectorType.get((1,), i32), sv),
                          dynamic_position=[], static_position=[0])


def _code_pairs(words, consts, iconsts):
    """Inside ``inline_mgpu``: the 16 code pairs (i32) of a thread's 8 byte words, word-major.

    ``iconsts`` (the integer step's ``A0, A1, B0, B1``, :func:`_iconsts_regs`) or None: the
    float step only. With it, a warp whose columns all have an exact integer step
    (:func:`_iconsts_regs` zeroed ``A0`` otherwise) takes it, the others the float step: one
    warp-uniform branch a K step.
    """
    ir, arith, gpu, llvm, memref, vector, *_ = _mgpu()
    from jax._src.lib.mlir.dialects import scf

    i32 = ir.IntegerType.get_signless(32)

    def regs(arr):
        [v] = arr.registers.flat  # vector<4xf32>
        return [vector.extract(v, dynamic_position=[], static_position=[i]) for i in range(4)]

    def pairs(integer: bool):
        c = regs(iconsts if integer else consts)
        if integer:
            c = [arith.bitcast(i32, v) for v in c]
        text, cons = (_ICODE_ASM, "=r,r,r,r") if integer else (_CODE_ASM, "=r,r,f,f")
        out = []
        for w in words:
            codes = [_asm(llvm, ir, text.format(byte=b), cons, [w, c[b // 2], c[2 + b // 2]],
                          1)[0] for b in range(4)]
            out += [_asm(llvm, ir, _PAIR_ASM[integer], "=r,r,r", codes[2 * i:2 * i + 2], 1)[0]
                    for i in range(2)]
        return out

    if iconsts is None:
        return pairs(False)
    a0 = arith.bitcast(i32, regs(iconsts)[0])
    # the keyword was renamed across MLIR's Python bindings (jaxlib 0.10: has_else)
    has_else = "has_else" if "has_else" in inspect.signature(scf.IfOp).parameters else "hasElse"
    branch = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ne, a0, arith.constant(i32, 0)),
                      [i32] * 2 * len(words), **{has_else: True})
    for block, integer in ((branch.then_block, True), (branch.else_block, False)):
        with ir.InsertionPoint(block):
            scf.YieldOp(pairs(integer))
    return list(branch.results)


def _decode_step(q_smem, s_smem, consts, iconsts=None, *, pairs_only: bool = False,
                 raw: bool = False, fp16: bool = False):
    """Inside ``inline_mgpu``: one K step's 4 planes ``[64, 64]`` bf16 in the WGMMA layout.

    ``pairs_only``: instead, the code pairs and the nibble factors (three ``[64, 64]`` arrays in
    the same layout, bf16 bit patterns) from which :func:`_plane` cuts each plane. ``raw``:
    planes of ``128 + w`` without the group scale (``s_smem`` unused), or only the pairs;
    ``fp16`` (with ``raw``): fp16 planes ``1024 + w`` / ``1024 + 8 w`` (``_F16_PLANES``).
    ``iconsts``: the integer code step where a warp's columns have it (:func:`_code_pairs`).
    """
    ir, arith, gpu, llvm, memref, vector, _, mgpu, fa, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    i8 = ir.IntegerType.get_signless(8)
    index = ir.IndexType.get()
    bf16x2 = ir.VectorType.get((2,), (ir.F16Type if fp16 else ir.BF16Type).get())
    tid, _, _ = _thread_rows()

    def idx(v):
        return arith.index_cast(index, v)

    nib = {}  # (i, group q) -> (nib2, k2)
    sword = None if raw else _scale_word(s_smem, tid)
    for i in range(0 if raw else 2):
        for srow in range(2):
            hi2, hik, lo2, lok = _asm(llvm, ir, _NIB_ASM.format(byte=2 * i + srow),
                                      "=r,=r,=r,=r,r", [sword], 4)
            nib[(i, 2 * srow)] = (hi2, hik)
            nib[(i, 2 * srow + 1)] = (lo2, lok)

    words = []  # word j = 4 * half + word: byte columns 8j.. of rows (r, r + 8)
    for half in range(2):
        row = arith.addi(mu.c(8 * half, i32), arith.divui(tid, mu.c(16, i32)))
        col = arith.muli(arith.remui(tid, mu.c(16, i32)), mu.c(16, i32))
        v = vector.load(ir.VectorType.get((16,), i8), q_smem, [idx(row), idx(col)])
        vw = vector.bitcast(ir.VectorType.get((4,), i32), v)
        words += [vector.extract(vw, dynamic_position=[], static_position=[k]) for k in range(4)]
    code_pairs = _code_pairs(words, consts, iconsts)

    regs = [np.empty((1, 8, 1, 1, 2, 1, 1, 1, 1), dtype=object) for _ in range(4)]
    for j, i in itertools.product(range(8), range(2)):
        at = (0, j, 0, 0, i, 0, 0, 0, 0)
        pair = code_pairs[2 * j + i]
        nib_i = () if raw else nib[(i, j // 2)]  # (nib, -160 nib) of the group
        if pairs_only:  # the planes are cut later, one at a time
            for r, v in zip(regs, (pair, *nib_i), strict=False):
                r[at] = mu.bitcast(v, bf16x2)
            continue
        if raw:
            outs = _asm(llvm, ir, _RAW_PLANES_F16_ASM if fp16 else _RAW_PLANES_ASM,
                        "=r,=r,=r,=r,r", [pair], 4)
        else:
            outs = _asm(llvm, ir, _PLANES_ASM, "=r,=r,=r,=r,r,r,r", [pair, *nib_i], 4)
        for plane, o in enumerate(outs):
            regs[plane][at] = mu.bitcast(o, bf16x2)
    count = (1 if raw else 3) if pairs_only else 4
    return [fa.FragmentedArray(_registers=r, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
            for r in regs[:count]]


def _plane(pairs, nib2, k2, shift: int, *, fp16: bool = False):
    """Inside ``inline_mgpu``: plane ``shift`` of the code pairs: ``bf16(q * nib)`` bf16x2, or
    ``128 + w`` without the nibble factors (``nib2 is None``), or (``fp16``) the fp16 plane."""
    ir, arith, gpu, llvm, memref, vector, _, mgpu, fa, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    bf16x2 = ir.VectorType.get((2,), (ir.F16Type if fp16 else ir.BF16Type).get())
    raw = nib2 is None
    pre, mask, magic = (*_F16_PLANES[_SHIFTS.index(shift)], 0x64006400) if fp16 else \
        (shift, 0x003F003F, 0x43004300)
    text = (_RAW_PLANE_ASM if raw else _PLANE_ASM).format(
        shift=f"shr.b32 w, $1, {pre}; " if pre else "mov.b32 w, $1; ",
        mask=f"0x{mask:08X}", magic=f"0x{magic:08X}")
    out = np.empty_like(pairs.registers)
    for at in np.ndindex(out.shape):
        args = [mu.bitcast(a.registers[at], i32) for a in ((pairs,) if raw else (pairs, nib2, k2))]
        [v] = _asm(llvm, ir, text, "=r,r" if raw else "=r,r,r,r", args, 1)
        out[at] = mu.bitcast(v, bf16x2)
    return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


_LDSM_ASM = "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{$0, $1, $2, $3}}, [$4+{offset}];"
_MMA_ASM = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")


def _zero_acc(bm: int):
    """Inside ``inline_mgpu``: a zero fp32 ``[64, bm]`` WGMMA-layout array (registers built
    with ``vector.from_elements``: a splat's ``vector.broadcast`` trips the layout inference)."""
    ir, arith, gpu, llvm, memref, vector, _, mgpu, fa, mu = _mgpu()
    f32 = ir.F32Type.get()
    zero = arith.constant(f32, 0.0)
    regs = np.empty((1, bm // 8, 1, 1, 2, 1, 1, 1, 1), dtype=object)
    for at in np.ndindex(regs.shape):
        regs[at] = vector.from_elements(ir.VectorType.get((2,), f32), [zero, zero])
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _mma_sync(accs, a_t, x_ref, plane: int):
    """Inside ``inline_mgpu``: ``accs[c] + a_t[:, 16c:16c+16] @ x[:, chunk c of plane]^T`` by
    per-warp ``mma.sync`` m16n8k16, for the four 16-deep K chunks ``c`` of the plane (chunk c
    holds byte rows 16c..16c+15 of the step: scale group c).

    ``accs`` fp32 ``[64, bm]`` and ``a_t`` bf16 ``[64, 64]`` in the WGMMA layout, which is, warp
    by warp, exactly the m16n8k16 accumulator and A fragments (warp w: rows 16w..16w+15).
    ``x_ref``: the pipeline step's x tile in shared memory, ``[bm, 256 u]`` bf16 as TMA wrote
    it (8 x 64 tiles of 1 KiB, 16-byte chunks of each 128-byte row swizzled by ``chunk ^ row %
    8``); ``plane``: the 64-column plane of it, ``4 s + t`` for plane t of K step s.
    Each ``ldmatrix.x4`` gives a thread its B fragments (x rows ``8 jj + lane // 4``, two
    consecutive K values a register) of two 16-deep K chunks of one 8-row tile.
    """
    ir, arith, gpu, llvm, memref, vector, _, mgpu, fa, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    shape = tuple(ir.MemRefType(x_ref.type).shape)
    bm = accs[0].shape[1]
    if shape[0] != bm // 8 or shape[2:] != (8, 64) or shape[1] % (BLOCK_K // 64):
        raise NotImplementedError(f"unexpected x tile in shared memory: {shape}")
    _, lane, _ = _thread_rows()
    row, quad = arith.remui(lane, mu.c(8, i32)), arith.divui(lane, mu.c(8, i32))
    base = llvm.ptrtoint(i32, mu.memref_ptr(x_ref))
    # Thread l addresses row l % 8 of matrix l // 8 = (K chunk, half) of the x4 load; the
    # second x4 (K chunks 2, 3) is 64 bytes on, i.e. chunk index ^ 4 under the swizzle.
    chunk = arith.muli(arith.xori(quad, row), mu.c(16, i32))
    addr = [arith.addi(base, arith.addi(arith.muli(row, mu.c(128, i32)), c))
            for c in (chunk, arith.xori(chunk, mu.c(64, i32)))]
    a = {at: mu.bitcast(a_t.registers[at], i32) for at in np.ndindex(a_t.registers.shape)}
    mma_asm = _MMA_ASM.replace(".bf16.bf16", ".f16.f16") if a_t.mlir_dtype == ir.F16Type.get() \
        else _MMA_ASM
    outs = [np.empty_like(acc.registers) for acc in accs]
    for jj in range(bm // 8):
        cs = [[vector.extract(acc.registers[0, jj, 0, 0, i, 0, 0, 0, 0], dynamic_position=[],
                              static_position=[e]) for i in range(2) for e in range(2)]
              for acc in accs]
        for half in range(2):
            offset = (jj * shape[1] + plane) * 1024  # the (rows, plane) 8 x 64 tile
            b = llvm.inline_asm(llvm.StructType.get_literal([i32] * 4), [addr[half]],
                                _LDSM_ASM.format(offset=offset), "=r,=r,=r,=r,r",
                                has_side_effects=True)  # ordered after the TMA wait
            b = [llvm.extractvalue(i32, b, [q]) for q in range(4)]
            for kc in range(2):
                h = 2 * half + kc  # the K chunk, i.e. the scale group and its accumulator
                j = 2 * h  # 8-deep K tiles j, j + 1 of this 16-deep chunk
                args = [a[(0, j, 0, 0, 0, 0, 0, 0, 0)], a[(0, j, 0, 0, 1, 0, 0, 0, 0)],
                        a[(0, j + 1, 0, 0, 0, 0, 0, 0, 0)], a[(0, j + 1, 0, 0, 1, 0, 0, 0, 0)],
                        b[2 * kc], b[2 * kc + 1], *cs[h]]
                d = llvm.inline_asm(llvm.StructType.get_literal([f32] * 4), args, mma_asm,
                                    "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False)
                cs[h] = [llvm.extractvalue(f32, d, [q]) for q in range(4)]
        for out, c in zip(outs, cs, strict=True):
            for i in range(2):
                out[0, jj, 0, 0, i, 0, 0, 0, 0] = vector.from_elements(
                    ir.VectorType.get((2,), f32), c[2 * i:2 * i + 2])
    return [fa.FragmentedArray(_registers=o, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
            for o in outs]


def _apply_groups(acc, parts, s_smem, xg_ref, col0: int = 0):
    """Inside ``inline_mgpu``: ``acc + sum_c nib_c * (parts[c] - 160 X_c)``, the step's four scale
    groups (mma.sync path).

    ``parts[c]`` fp32 ``[64, bm]`` (WGMMA layout): ``x @ (128 + w)`` over group c's 64 K rows,
    exact products; ``xg_ref`` the tile's ``[bm, 4]`` fp32 ``160 X`` (X: x summed over each
    group's 64 K rows), so ``parts[c] - 160 X_c = x @ q`` and the group's nibble multiplies it
    in fp32 (no bf16 rounding of ``q * nib``: one rounding of ``q * nib * super_scale``, the
    format's, at the output). ``s_smem``: the step's 128-byte scale chunk (:func:`fragment_scales`);
    ``col0``: the step's first column of ``xg_ref`` (``[bm, 4 u]`` for ``u`` steps a stage).
    """
    ir, arith, gpu, llvm, memref, vector, mlir_math, mgpu, fa, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    index = ir.IndexType.get()
    tid, lane, _ = _thread_rows()
    bm = acc.shape[1]
    sword = _scale_word(s_smem, tid)
    two23 = arith.constant(f32, 2.0**23)

    def nibble(shift):  # (w >> shift) & 15 as f32: 2^23 + nib from one lop3, less 2^23
        [bits] = _asm(llvm, ir, _NIB_F32_ASM.format(shift=shift), "=r,r", [sword], 1)
        return arith.subf(arith.bitcast(f32, bits), two23)

    # byte (row half i, scale row c // 2): high nibble group 2 * (c // 2), low nibble the next
    nib = [[nibble(8 * (2 * i + c // 2) + (0 if c % 2 else 4)) for c in range(4)]
           for i in range(2)]
    c2 = arith.muli(arith.remui(lane, mu.c(4, i32)), mu.c(2, i32))
    out = np.empty_like(acc.registers)
    for jj in range(bm // 8):
        xg = []
        for e in range(2):  # the thread's token columns 8 jj + c2 + e: 160 X of the 4 groups
            m = arith.index_cast(index, arith.addi(c2, mu.c(8 * jj + e, i32)))
            v = vector.load(ir.VectorType.get((4,), f32), xg_ref, [m, arith.constant(index, col0)])
            xg.append([vector.extract(v, dynamic_position=[], static_position=[c])
                       for c in range(4)])
        for i in range(2):
            vals = []
            for e in range(2):
                y = vector.extract(acc.registers[0, jj, 0, 0, i, 0, 0, 0, 0],
                                   dynamic_position=[], static_position=[e])
                for c in range(4):
                    p = vector.extract(parts[c].registers[0, jj, 0, 0, i, 0, 0, 0, 0],
                                       dynamic_position=[], static_position=[e])
                    y = mlir_math.fma(nib[i][c], arith.subf(p, xg[e][c]), y)
                vals.append(y)
            out[0, jj, 0, 0, i, 0, 0, 0, 0] = vector.from_elements(
                ir.VectorType.get((2,), f32), vals)
    return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _column_pairs(refs):
    """Inside ``inline_mgpu``: each ref's values at thread t's two rows n, n + 8 (a warpgroup's
    64 columns: the wgmma A fragment's rows), ref by ref."""
    ir, arith, gpu, llvm, memref, *_, mu = _mgpu()
    _, _, r = _thread_rows()
    rows = [r, arith.addi(r, mu.c(8, ir.IntegerType.get_signless(32)))]
    return [memref.load(ref, [arith.index_cast(ir.IndexType.get(), n)]) for ref in refs
            for n in rows]


def _thread_vector(vals):
    """Inside ``inline_mgpu``: four f32 values a thread as a WG_STRIDED ``[512]`` array."""
    ir, *_, fa, _ = _mgpu()
    from jax._src.lib.mlir.dialects import vector

    vec = vector.from_elements(ir.VectorType.get((4,), ir.F32Type.get()), vals)
    return fa.FragmentedArray(_registers=np.array([vec], dtype=object),
                              _layout=fa.WGStridedFragLayout((512,), 4), _is_signed=None)


def _consts_regs(cs_ref, zp_ref):
    """Inside ``inline_mgpu``: thread t's ``(cs, cs, zp + 0.5, zp + 0.5)`` of rows n, n + 8."""
    ir, arith, *_ = _mgpu()
    vals = _column_pairs((cs_ref, zp_ref))
    half = arith.constant(ir.F32Type.get(), 0.5)
    vals[2:] = [arith.addf(v, half) for v in vals[2:]]  # zp + 0.5: exact (|zp| < 2^22)
    return _thread_vector(vals)


def _store_tile(accs, ss_refs, rs_ref, out_ref, row0_ref, hi_ref, *, bm: int,
                swiglu: bool, inv_ref=None):
    """Inside ``inline_mgpu``: scale, activate and store rows ``[row0, hi)`` of the transposed tile.

    ``accs``: fp32 ``[64, bm]`` WGMMA-layout accumulators (one, or gate and up; none: a padding
    tile, zeros); element (n, m) goes to ``out[row0 + m, n]`` (``out`` is the program's 64
    columns); ``ss_refs`` the per-column super scales of each accumulator; ``inv_ref`` (fp16
    planes) the per-row inverse of x's scale, applied before the activation.
    """
    ir, arith, gpu, llvm, memref, vector, mlir_math, mgpu, fa, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    bf16 = ir.BF16Type.get()
    index = ir.IndexType.get()
    _, lane, r = _thread_rows()
    c2 = arith.muli(arith.remui(lane, mu.c(4, i32)), mu.c(2, i32))
    load0 = lambda ref: memref.load(ref, [arith.constant(index, 0)])  # noqa: E731
    row0, hi = load0(row0_ref), load0(hi_ref)
    last = arith.subi(hi, mu.c(1, i32))  # per-row loads clamped: rows past hi are never stored
    for i in range(2):
        n = arith.addi(r, mu.c(8 * i, i32))
        ss = [memref.load(ref, [arith.index_cast(index, n)]) for ref in ss_refs]
        for jj in range(bm // 8):
            for e in range(2):
                m = arith.addi(row0, arith.addi(mu.c(8 * jj + e, i32), c2))
                m_in = arith.index_cast(index, arith.minsi(m, last))
                if not accs:
                    y = arith.constant(f32, 0.0)
                else:
                    vals = [vector.extract(a.registers[0, jj, 0, 0, i, 0, 0, 0, 0],
                                           dynamic_position=[], static_position=[e])
                            for a in accs]
                    vals = [arith.mulf(v, s) for v, s in zip(vals, ss, strict=True)]
                    if inv_ref is not None:
                        vals = [arith.mulf(v, memref.load(inv_ref, [m_in])) for v in vals]
                    if swiglu:
                        g, u = vals
                        one = arith.constant(f32, 1.0)
                        sig = arith.divf(one, arith.addf(one, mlir_math.exp(arith.negf(g))))
                        y = arith.mulf(arith.mulf(g, sig), u)
                    else:
                        y = vals[0]
                    if rs_ref is not None:
                        y = arith.mulf(y, memref.load(rs_ref, [m_in]))
                with mu.when(arith.cmpi(arith.CmpIPredicate.slt, m, hi)):
                    memref.store(arith.truncf(bf16, y) if out_ref.type.element_type == bf16
                                 else y, out_ref,
                                 [arith.index_cast(index, m), arith.index_cast(index, n)])


def _iconsts_regs(ca_ref, cb_ref):
    """Inside ``inline_mgpu``: thread t's integer code step ``(A0, A1, B0, B1)`` of rows n, n + 8
    (bit patterns in an f32 vector, like :func:`_consts_regs`), ``A0`` zeroed unless every
    column of the thread's warp has an exact one (``A != 0``; ``_ICODE_WARP_ASM``)."""
    ir, arith, gpu, llvm, *_ = _mgpu()
    a0, a1, b0, b1 = _column_pairs((ca_ref, cb_ref))
    [a0] = _asm(llvm, ir, _ICODE_WARP_ASM, "=r,r,r", [a0, a1], 1)
    return _thread_vector([arith.bitcast(ir.F32Type.get(), v) for v in (a0, a1, b0, b1)])


def grouped_matmul(x_planes, qwf, wsf, ss, cs, zp, tiles, row_scale, *, activation, out_dtype,
                   config: MosaicConfig, m_out: int | None = None, row_inv=None, sums=None,
                   icodes=None):
    """Run the Mosaic kernel on plane-permuted x (``bk = 256``) and fragment weights.

    ``tiles``: ``(group, row0, hi)`` int32 ``[T]`` (``kernels.expert_tiles``): tile t reads
    the ``config.block_m`` rows of x block ``t`` and writes output rows ``[row0, hi)``.
    ``m_out``: the output's rows (default: x's).
    ``qwf [G, N/64, K/256, 16, 256]`` / ``wsf [G, N/64, K/256, 128]``: :func:`fragment_weights`,
    :func:`fragment_scales`; ``ss, cs, zp`` fp32 ``[G, N]``. Tiles of group ``>= G``: padding.
    ``split_k > 1``: programs ``s`` of a third grid axis take K steps ``[s, s + 1) * K/256/split_k``
    and store their super-scaled fp32 partial sums ``[split_k, m_out, N]`` (no epilogue: the caller
    adds them and applies it). ``col_blocks``: 64-column output blocks per program (each with its
    own accumulators), which share the program's x tile: x is read from L2 once per ``64 *
    col_blocks`` columns instead of once per 64. ``mma == "sync"``: per-warp ``mma.sync`` with
    fp32 scale groups; x's group sums (``sums``, :func:`group_sums`) ride along as a pipelined
    input. ``config.tails`` (wgmma): a tile of fewer rows (an expert's last) runs as the
    smallest of those heights that holds them, its wgmmas reading only that many rows of the
    x stage (one code path a height; ``results/NOTES.md`` §69).
    ``planes == "fp16"``: ``x_planes`` fp16 from :func:`fp16_row_scales` and
    :func:`fp16_plane_columns`, ``row_inv`` fp32 ``[m_out]`` the inverse row scales.
    ``icodes``: ``(A, B)`` int32 ``[G, N]`` (:func:`integer_codes`): each warp (16 columns) whose
    columns all have an exact integer code step takes it instead of the float one.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    block_m, stages, schedule = config.block_m, config.stages, config.schedule
    split_k, col_blocks, mma = config.split_k, config.col_blocks, config.mma
    unroll = config.k_unroll
    fp16 = config.planes == "fp16"
    if fp16 and (x_planes.dtype != jnp.float16 or row_inv is None):
        raise ValueError("planes='fp16' takes fp16 x_planes and the rows' inverse scales")
    if (sums is None) != (mma != "sync"):
        raise ValueError("mma='sync' takes x's group sums (group_sums), wgmma none")
    m, k = x_planes.shape
    num_groups, nblk, ksteps = qwf.shape[:3]
    n = nblk * BLOCK_N
    swiglu = activation == "swiglu"
    n_out = n // 2 if swiglu else n
    if k != ksteps * BLOCK_K:
        raise ValueError(f"x has K={k}, the weights {ksteps * BLOCK_K}")
    if m % block_m:
        raise NotImplementedError(f"x rows ({m}) must be padded to a multiple of {block_m}")
    if ksteps % split_k:
        raise NotImplementedError(f"K/256 = {ksteps} K steps must divide into split_k={split_k}")
    split = split_k > 1
    ksteps_s = ksteps // split_k
    if ksteps_s % unroll:
        raise NotImplementedError(f"K/256/split_k = {ksteps_s} K steps must divide into "
                                  f"k_unroll={unroll}")
    psteps = ksteps_s // unroll  # pipeline steps of a program
    if (n_out // BLOCK_N) % col_blocks:
        raise NotImplementedError(f"N_out/64 = {n_out // BLOCK_N} column blocks must divide into "
                                  f"col_blocks={col_blocks}")
    grp, row0_t, hi_t = tiles
    m_out = m if m_out is None else m_out
    num_tiles = grp.shape[0]
    out_blocks = n_out // BLOCK_N
    halves = 2 if swiglu else 1
    has_rs = row_scale is not None
    integer = icodes is not None
    f32 = jnp.float32
    consts_layout = plgpu.Layout.WG_STRIDED((512,), vec_size=4)
    plane_type = plgpu.ShapeDtypeStruct((64, 64), jnp.float16 if fp16 else jnp.bfloat16,
                                        layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((512,), f32, layout=consts_layout))
    def load_consts(_, cs_ref, zp_ref):
        return _consts_regs(cs_ref, zp_ref)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((512,), f32, layout=consts_layout))
    def load_iconsts(_, ca_ref, cb_ref):
        return _iconsts_regs(ca_ref, cb_ref)

    def decode(*, pairs_only: bool, raw: bool):
        """A K step's planes (or code pairs [+ nibble factors]); ``raw``: without the nibble."""
        count = (1 if raw else 3) if pairs_only else 4

        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(),
                                      *(consts_layout,) * (2 if integer else 1)),
                           return_type=[plane_type] * count)
        def dec(_, q_ref, s_ref, *consts):
            return _decode_step(q_ref, s_ref, *consts, pairs_only=pairs_only, raw=raw,
                                fp16=fp16)
        return dec

    def cut_plane(shift, *, raw: bool):
        @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * (1 if raw else 3),
                           return_type=plane_type)
        def cut(_, pairs, *nib):
            return _plane(pairs, *(nib or (None, None)), shift, fp16=fp16)
        return cut

    x_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    acc_type = plgpu.ShapeDtypeStruct((BLOCK_N, block_m), f32, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(return_type=acc_type)
    def zero_acc(_):
        return _zero_acc(block_m)

    def mma_sync(plane):
        @plgpu.inline_mgpu(arg_types=((plgpu.Layout.WGMMA,) * 4, plgpu.Layout.WGMMA,
                                      plgpu.RefType(transforms=x_transforms)),
                           return_type=[acc_type] * 4)
        def mma(_, accs, a_t, x_smem):
            return _mma_sync(accs, a_t, x_smem, plane)
        return mma

    def apply_groups(sub):
        @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, (plgpu.Layout.WGMMA,) * 4,
                                      plgpu.RefType(), plgpu.RefType()),
                           return_type=acc_type)
        def apply(_, acc, parts, s_ref, xg_ref):
            return _apply_groups(acc, parts, s_ref, xg_ref, col0=4 * sub)
        return apply

    @plgpu.inline_mgpu()
    def warpgroup_barrier(_):
        _mgpu()[-1].warpgroup_barrier()

    def store(accs, ss_refs, rs_ref, out_ref, row0_ref, hi_ref, *, act=swiglu, inv_ref=None,
              bm=block_m):
        na, ns = len(accs), len(ss_refs)
        extra = [r for r in (rs_ref, inv_ref) if r is not None]
        arg_types = (plgpu.Layout.WGMMA,) * na + (plgpu.RefType(),) * (ns + 3 + len(extra))

        @plgpu.inline_mgpu(arg_types=arg_types)
        def _store(_, *args):
            accs, ss_r, (o_r, r0_r, hi_r, *ex) = args[:na], args[na:na + ns], args[na + ns:]
            rs_r = ex.pop(0) if rs_ref is not None else None
            inv_r = ex.pop(0) if inv_ref is not None else None
            _store_tile(accs, ss_r, rs_r, o_r, r0_r, hi_r, bm=bm, swiglu=act, inv_ref=inv_r)

        _store(*accs, *ss_refs, out_ref, row0_ref, hi_ref, *extra)

    def wint2_fragments_matmul(grp_ref, row0_ref, hi_ref, x_ref, qw_ref, ws_ref, ss_ref, cs_ref,
                               zp_ref, *rest):
        *rest, out_ref = rest
        inv_ref = rest.pop() if fp16 else None
        xg_ref = rest.pop() if mma == "sync" else None
        rs_ref = rest.pop() if has_rs else None
        ca_ref, cb_ref = rest if integer else (None, None)
        jn = jax.lax.axis_index("n")
        t = jax.lax.axis_index("t")
        k0 = jax.lax.axis_index("s") * psteps if split else 0  # in pipeline steps
        g, row0, hi = grp_ref[t], row0_ref[t], hi_ref[t]
        tile = pl.ds(t, 1)
        obs = [col_blocks * jn + i for i in range(col_blocks)]  # the program's output blocks
        nbs = [ob + h * out_blocks for ob in obs for h in range(halves)]  # weight blocks / accs
        if split:  # each accumulator's partial sums to its own columns of out[s]
            s_out = out_ref.at[jax.lax.axis_index("s")]
            targets = [(s_out.at[:, pl.ds(nb * BLOCK_N, BLOCK_N)], [i])
                       for i, nb in enumerate(nbs)]
        else:  # (gate, up) or the one accumulator of each output block
            targets = [(out_ref.at[:, pl.ds(ob * BLOCK_N, BLOCK_N)],
                        list(range(j * halves, (j + 1) * halves))) for j, ob in enumerate(obs)]

        def store_tile(vals, ss_refs, bm=block_m):  # vals == []: a padding tile, zeros
            for cols, idx in targets:
                store([vals[i] for i in idx] if vals else [],
                      [ss_refs[i] for i in idx] if vals else [], None if split else rs_ref,
                      cols, row0_ref.at[tile], hi_ref.at[tile], act=swiglu and not split,
                      inv_ref=inv_ref if vals else None, bm=bm)

        @pl.when((hi > row0) & (g < num_groups))
        def _compute():
            def cols(ref, nb):
                return ref.at[g, pl.ds(nb * BLOCK_N, BLOCK_N)]

            consts = [(load_consts(cols(cs_ref, nb), cols(zp_ref, nb)),
                       *((load_iconsts(cols(ca_ref, nb), cols(cb_ref, nb)),) if integer else ()))
                      for nb in nbs]

            def planes_of(h, w_smem, consts_h, sub, *, raw=False):
                """Plane ``p`` of accumulator ``h``'s weights for K step ``sub`` of this
                pipeline step, in order (decoded all at once, or cut from the code pairs one at
                a time under "one"); ``raw``: ``128 + w``, the group scale left to the caller."""
                q_s, s_s = w_smem[2 * h].at[0, 0, sub], w_smem[2 * h + 1].at[0, 0, sub]
                if schedule in ("all", "half"):
                    yield from decode(pairs_only=False, raw=raw)(q_s, s_s, *consts_h)
                    return
                pairs = decode(pairs_only=True, raw=raw)(q_s, s_s, *consts_h)
                for shift in _SHIFTS:
                    yield cut_plane(shift, raw=raw)(*pairs)

            def step_sync(_, x_smem, *rest):
                *w_smem, xg_smem, accs = rest
                accs = list(accs)
                for sub, h in itertools.product(range(unroll), range(len(accs))):
                    # Each scale group's partial sums over the 4 planes, then its nibble in fp32
                    parts = tuple(zero_acc() for _ in range(4))
                    for p, a_t in enumerate(planes_of(h, w_smem, consts[h], sub, raw=True)):
                        parts = tuple(mma_sync(4 * sub + p)(parts, a_t, x_smem))
                    accs[h] = apply_groups(sub)(accs[h], parts, w_smem[2 * h + 1].at[0, 0, sub],
                                                xg_smem)
                # mma.sync reads x with plain loads: every warp must be done with this slot
                # before the pipeline refills it (wgmma's warpgroup-wide waits imply this).
                warpgroup_barrier()
                return tuple(accs)

            x_spec = plgpu.BlockSpec((block_m, BLOCK_K * unroll), lambda kk: (t, k0 + kk),
                                     transforms=x_transforms)
            w_specs = []
            for nb in nbs:
                w_specs += [
                    plgpu.BlockSpec((1, 1, unroll, 16, 256),
                                    lambda kk, nb=nb: (g, nb, k0 + kk, 0, 0)),
                    plgpu.BlockSpec((1, 1, unroll, 128), lambda kk, nb=nb: (g, nb, k0 + kk, 0)),
                ]
            args = (x_ref, *[r for _ in nbs for r in (qw_ref, ws_ref)])
            ss_refs = [ss_ref.at[g, pl.ds(nb * BLOCK_N, BLOCK_N)] for nb in nbs]

            if mma == "sync":  # accumulators in registers, carried through the pipeline
                xg_spec = plgpu.BlockSpec((block_m, 4 * unroll), lambda kk: (t, k0 + kk))
                vals = plgpu.emit_pipeline(
                    step_sync, grid=(psteps,), in_specs=[x_spec, *w_specs, xg_spec],
                    max_concurrent_steps=stages,
                    init_carry=tuple(zero_acc() for _ in nbs))(*args, xg_ref)
                store_tile(list(vals), ss_refs)
                return

            def wgmma_tile(bm):  # the tile as ``bm`` rows: x rows past them are not read
                def with_accs(*accs):
                    def step(_, x_smem, *w_smem):
                        x_rows = x_smem if bm == block_m else x_smem.at[pl.ds(0, bm)]
                        for sub, (h, acc) in itertools.product(range(unroll), enumerate(accs)):
                            for p, a_t in enumerate(planes_of(h, w_smem, consts[h], sub)):
                                plane = x_rows.at[:, pl.ds(BLOCK_K * sub + 64 * p, 64)]
                                plgpu.wgmma(acc, a_t, plane.T)
                                if schedule == "one":  # one wgmma in flight reads registers
                                    plgpu.wgmma_wait(1)
                            if schedule == "half":
                                plgpu.wgmma_wait(0)
                        plgpu.wgmma_wait(0)

                    plgpu.emit_pipeline(step, grid=(psteps,), in_specs=[x_spec, *w_specs],
                                        max_concurrent_steps=stages)(*args)
                    store_tile([acc[...] for acc in accs], ss_refs, bm=bm)

                pl.run_scoped(with_accs, *[plgpu.ACC((BLOCK_N, bm), f32)] * len(nbs))

            # A tile of r rows runs the smallest height >= r (config.tails, then block_m).
            rows, lower = hi - row0, 0
            for bm in (*config.tails, block_m):
                pl.when((rows > lower) & (rows <= bm))(functools.partial(wgmma_tile, bm))
                lower = bm

        @pl.when((hi > row0) & (g >= num_groups))
        def _padding():
            store_tile([], [])

    out_type = (jax.ShapeDtypeStruct((split_k, m_out, n), jnp.float32) if split
                else jax.ShapeDtypeStruct((m_out, n_out), out_dtype))
    # The last grid axis varies fastest: programs launched together share a tile's x rows (one
    # read from DRAM) instead of sharing a column block across tiles (x re-read for every
    # column block once it outgrows L2: ~4 GB a projection at 1024 tokens, results/NOTES.md §32).
    kernel = plgpu.kernel(
        wint2_fragments_matmul,
        out_type=out_type,
        grid=(*((split_k,) if split else ()), num_tiles, out_blocks // col_blocks),
        grid_names=("s", "t", "n") if split else ("t", "n"),
        compiler_params=plgpu.CompilerParams(),
    )
    args = (grp, row0_t, hi_t, x_planes, qwf, wsf, ss, cs, zp, *(icodes or ()),
            *((row_scale,) if has_rs else ()), *((sums,) if mma == "sync" else ()),
            *((row_inv,) if fp16 else ()))
    return kernel(*args)



BF16_PLANE_OFFSETS = (160.0,) * 4  # planes 128 + w, q = w - 32


def group_sums(x_planes, plane_offsets=BF16_PLANE_OFFSETS):
    """``sum_t c_t X_t`` fp32 ``[M, K/64]``: each row of plane-ordered x summed over every 64-row
    scale group of K (column ``64 t + p`` of a 256-wide step is K row ``4 p + t``: group ``p //
    16``), plane t's sum weighted by ``c_t``: what the mma.sync path's partial sums exceed
    ``x @ q`` by. bf16 planes ``128 + w``: ``c_t = 160`` (``q = w - 32``); fp16 planes
    (``FP16_PLANE_OFFSETS``): 1056 for ``1024 + w``, 1280 for ``1024 + 8 w`` on x / 8."""
    m, k = x_planes.shape
    c = jnp.asarray(plane_offsets, jnp.float32)[:, None, None]
    xs = (x_planes.astype(jnp.float32).reshape(m, k // BLOCK_K, 4, 4, 16) * c).sum(axis=(2, 4))
    return xs.reshape(m, k // 64)


FP16_PLANE_OFFSETS = (1280.0, 1056.0, 1280.0, 1056.0)  # 1024 + 8 * 32, 1024 + 32
FP16_MIN_EXPONENT = -112  # fp16_row_scales' floor on frexp's exponent


def fp16_row_scales(x):
    """``(scale, inverse)`` fp32 ``[M]``: a power of two per row of ``x`` that puts it into fp16's
    range (``max |x * scale| < 2^14``: exact for every value above fp16's 2^-14 normal floor
    relative to that), for the ``planes="fp16"`` path; the kernel's epilogue applies the inverse
    before the activation. Rows whose largest magnitude is under 2^-113 take the scale of
    2^-113 (``FP16_MIN_EXPONENT``): 2^(14 - e) then stays a finite fp32."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
    _, e = jnp.frexp(amax)  # amax < 2^e (e = 0 for a zero row)
    scale = jnp.ldexp(jnp.ones_like(amax), 14 - jnp.maximum(e, FP16_MIN_EXPONENT))
    return scale, 1.0 / scale


def fp16_plane_columns(x_planes_f32):
    """Plane-ordered fp32 x -> fp16 with the columns of planes 0 and 2 divided by 8.

    The rounding to fp16 is stated with ``reduce_precision`` before the cast. Under ``jit``,
    XLA's default ``xla_allow_excess_precision`` may drop the pair ``f32 -> f16 -> f32`` in
    :func:`group_sums` and sum the unrounded values, which no longer cancel against the
    kernel's partial sums (1 % error on the H100 where x came from XLA's split-K epilogue,
    ``results/NOTES.md`` §44); ``reduce_precision`` is never removed. It flushes fp16
    subnormals to zero (values under 2^-14, at most 2^-28 of the row's largest after
    :func:`fp16_row_scales`): the kernel and the sums both get the flushed values.
    """
    m, k = x_planes_f32.shape
    c = jnp.asarray(_F16_X_SCALE, jnp.float32)[:, None]
    x = (x_planes_f32.reshape(m, k // BLOCK_K, 4, 64) * c).reshape(m, k)
    return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10).astype(jnp.float16)


# --------------------------------------------------------------------------------------------
# The op: fragment-ordered WINT2 linears (same leaves and shapes as the row order).
# --------------------------------------------------------------------------------------------

REORDERED = ("quant_weight", "weight_scale")


def _frag_q(qw):  # [E, K/4, N] -> same shape, fragment byte order
    return _permute_blocks(qw, 64, _byte_positions())


def _frag_s(ws):
    return _permute_blocks(ws, 2, _scale_positions())


def _unfrag_q(qf):
    return _permute_blocks(qf, 64, _byte_positions(), inverse=True)


def _unfrag_s(sf):
    return _permute_blocks(sf, 2, _scale_positions(), inverse=True)


@dataclasses.dataclass(frozen=True)
class _PerShard:
    """``fn`` applied to each shard of an array sharded by ``spec`` over ``mesh`` (hashable, so
    that it can be a static jit argument). The byte order is block-local, so a tensor-parallel
    shard (whole 64-column / 256-row blocks) is re-ordered on its own."""

    fn: Callable
    mesh: Any
    spec: Any

    def __call__(self, a):
        return _shard_map(self.fn, self.mesh, self.spec)(a)


def _shard_map(f, mesh, spec):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older jax

    return shard_map(f, mesh, spec, spec, check_rep=False)  # pragma: no cover


def _local_fn(fn, a, *, drop_leading: int = 0):
    """``fn`` itself, or wrapped per shard when ``a`` is sharded over a mesh axis."""
    try:
        sh = a.sharding
    except Exception:  # noqa: BLE001  (a tracer: already a shard, or unsharded)
        return fn
    spec = tuple(getattr(sh, "spec", ()))
    if not isinstance(sh, jax.sharding.NamedSharding) or all(p is None for p in spec):
        return fn
    return _PerShard(fn, sh.mesh, jax.sharding.PartitionSpec(*spec[drop_leading:]))


def local_shape(a) -> tuple[int, ...]:
    """The per-device shape of ``a`` (its own shape unless it is sharded)."""
    try:
        return tuple(a.sharding.shard_shape(a.shape))
    except Exception:  # noqa: BLE001  (a tracer or a numpy array: its own shape)
        return tuple(a.shape)


@functools.cache
def _layer_reorderer(fn, sharding):
    """``(stack, layer) -> stack`` with layer ``layer`` re-ordered in place (donated)."""
    return jax.jit(lambda stack, layer: stack.at[layer].set(fn(stack[layer])),
                   donate_argnums=0, out_shardings=sharding)


def _reorder(w: dict, fns: dict, *, in_place: bool) -> dict:
    out = dict(w)
    for leaf, fn in fns.items():
        a = w[leaf]
        if a.ndim == 3:
            out[leaf] = jax.jit(_local_fn(fn, a))(a)
        elif in_place:  # one layer at a time into the donated stack: peak + one layer
            f = _local_fn(fn, a, drop_leading=1)
            sharding = a.sharding if isinstance(f, _PerShard) else None
            step = _layer_reorderer(f, sharding)
            for i in range(a.shape[0]):
                a = step(a, i)
            out[leaf] = a
        else:
            out[leaf] = jax.jit(_local_fn(jax.vmap(fn), a))(a)
    return out


def supports(w: dict) -> bool:
    """Whether a WINT2 ``<linear>`` (its per-device shard, if sharded) fits this kernel's blocks."""
    shape = local_shape(w["quant_weight"])
    return (4 * shape[-2]) % BLOCK_K == 0 and shape[-1] % BLOCK_N == 0


INTEGER_CODE_LEAVES = ("code_a", "code_b")
"""The integer code step's leaves of a WINT2 ``<linear>`` (``jaxwint2.layout`` re-exports them)."""
INTEGER_CODES = True
""":func:`to_fragments`' default for ``integer`` (the benchmarks' ``--code-step`` flag): the
300B expert FFN 4-9 % faster at 1-64 tokens (H100), its decode +3 % (H200), results/NOTES.md
§60."""


def integer_codes(w: dict) -> dict:
    """``w`` with the integer code step's leaves: ``code_a``, ``code_b`` int32, shaped and
    placed like ``code_scale``, with ``code(u) == (u * code_a + code_b) >> 16`` (mod 2^32) for
    every byte u of a column that has such a pair (:func:`wint2.affine_codes`: every column of
    our encoder's output, 1023 of the 1024 golden ones, 99.98 % of random fp32 ``code_scale`` in
    100..125 as the benchmarks draw them, 98 % of cs in 32..120 with zp below 4000) and
    ``code_a == 0`` for a column that has none. The kernel takes the integer step in each warp
    (16 columns) whose columns all have one, the float step in the others, so the result is
    the format's decode either way. Fitted on the host (NumPy, in threads); an array sharded
    over a mesh is fitted shard by shard (each process its own, each distinct shard once).
    """
    cs, zp = w["code_scale"], w["code_zp"]
    sharding = getattr(cs, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        # Uncommitted, like the other leaves: one leaf committed to a device among uncommitted
        # ones makes jit key its cache on every argument's placement, and the model then
        # compiled each step twice (results/NOTES.md §60).
        return {**w, **dict(zip(INTEGER_CODE_LEAVES, map(jnp.asarray, fit_integer_codes(cs, zp)),
                                strict=True))}
    if zp.sharding != sharding:
        raise ValueError(f"code_zp is placed {zp.sharding}, code_scale {sharding}: shard them "
                         "alike")
    fits, shards = {}, ([], [])
    for s_cs, s_zp in zip(cs.addressable_shards, zp.addressable_shards, strict=True):
        key = str(s_cs.index)
        if key not in fits:
            fits[key] = fit_integer_codes(s_cs.data, s_zp.data)
        for out, a in zip(shards, fits[key], strict=True):
            out.append(jax.device_put(a, s_cs.device))
    return {**w, **{leaf: jax.make_array_from_single_device_arrays(cs.shape, sharding, out)
                    for leaf, out in zip(INTEGER_CODE_LEAVES, shards, strict=True)}}


def fit_integer_codes(cs, zp) -> tuple[np.ndarray, np.ndarray]:
    """``(code_a, code_b)`` int32 NumPy, shaped like ``cs``: :func:`wint2.affine_codes` with
    ``A = 0`` where a column has no pair (the kernel's mark). Host only (no device, no jit): what
    :func:`integer_codes` fits at load and the converter stores (``jaxwint2.layout``)."""
    from .wint2 import affine_codes

    a, b, exact = affine_codes(np.asarray(cs), np.asarray(zp))
    return np.where(exact, a, 0).astype(np.int32), b


def to_fragments(w: dict, *, in_place: bool = False, integer: bool | None = None) -> dict:
    """A WINT2 ``<linear>`` (``[E, ...]`` or ``[L, E, ...]`` leaves) in fragment byte order.

    Same leaves, shapes and dtypes: ``quant_weight`` and ``weight_scale`` hold the same bytes
    permuted (:func:`fragment_weights`, :func:`fragment_scales`); with ``integer`` (default
    ``INTEGER_CODES``), also the integer code step's leaves: ``w``'s own (a converted checkpoint
    stores them), else fitted (:func:`integer_codes`); without, ``w``'s are dropped.
    ``in_place``: a layer stack is re-ordered one layer at a time inside its own (donated)
    buffer, so the caller's arrays of those two leaves are consumed; the peak is one layer more
    instead of a second stack. Arrays sharded over a mesh (tensor parallelism) are re-ordered
    shard by shard: each device's block is then the fragment order of its own local linear,
    which is what the kernel sees under ``shard_map``.
    """
    shape = local_shape(w["quant_weight"])
    _check_dims(4 * shape[-2], shape[-1])
    if INTEGER_CODES if integer is None else integer:
        w = w if INTEGER_CODE_LEAVES[0] in w else integer_codes(w)  # stored, or fitted here
    else:  # the float step: leaves a converted checkpoint stores are dropped, not used
        w = {leaf: a for leaf, a in w.items() if leaf not in INTEGER_CODE_LEAVES}
    return _reorder(w, {"quant_weight": _frag_q, "weight_scale": _frag_s}, in_place=in_place)


def from_fragments(w: dict) -> dict:
    """Inverse of :func:`to_fragments` (the reference path; a copy)."""
    w = {leaf: a for leaf, a in w.items() if leaf not in INTEGER_CODE_LEAVES}
    return _reorder(w, {"quant_weight": _unfrag_q, "weight_scale": _unfrag_s}, in_place=False)


# The jax releases whose Mosaic GPU this kernel was run and tested on (the API moves quickly;
# 0.10.2 lowers it on a CPU but was never run on a GPU): older ones keep the Triton kernel.
MIN_JAX = (0, 11, 2)


def available() -> bool:
    """A Hopper GPU and a jax (>= ``MIN_JAX``) whose Pallas Mosaic GPU has what this uses."""
    try:
        version = tuple(int(p) for p in jax.__version__.split(".")[:3])
        if version < MIN_JAX:
            return False
        d = jax.devices()[0]
        if d.platform != "gpu" or not str(getattr(d, "compute_capability", "")).startswith("9"):
            return False
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return all(hasattr(plgpu, a) for a in ("inline_mgpu", "emit_pipeline", "wgmma", "ACC"))
    except Exception:  # noqa: BLE001  (any failure to probe means: not available)
        return False


def schedule_for(activation) -> str:
    """Decode schedule (see ``SCHEDULES``): one plane at a time under SwiGLU (two halves' planes
    would not fit the registers otherwise; "one" won or tied at every SwiGLU tile height but one
    in the 2026-11-22 tune), everything at once for the plain projection (H100 sweeps,
    ``results/NOTES.md`` §21, §25)."""
    return "one" if activation == "swiglu" else "all"


def _rows_per_expert(m: int, groups: int) -> int:
    """Mean rows of an active expert when ``m`` rows spread over ``groups`` experts."""
    return -(-m // max(1, min(groups, m)))


def block_m_for(m: int, groups: int) -> int:
    """Rows per tile (wgmma N): 1.5x the mean rows of an active expert, a power of two in 8..64.

    Every expert's rows start a tile (:func:`kernels.expert_tiles`), so a tile height at or
    above an expert's rows decodes its weights once. The margin covers routing's spread: at 8
    rows an expert (300B, 64 tokens) many experts get more than 8, so 16-row tiles win (up_gate
    713 µs vs 940 at 8 rows and 792 at 32; down 383 vs 512 / 418; H100 sweeps of session 6).
    At 128 rows an expert 64-row tiles beat 128 (1024 tokens, up_gate 2563 vs 3067 µs, down 1325
    vs 1740: a 128-column fp32 accumulator per SwiGLU half costs the occupancy).
    ``results/NOTES.md`` §20, §23, §25, §33.
    """
    per = _rows_per_expert(m, groups)
    want = per + per // 2
    return min(64, max(8, 1 << (want - 1).bit_length()))


def heuristic_config(m: int, groups: int, activation=None, *, n_out: int | None = None,
                     k: int | None = None) -> MosaicConfig:
    """The measured rules for shapes the device's tuned table does not hold (H100 sweeps,
    ``results/NOTES.md`` §25-33): :func:`block_m_for`, :func:`schedule_for`, 2 stages; two
    64-column blocks a program (sharing the x tile) from 64 rows an expert, if ``n_out`` (the
    output columns) divides (300B at 1024 tokens, up_gate: 2617 vs 2676 µs; before the grid ran
    a tile's column blocks together it was 3312 vs 3494, and the down projection's 1892 vs 2836);
    no K split (it won only for the 300B up_gate at one token: split 4, 109 -> 101 µs, and lost
    for the 21B under "one", 34 -> 51 µs; the table holds it where it wins); per-warp
    ``mma.sync`` at 8-row tiles (300B at 1 and 16 tokens: 3.5-4.7 % faster than wgmma; from
    16-row tiles of 8+ rows an expert it lost, ``results/NOTES.md`` §37), with fp16 planes (300B
    at 1 / 4 / 16 tokens: up_gate 103 -> 91, 245 -> 228, 504 -> 497 µs; down 70 -> 59, 143 ->
    134, 282 -> 262: §43); under ``mma.sync`` two K steps a pipeline step where ``k`` (the
    depth) has an even number of them (300B at 4 / 16 tokens: up_gate 219 -> 209, 451 -> 423
    µs, down at 16 tokens 252 -> 235; wgmma tiles lose, from the shared memory it costs:
    §50); wgmma tiles of 48+ rows with every multiple of 16 below as a tail height (an
    expert's last tile: 300B at 256 / 1024 tokens 2-8 % a projection, §69)."""
    bm = block_m_for(m, groups)
    wide = _rows_per_expert(m, groups) >= 64 and n_out is not None and (n_out // BLOCK_N) % 2 == 0
    sync = bm == 8
    unroll = 2 if sync and k is not None and (k // BLOCK_K) % 2 == 0 else 1
    return MosaicConfig(block_m=bm, stages=2, schedule=schedule_for(activation),
                        col_blocks=2 if wide else 1, mma="sync" if sync else "wgmma",
                        planes="fp16" if sync else "bf16", k_unroll=unroll,
                        tails=every_16_below(bm) if bm >= 48 and not sync else ())


def config_for(m: int, k: int, n_out: int, groups: int, activation=None) -> MosaicConfig:
    """The tuned config of this call's shape on this device (``tuned/<device>.json``, section
    ``mosaic``, nearest row bucket), else :func:`heuristic_config`."""
    return (tuned_mosaic_config(m, k, n_out, activation=activation, num_groups=groups)
            or heuristic_config(m, groups, activation, n_out=n_out, k=k))


def grouped_matmul_fragments(x, w: dict, group_sizes, *, activation=None, row_scale=None,
                             out_dtype=None, layer=None, k_order: str = "natural",
                             config: MosaicConfig | None = None, prologue: str | None = None,
                             operand_pieces: int = 1):
    """``epilogue(x[rows of e] @ W[e])`` for fragment-ordered WINT2 experts (rows sorted by e).

    ``w`` leaves ``[E, ...]`` or, with ``layer``, ``[L, E, ...]`` (read in place); ``k_order``
    the checkpoint's in-group K order (a shuffled one is undone on x's columns, together with
    the plane order). ``config`` overrides the tuned / heuristic choice (:func:`config_for`);
    ``prologue``: the operands' implementation (``prologue.expert_operands``: None/"pallas" one
    Triton launch, "xla" the jnp composition); ``operand_pieces``: at most that many programs a
    row in that launch (``prologue.expert_operands``' ``pieces``: the most, up to this, that
    split K into whole 256-row steps).
    Raises NotImplementedError for what the kernel does not take (f32 x, K % 256, N % 64, no
    Hopper GPU).
    """
    if x.dtype != jnp.bfloat16:
        raise NotImplementedError(f"the Mosaic WINT2 kernel takes bf16 x, got {x.dtype}")
    return _projection(x, w, group_sizes, activation=activation, row_scale=row_scale,
                       out_dtype=out_dtype or x.dtype, layer=layer, k_order=k_order,
                       config=config, prologue=prologue, operand_pieces=operand_pieces)


# The expert FFN as one op (results/NOTES.md §55, 300B on an H100): at 8 rows (1 token, top-8)
# handing a K-split up_gate's partial sums to the down's operand launch, that launch in 7-8
# programs a row, saved ~3.5 µs of ~124; at 32 rows both lost (the launch's rows are long loops).
FFN_FUSE_MAX_ROWS = 8
FFN_DOWN_PIECES = 8


def expert_ffn_fragments(x, w_up: dict, w_down: dict, group_sizes, *, row_scale=None,
                         out_dtype=None, layer=None, k_order: str = "natural",
                         configs: tuple[MosaicConfig | None, MosaicConfig | None] = (None, None),
                         prologue: str | None = None, fuse: bool | None = None,
                         operand_pieces: int | None = None):
    """The whole expert FFN ``row_scale * (swiglu(x @ W_up[e]) @ W_down[e])`` of fragment-ordered
    WINT2 experts: :func:`grouped_matmul_fragments` twice, or, fused, with a K-split up_gate
    (its config's ``split_k > 1``, the tuned choice at a few tokens) its fp32 partial sums go
    straight into the down projection's operand launch (``prologue.expert_operands(...,
    swiglu_partials=True)`` adds them, applies SwiGLU and rounds h to bf16) instead of through
    an XLA epilogue between the two projections: one launch and one round trip of h less.

    Args:
      fuse: fuse as above (where the up_gate splits K); ``None``: at most
        ``FFN_FUSE_MAX_ROWS`` rows, where it was measured to win (``results/NOTES.md`` §55).
      operand_pieces: programs a row of both operand launches (at most; see
        :func:`grouped_matmul_fragments`); ``None``: ``FFN_DOWN_PIECES`` for a fused down's, 1
        otherwise.
      configs: (up_gate, down) overrides of :func:`config_for`; the rest as
        :func:`grouped_matmul_fragments`.
    """
    if x.dtype != jnp.bfloat16:
        raise NotImplementedError(f"the Mosaic WINT2 kernel takes bf16 x, got {x.dtype}")
    cfg_up = _call_config(configs[0], x.shape[0], x.shape[1], w_up, "swiglu")
    fuse, pieces_up, pieces_down = ffn_plan(x.shape[0], cfg_up, fuse, operand_pieces)
    kw = dict(layer=layer, k_order=k_order, prologue=prologue)
    h = _projection(x, w_up, group_sizes, activation="swiglu", row_scale=None,
                    out_dtype=x.dtype, config=cfg_up, keep_partials=fuse,
                    operand_pieces=pieces_up, **kw)
    return _projection(h, w_down, group_sizes, activation=None, row_scale=row_scale,
                       out_dtype=out_dtype or x.dtype, config=configs[1],
                       swiglu_partials=fuse, operand_pieces=pieces_down, **kw)


def ffn_plan(m: int, cfg_up: MosaicConfig, fuse: bool | None,
             operand_pieces: int | None) -> tuple[bool, int, int]:
    """``(fuse, up_gate operand pieces, down operand pieces)`` of :func:`expert_ffn_fragments`
    for ``m`` rows whose up_gate runs ``cfg_up``."""
    fuse = (m <= FFN_FUSE_MAX_ROWS if fuse is None else fuse) and cfg_up.split_k > 1
    if operand_pieces is None:
        return fuse, 1, FFN_DOWN_PIECES if fuse else 1
    return fuse, operand_pieces, operand_pieces


def _projection(x, w: dict, group_sizes, *, activation, row_scale, out_dtype, layer, k_order,
                config, prologue, operand_pieces, keep_partials: bool = False,
                swiglu_partials: bool = False):
    """One grouped projection. ``x``: bf16 rows ``[M, K]``, or (``swiglu_partials``) a SwiGLU
    projection's fp32 split-K partial sums ``[S, M, 2K]`` whose rows the operand launch forms.
    ``keep_partials``: a K-split config returns its fp32 partial sums ``[S, M, N]`` instead of
    adding them and applying the epilogue."""
    from .kernels import _weights
    from .prologue import expert_operands

    qw = w["quant_weight"]
    if not available():
        raise NotImplementedError("the Mosaic WINT2 kernel needs a Hopper GPU (sm_90)")
    m, k = x.shape[-2], x.shape[-1] // (2 if swiglu_partials else 1)
    n = qw.shape[-1]
    _check_dims(k, n)
    if 4 * qw.shape[-2] != k:
        raise ValueError(f"x has K={k}, the weights {4 * qw.shape[-2]}")
    num_layers = qw.shape[0] if layer is not None else 1
    # [L, E, ...] -> [L*E, ...] (free reshapes), the byte chunks split into their fragment blocks
    qw, ws, ss, cs, zp = _weights(w, "wint2", True, layer is not None)
    ss, cs, zp = (a.astype(jnp.float32) for a in (ss, cs, zp))  # f32 in the runtime layout
    qwf = qw.reshape(-1, n // BLOCK_N, k // BLOCK_K, 16, 256)
    wsf = ws.reshape(-1, n // BLOCK_N, k // BLOCK_K, 128)
    cfg = _call_config(config, m, k, w, activation)
    # The tile table, x's rows gathered into their tiles in plane order (fp16 planes: scaled
    # into fp16's range, undone in the epilogue) and the group sums: one small launch.
    ops = expert_operands(x, group_sizes, bm=cfg.block_m, sums=cfg.mma == "sync",
                          fp16=cfg.planes == "fp16", k_order=k_order, layer=layer,
                          num_layers=num_layers, implementation=prologue,
                          pieces=_fit_pieces(operand_pieces, k // BLOCK_K),
                          swiglu_partials=swiglu_partials)
    rs = None if row_scale is None else row_scale.astype(jnp.float32)
    icodes = None
    if INTEGER_CODE_LEAVES[0] in w:  # the integer code step (integer_codes), [L, E, N] -> [L*E, N]
        icodes = tuple(w[leaf].reshape(-1, n) for leaf in INTEGER_CODE_LEAVES)
    out = grouped_matmul(ops.x_planes, qwf, wsf, ss, cs, zp, ops.tiles, rs, activation=activation,
                         out_dtype=out_dtype, config=cfg, m_out=m, row_inv=ops.row_inv,
                         sums=ops.sums, icodes=icodes)
    if cfg.split_k > 1 and not keep_partials:  # [split, M, N] fp32 partial sums: add, epilogue
        out = apply_epilogue(out.sum(0), activation, rs).astype(out_dtype)
    return out


def _call_config(config: MosaicConfig | None, m: int, k: int, w: dict,
                 activation) -> MosaicConfig:
    """``config``, else :func:`config_for` of ``m`` rows of depth ``k`` through ``w``."""
    n, e = w["quant_weight"].shape[-1], w["quant_weight"].shape[-3]
    return config or config_for(m, k, n // 2 if activation == "swiglu" else n, e, activation)


def _fit_pieces(most: int, steps: int) -> int:
    """The most pieces, up to ``most``, that split ``steps`` K steps evenly."""
    return max(p for p in range(1, max(most, 1) + 1) if steps % p == 0)
