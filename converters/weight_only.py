"""Paddle ``weight_quantize`` (arch 80) WINT8 / WINT4 layouts: undo and redo the byte placement.

Owns the checkpoint-side meaning of ``quant_weight`` / ``weight_scale`` for weight-only int8 and
int4 linears (``shared/docs/wint2-format.md`` §4). Does not know the runtime layout beyond
producing plain ``q[K, N]`` integers; :mod:`jaxwint2.layout` packs those for the kernels.

Both layouts are permutations of a plain quantized matrix ``q[K, N]``. Rather than inverting the
permutation arithmetic by hand, each layout is written once, forward, as "where does element
(k, n) land" (:func:`int8_positions`, :func:`int4_positions`); reading gathers through it and
writing scatters through it, so the two directions cannot disagree.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

# Each layout keeps every group of columns in one contiguous run of bytes: columns 2b, 2b+1
# (int8) or 4b..4b+3 (int4) fill bytes [2K*b, 2K*(b+1)). The placement inside a run depends only
# on (k, n % group), so one small [K, group] table describes it and a [K, N] index array (8x the
# weight's size: gigabytes for ERNIE-300B's dense MLP) is never built.


@functools.lru_cache(maxsize=64)
def _int8_table(k: int) -> np.ndarray:
    """Byte offset ``[K, 2]`` of element (k, n) inside the 2K-byte run of its column pair."""
    kk = np.arange(k)[:, None]
    j = kk % 16
    jp = np.where(j < 8, 2 * j, 2 * (j - 8) + 1)
    kk = 16 * (kk // 16) + jp
    return (kk % 64) + 128 * (kk // 64) + 64 * np.arange(2)[None, :]


@functools.lru_cache(maxsize=64)
def _int4_table(k: int) -> np.ndarray:
    """Nibble offset ``[K, 4]`` (``2 * byte + is_high``) inside the 2K-byte run of 4 columns."""
    kk = np.arange(k)[:, None]
    k2, half = kk // 2, kk % 2  # step 1: row pairs share a byte, odd row in the high nibble
    j = k2 % 16  # step 2: bytes move
    m = j % 8
    base = np.where(m < 4, 2 * m, 2 * (m - 4) + 1)
    kk2 = 16 * (k2 // 16) + 2 * base + (j // 8)
    dest = (kk2 % 32) + 128 * (kk2 // 32) + 32 * np.arange(4)[None, :]
    b = dest % 4  # step 3: nibbles trade places inside each 4-byte word
    new_byte = (dest - b) + (b & 1) + 2 * half
    return 2 * new_byte + (b >> 1)


def _check(k: int, n: int, group: int, bits: int) -> None:
    if k % 64 or n % group:
        raise ValueError(f"int{bits} weight_quantize layout needs K % 64 == 0 and "
                         f"N % {group} == 0, got {k=} {n=}")


def int8_positions(k: int, n: int) -> np.ndarray:
    """Flat byte index ``[K, N]`` of element (k, n) in Paddle's int8 ``quant_weight [N, K]``."""
    _check(k, n, 2, 8)
    nn = np.arange(n)
    return _int8_table(k)[:, nn % 2] + 2 * k * (nn // 2)[None, :]


def int4_positions(k: int, n: int) -> np.ndarray:
    """Flat *nibble* index ``[K, N]`` (``2 * byte + is_high``) in Paddle's int4 ``[N/2, K]``."""
    _check(k, n, 4, 4)
    nn = np.arange(n)
    return _int4_table(k)[:, nn % 4] + 4 * k * (nn // 4)[None, :]


def _bf16(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(ml_dtypes.bfloat16) if x.dtype == np.uint16 else x.astype(ml_dtypes.bfloat16)


def unpack_weight_only(quant_weight, *, bits: int) -> np.ndarray:
    """Paddle ``quant_weight`` -> plain int8 ``q[K, N]`` (int8: -127..127, int4: -8..7)."""
    qw = np.asarray(quant_weight)
    if qw.dtype not in (np.int8, np.uint8):
        raise TypeError(f"quant_weight must be int8 (or uint8), got {qw.dtype}")
    if bits == 8:
        n, k = qw.shape
        _check(k, n, 2, 8)
        runs = qw.view(np.uint8).reshape(n // 2, 2 * k)
        q = runs[:, _int8_table(k)]  # [N/2, K, 2]
        return (q.transpose(1, 0, 2).reshape(k, n).astype(np.int16) - 128).astype(np.int8)
    if bits == 4:
        n2, k = qw.shape
        n = 2 * n2
        _check(k, n, 4, 4)
        runs = qw.view(np.uint8).reshape(n // 4, 2 * k)
        nib = np.stack([runs & 0xF, runs >> 4], axis=-1).reshape(n // 4, 4 * k)
        q = nib[:, _int4_table(k)]  # [N/4, K, 4]
        return (q.transpose(1, 0, 2).reshape(k, n).astype(np.int8) - 8).astype(np.int8)
    raise ValueError(f"bits must be 8 or 4, got {bits}")


def pack_weight_only(q: np.ndarray, *, bits: int) -> np.ndarray:
    """Plain ``q[K, N]`` -> Paddle's ``quant_weight`` (int8 ``[N, K]`` or ``[N/2, K]``)."""
    q = np.asarray(q)
    k, n = q.shape
    if bits == 8:
        _check(k, n, 2, 8)
        runs = np.empty((n // 2, 2 * k), np.uint8)
        runs[:, _int8_table(k)] = (q.astype(np.int16) + 128).astype(np.uint8).reshape(
            k, n // 2, 2).transpose(1, 0, 2)
        return runs.view(np.int8).reshape(n, k)
    if bits == 4:
        _check(k, n, 4, 4)
        nib = np.zeros((n // 4, 4 * k), np.uint8)
        nib[:, _int4_table(k)] = ((q.astype(np.int16) + 8) & 0xF).astype(np.uint8).reshape(
            k, n // 4, 4).transpose(1, 0, 2)
        return (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(np.int8).reshape(n // 2, k)
    raise ValueError(f"bits must be 8 or 4, got {bits}")


def quantize_weight_only(w, *, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column quantization of ``w[K, N]`` in Paddle's layout.

    Returns ``(quant_weight, weight_scale)`` with ``weight_scale`` bf16 ``[N]`` = absmax / 127
    (int8) or / 7 (int4). Rounding is round-half-to-even; Paddle's own rule differs by one step
    on a few percent of elements (never in placement).
    """
    w = np.asarray(w, dtype=np.float32)
    qmax = {8: 127, 4: 7}[bits]
    scale = _bf16(np.abs(w).max(axis=0) / qmax)
    s32 = np.where(scale.astype(np.float32) == 0, 1.0, scale.astype(np.float32))
    q = np.clip(np.rint(w / s32), -qmax - (bits == 4), qmax).astype(np.int8)
    return pack_weight_only(q, bits=bits), scale


def dequantize_weight_only(quant_weight, weight_scale, *, bits: int):
    """Paddle weight-only int8/int4 tensors -> bf16 ``[K, N]`` (``q * scale``, one rounding).

    Args:
      quant_weight: int8 ``[N, K]`` (``bits=8``) or ``[N/2, K]`` (``bits=4``), Paddle layout.
      weight_scale: bf16 ``[N]`` (or its uint16 bit pattern, or float32).
      bits: 8 or 4.
    """
    import jax.numpy as jnp

    q = unpack_weight_only(quant_weight, bits=bits).astype(np.float32)
    ws = np.asarray(weight_scale)
    scale = _bf16(ws).astype(np.float32) if ws.dtype in (np.uint16,) else ws.astype(np.float32)
    return jnp.asarray((q * scale[None, :]).astype(ml_dtypes.bfloat16))
