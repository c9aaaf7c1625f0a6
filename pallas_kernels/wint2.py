"""The WINT2 (CCQ, FastDeploy) bit format: the executable spec of the decode.

This module owns the meaning of the bytes (``shared/docs/wint2-format.md`` §3.1, reproduced on
every element of FastDeploy's golden vectors by ``tests/test_wint2_format.py``). It knows nothing
about models, checkpoints on disk or kernels; kernels and the model's reference path call the
traced helpers here so that there is one decode in the code base.

Layout (one expert; experts may be stacked on a leading axis ``E``)::

    quant_weight  uint8   [K/4, N]          byte p of column n holds K rows 4p..4p+3
    weight_scale  uint8   [ceil(K/128), N]  two 4-bit group scales a byte, even group = high nibble
    super_scales  bf16/f32 [N]              per-column scale of the 4-bit scales
    code_scale    f32     [N]               byte -> 15-bit code: floor(fma(u, cs, zp) + 0.5)
    code_zp       f32     [N]

Decode of element (k, n), ``p = k // 4``, ``t = k % 4``, ``g = k // 64``::

    code = floor(fp32(u * code_scale + code_zp) + 0.5)        # fused multiply-add, one rounding
    q    = ((code >> (9, 6, 3, 0)[t]) & 0x3F) - 32            # four overlapping 6-bit windows
    nib  = weight_scale[g // 2] >> 4 if g even else weight_scale[g // 2] & 0xF
    W    = bf16_round(q * nib * super_scales)                 # exact in fp32, rounded once

Two implementations of the byte -> code step live here:

* :func:`wint2_codes_exact` (NumPy, float64 with an exact correction) reproduces the fused
  multiply-add bit for bit on any input; :func:`dequantize_wint2` (the public, golden-exact
  decode) uses it.
* :func:`wint2_codes` (jnp, traceable) evaluates ``u * cs + zp`` in fp32. GPU compilers (ptxas,
  LLVM NVPTX) contract it into one FFMA, which is the reference semantics; an unfused evaluation
  differs only where the exact value sits within one fp32 ulp of a ``.5`` boundary (rare, and
  only for non-dyadic ``code_scale``/``code_zp``). :func:`count_unfused_mismatches` measures how
  many (column, byte) pairs of a checkpoint are exposed to that; the converter reports it.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

GROUP_SIZE = 64
"""K rows per 4-bit group scale (FastDeploy hard-codes 64)."""

KOrder = Literal["natural", "shuffled"]
_SHIFTS = (9, 6, 3, 0)


# --------------------------------------------------------------------------------------------
# byte -> 15-bit code
# --------------------------------------------------------------------------------------------


def _round_f64_to_f32_exact(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Round the exact value ``s + err`` to fp32 (nearest-even) once.

    ``s`` is the float64 rounding of the exact value and ``err`` its exact remainder. Every
    midpoint between two fp32 numbers is a float64 number, so ``s`` and the exact value lie on the
    same side of each midpoint, except when ``s`` *is* the midpoint and ``err != 0``: then the
    exact value is off the tie and rounds towards ``err``'s side instead of to the even neighbour.
    """
    f = s.astype(np.float32)
    lo = np.where(f.astype(np.float64) <= s, f, np.nextafter(f, np.float32(-np.inf)))
    hi = np.nextafter(lo, np.float32(np.inf))
    mid = (lo.astype(np.float64) + hi.astype(np.float64)) / 2
    on_tie = (s == mid) & (err != 0)
    return np.where(on_tie, np.where(err > 0, hi, lo), f)


def wint2_codes_exact(u: np.ndarray, code_scale: np.ndarray, code_zp: np.ndarray) -> np.ndarray:
    """15-bit codes ``floor(fp32(fma(u, cs, zp)) + 0.5)``, exact, broadcasting NumPy inputs.

    ``u * cs`` is exact in float64 (8 x 24 bits). ``prod + zp`` is summed with Knuth's TwoSum so
    the exact value is ``s + err``; :func:`_round_f64_to_f32_exact` rounds it to fp32 once, as an
    FMA does. The ``+ 0.5`` is then done in fp32, as in FastDeploy's kernels.
    """
    u64 = np.asarray(u, dtype=np.float64)
    cs = np.asarray(code_scale, dtype=np.float32).astype(np.float64)
    zp = np.asarray(code_zp, dtype=np.float32).astype(np.float64)
    prod = u64 * cs
    s = prod + zp
    bb = s - prod
    err = (prod - (s - bb)) + (zp - bb)  # TwoSum: prod + zp == s + err exactly
    # err == 0 everywhere (the usual case): s is the exact value, and NumPy's cast rounds it once
    f = _round_f64_to_f32_exact(s, err) if err.any() else s.astype(np.float32)
    return np.floor(f + np.float32(0.5)).astype(np.int32)


