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


@functools.lru_cache(maxsize=64)
def int8_positions(k: int, n: int) -> np.ndarray:
    """Flat byte index ``[K, N]`` of element (k, n) in Paddle's int8 ``quant_weight [N, K]``."""
    if k % 64 or n % 2:
        raise ValueError(f"int8 weight_quantize layout needs K % 64 == 0 and N % 2 == 0, got {k=} {n=}")
    kk = np.arange(k)[:, None]
    nn = np.arange(n)[None, :]
    j = kk % 16
    jp = np.where(j < 8, 2 * j, 2 * (j - 8) + 1)
    kk = 16 * (kk // 16) + jp
    return (kk % 64) + 128 * (kk // 64) + 64 * (nn % 2) + 2 * k * (nn // 2)


@functools.lru_cache(maxsize=64)
def int4_positions(k: int, n: int) -> np.ndarray:
    """Flat *nibble* index ``[K, N]`` (``2 * byte + is_high``) in Paddle's int4 ``[N/2, K]``."""
    if k % 64 or n % 4:
        raise ValueError(f"int4 weight_quantize layout needs K % 64 == 0 and N % 4 == 0, got {k=} {n=}")
    kk = np.arange(k)[:, None]
    nn = np.arange(n)[None, :]
    k2, half = kk // 2, kk % 2  # step 1: row pairs share a byte, odd row in the high nibble
    j = k2 % 16  # step 2: bytes move
    m = j % 8
    base = np.where(m < 4, 2 * m, 2 * (m - 4) + 1)
    kk2 = 16 * (k2 // 16) + 2 * base + (j // 8)
    dest = (kk2 % 32) + 128 * (kk2 // 32) + 32 * (nn % 4) + 2 * k * (nn // 4)
    b = dest % 4  # step 3: nibbles trade places inside each 4-byte word
    new_byte = (dest - b) + (b & 1) + 2 * half
    new_half = b >> 1
    return 2 * new_byte + new_half


def _bf16(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(ml_dtypes.bfloat16) if x.dtype == np.uint16 else x.astype(ml_dtypes.bfloat16)


def unpack_weight_only(quant_weight, *, bits: int) -> np.ndarray:
    """Paddle ``quant_weight`` -> plain int8 ``q[K, N]`` (int8: -127..127, int4: -8..7)."""
    qw = np.asarray(quant_weight)
    if qw.dtype not in (np.int8, np.uint8):
        raise TypeError(f"quant_weight must be int8 (or uint8), got {qw.dtype}")
    flat = qw.view(np.uint8).reshape(-1)
    if bits == 8:
        n, k = qw.shape
        return (flat[int8_positions(k, n)].astype(np.int16) - 128).astype(np.int8)
    if bits == 4:
        n2, k = qw.shape
        pos = int4_positions(k, 2 * n2)
        byte = flat[pos >> 1]
        nib = np.where(pos & 1, byte >> 4, byte & 0xF)
        return (nib.astype(np.int8) - 8).astype(np.int8)
    raise ValueError(f"bits must be 8 or 4, got {bits}")


def pack_weight_only(q: np.ndarray, *, bits: int) -> np.ndarray:
    """Plain ``q[K, N]`` -> Paddle's ``quant_weight`` (int8 ``[N, K]`` or ``[N/2, K]``)."""
    q = np.asarray(q)
    k, n = q.shape
    if bits == 8:
        out = np.empty(k * n, np.uint8)
        out[int8_positions(k, n)] = (q.astype(np.int16) + 128).astype(np.uint8)
        return out.view(np.int8).reshape(n, k)
    if bits == 4:
        nib = np.zeros(k * n, np.uint8)
        nib[int4_positions(k, n)] = ((q.astype(np.int16) + 8) & 0xF).astype(np.uint8)
        out = nib[0::2] | (nib[1::2] << 4)
        return out.view(np.int8).reshape(n // 2, k)
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