def wint2_codes(u: jax.Array, code_scale: jax.Array, code_zp: jax.Array) -> jax.Array:
    """Traceable byte -> code: ``floor(u * cs + zp + 0.5)`` in fp32 (see module docstring)."""
    v = u.astype(jnp.float32) * code_scale.astype(jnp.float32) + code_zp.astype(jnp.float32)
    return jnp.floor(v + 0.5).astype(jnp.int32)


def count_unfused_mismatches(code_scale: np.ndarray, code_zp: np.ndarray) -> int:
    """Number of (column, byte) pairs whose code differs between fused and unfused fp32 math."""
    cs = np.asarray(code_scale, np.float32).reshape(-1, 1)
    zp = np.asarray(code_zp, np.float32).reshape(-1, 1)
    u = np.arange(256, dtype=np.float32).reshape(1, -1)
    unfused = np.floor((u * cs + zp) + np.float32(0.5)).astype(np.int32)
    return int((unfused != wint2_codes_exact(u, cs, zp)).sum())


# --------------------------------------------------------------------------------------------
# codes -> weights
# --------------------------------------------------------------------------------------------


def unpack_group_scales(weight_scale, k: int):
    """``[..., ceil(K/128), N]`` packed nibbles -> ``[..., K/64, N]`` (even group = high nibble)."""
    xp = jnp if isinstance(weight_scale, jax.Array) else np
    ws = weight_scale.astype(xp.int32)
    both = xp.stack([(ws >> 4) & 0xF, ws & 0xF], axis=-2)  # [..., G2, 2, N]
    full = both.reshape(*ws.shape[:-2], ws.shape[-2] * 2, ws.shape[-1])
    return full[..., : k // GROUP_SIZE, :]


def shuffle_k(w, axis: int = -2):
    """Apply the mid-2025 FastDeploy in-group K shuffle (§3.2) to decoded rows along ``axis``.

    Rows of each 64-row group, viewed as ``[4, 8, 2]``, have their first two axes swapped. The
    permutation is its own kind of inverse partner: :func:`unshuffle_k` undoes it.
    """
    return _permute_groups(w, axis, (1, 0, 2), (4, 8, 2))


def unshuffle_k(w, axis: int = -2):
    return _permute_groups(w, axis, (1, 0, 2), (8, 4, 2))


def _permute_groups(w, axis, perm, view):
    xp = jnp if isinstance(w, jax.Array) else np
    w = xp.moveaxis(w, axis, -1)
    lead, k = w.shape[:-1], w.shape[-1]
    if k % GROUP_SIZE:
        raise ValueError(f"K={k} must be a multiple of {GROUP_SIZE} for the K shuffle")
    w = w.reshape(*lead, k // GROUP_SIZE, *view)
    nd = len(lead) + 1
    w = xp.transpose(w, (*range(nd), *(nd + p for p in perm)))
    return xp.moveaxis(w.reshape(*lead, k), -1, axis)


def shuffled_k_index(k: int) -> np.ndarray:
    """``idx`` with ``W_shuffled = W_natural[idx]`` along K (int32 permutation of ``range(K)``)."""
    return shuffle_k(np.arange(k, dtype=np.int32), axis=0)


def decode_from_codes(codes, weight_scale, super_scales, k: int, dtype=None):
    """``codes [..., K/4, N]`` (int32) + scales -> weights ``[..., K, N]`` (jnp, traceable).

    The product ``q * nib * super_scale`` is exact in fp32 (6 + 4 + 8 significant bits), so the
    single cast to ``dtype`` (bf16 by default) is the single rounding of §3.1 step 5.
    """
    dtype = dtype or jnp.bfloat16
    shifts = jnp.asarray(_SHIFTS, jnp.int32).reshape(1, -1, 1)
    q = ((codes[..., :, None, :] >> shifts) & 0x3F) - 32  # [..., K/4, 4, N]
    q = q.reshape(*codes.shape[:-2], k, codes.shape[-1]).astype(jnp.float32)
    nib = unpack_group_scales(weight_scale, k).astype(jnp.float32)  # [..., K/64, N]
    nib = jnp.repeat(nib, GROUP_SIZE, axis=-2)
    ss = super_scales.astype(jnp.float32)[..., None, :]
    return (q * nib * ss).astype(dtype)


def decode_wint2(quant_weight, weight_scale, super_scales, code_scale, code_zp, *,
                 k_order: KOrder = "natural", dtype=None) -> jax.Array:
    """Traceable WINT2 decode (fp32 multiply-add, see module docstring) -> ``[..., K, N]``."""
    k = quant_weight.shape[-2] * 4
    codes = wint2_codes(quant_weight[..., :, :], code_scale[..., None, :], code_zp[..., None, :])
    w = decode_from_codes(codes, weight_scale, super_scales, k, dtype)
    return shuffle_k(w) if k_order == "shuffled" else w


def dequantize_wint2(quant_weight, weight_scale, super_scales, code_scale, code_zp, *,
                     k_order: KOrder = "natural") -> jax.Array:
    """Decode FastDeploy WINT2 tensors to bf16, bit-exact (§3.1), checkpoint layout in.

    Args:
      quant_weight: uint8 ``[K/4, N]`` or stacked ``[E, K/4, N]`` (NumPy or JAX).
      weight_scale: uint8 ``[ceil(K/128), N]`` (or ``[E, ...]``).
      super_scales: bf16 (or fp32, used as stored) ``[N]`` (or ``[E, N]``).
      code_scale, code_zp: fp32 ``[N]`` (or ``[E, N]``).
      k_order: ``"natural"`` (byte row p holds K rows 4p..4p+3) or ``"shuffled"`` (§3.2).

    Returns:
      bf16 ``[K, N]`` (or ``[E, K, N]``).

    Example:
      >>> w = dequantize_wint2(qw, ws, ss, cs, zp)  # doctest: +SKIP
    """
    qw = np.asarray(quant_weight)
    if qw.dtype != np.uint8:
        raise TypeError(f"quant_weight must be uint8, got {qw.dtype}")
    if k_order not in ("natural", "shuffled"):
        raise ValueError(f"k_order must be 'natural' or 'shuffled', got {k_order!r}")
    cs, zp = np.asarray(code_scale), np.asarray(code_zp)
    codes = wint2_codes_exact(qw, cs[..., None, :], zp[..., None, :])
    ss = np.asarray(super_scales)
    if ss.dtype == np.uint16:  # raw bf16 bit pattern
        ss = ss.view(ml_dtypes.bfloat16)
    k = qw.shape[-2] * 4
    w = decode_from_codes(jnp.asarray(codes), jnp.asarray(np.asarray(weight_scale)),
                          jnp.asarray(ss.astype(np.float32)), k)
    return shuffle_k(w) if k_order == "shuffled" else w


# --------------------------------------------------------------------------------------------
# byte -> code as one integer multiply-add (the Mosaic kernel's cheaper code step)
# --------------------------------------------------------------------------------------------

AFFINE_SHIFT = 16
"""The integer code step ``code = (u * A + B) >> 16`` (mod 2^32: one 32-bit ``mad.lo``)."""
_AFFINE_TRIES = (0, -1, 1, -2, 2, -3, 3, -4, 4, -6, 6, -8, 8, -12, 12, -16, 16)


def affine_codes(code_scale, code_zp, *, chunk: int = 4096) -> tuple[np.ndarray, ...]:
    """Per column, integers ``(A, B)`` with ``(u * A + B) >> 16 == code(u)`` for every byte u.

    ``code(u)`` is the format's fused ``floor(fma(u, cs, zp) + 0.5)`` (:func:`wint2_codes_exact`).
    A column's 256 codes admit such a pair when the code is floor-affine in u at the 2^-16
    resolution: ``A`` near ``cs * 2^16``, ``B`` between the 256 lower bounds ``code(u) * 2^16 -
    u A`` and upper bounds ``(code(u) + 1) * 2^16 - 1 - u A``. Almost every column has one
    (every column of our encoder's output, 1023 of the 1024 golden columns: ``results/NOTES.md``
    §59, §60); a column whose fp32 rounding makes the codes non-affine has none, and ``exact``
    says so (its ``A, B`` are then 0 and must not be used).

    Returns:
      ``(A, B, exact)``: int32 (two's complement of the value mod 2^32), int32, bool, each shaped
      like ``code_scale``.
    """
    cs = np.asarray(code_scale, np.float32)
    zp = np.asarray(code_zp, np.float32)
    if cs.shape != zp.shape:
        raise ValueError(f"code_scale {cs.shape} and code_zp {zp.shape} differ in shape")
    flat_cs, flat_zp = cs.reshape(-1), zp.reshape(-1)
    a = np.zeros(flat_cs.shape, np.int64)
    b = np.zeros(flat_cs.shape, np.int64)
    exact = np.zeros(flat_cs.shape, bool)

    # Coarse dyadic columns (our encoder's, the synthetic benchmarks'): u * cs + zp is exact in
    # fp32, so the line itself is exact, with no 256-code search.
    cs64, zp64 = flat_cs.astype(np.float64), flat_zp.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        coarse = ((cs64 * 128 == np.rint(cs64 * 128)) & (zp64 * 128 == np.rint(zp64 * 128))
                  & (255 * np.abs(cs64) + np.abs(zp64) < 2**16))
        ends = np.floor(np.stack([zp64, 255 * cs64 + zp64]) + 0.5)
    coarse &= ((ends >= 0) & (ends < 1 << 15)).all(0) & (cs64 != 0)
    a[coarse] = cs64[coarse] * (1 << AFFINE_SHIFT)
    b[coarse] = (zp64[coarse] + 0.5) * (1 << AFFINE_SHIFT)
    exact[coarse] = True
    rest = np.flatnonzero(~coarse)

    def fit(lo: int) -> None:  # columns rest[lo: lo + chunk]: NumPy drops the GIL
        cols = rest[lo:lo + chunk]
        a[cols], b[cols], exact[cols] = _fit_affine(flat_cs[cols], flat_zp[cols])

    starts = range(0, rest.size, chunk)
    workers = min(len(starts), os.cpu_count() or 1)
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(fit, starts))
    else:
        for lo in starts:
            fit(lo)
    as_i32 = lambda v: ((v + 2**31) % 2**32 - 2**31).astype(np.int32)  # noqa: E731
    return as_i32(a).reshape(cs.shape), as_i32(b).reshape(cs.shape), exact.reshape(cs.shape)


def _fit_affine(cs: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`affine_codes` of one chunk of columns: int64 ``A, B`` and ``exact``."""
    u = np.arange(256, dtype=np.int64)[:, None]
    codes = wint2_codes_exact(u, cs[None], zp[None]).astype(np.int64)
    valid = ((codes >= 0) & (codes < 1 << 15)).all(0)  # 15-bit codes: below bit 31
    lower = codes << AFFINE_SHIFT
    upper = lower + ((1 << AFFINE_SHIFT) - 1)
    with np.errstate(invalid="ignore"):
        a0 = np.rint(cs.astype(np.float64) * (1 << AFFINE_SHIFT))
    a0 = np.where(np.isfinite(a0) & (np.abs(a0) < 2**31), a0, 0).astype(np.int64)
    todo = valid.copy()
    a, b, exact = np.zeros_like(a0), np.zeros_like(a0), np.zeros_like(valid)
    for d in _AFFINE_TRIES:
        if not todo.any():
            break
        idx = np.flatnonzero(todo)
        slope = a0[idx] + d
        b_lo = (lower[:, idx] - u * slope).max(0)
        hit = (b_lo <= (upper[:, idx] - u * slope).min(0)) & (slope != 0)
        a[idx[hit]], b[idx[hit]], exact[idx[hit]] = slope[hit], b_lo[hit], True
        todo[idx[hit]] = False
    return a, b, exact
