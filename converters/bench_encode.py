"""``python -m converters.bench_encode``: WINT2 encoder quality and speed, against 2-bit baselines.

Owns the two round-to-nearest baselines the encoder is judged against and the benchmark that
prints one JSON line per measurement:

* ``quality``: relative weight error ``||W - W_hat||^2 / ||W||^2`` of :func:`encode_wint2` on i.i.d.
  Gaussian and Student-t(5) matrices (decoded with the exact ``pallas_kernels.dequantize_wint2``),
  next to a symmetric 4-level RTN that uses the same group-scale structure (4-bit nibble per 64
  rows x bf16 super scale per column, 2.07 bits/weight) and an asymmetric 2-bit RTN with an fp16
  scale and zero per 64 rows (2.5 bits/weight);
* ``speed``: seconds to encode one matrix on the default device after a warm-up
  (``block_until_ready``), the ERNIE-300B up_gate shape ``8192 x 7168`` by default.

It knows nothing about checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.wint2 import GROUP_SIZE, dequantize_wint2

from .encode_wint2 import encode_device, encode_wint2, pack_checkpoint, quantize_scales

_SHRINK = jnp.linspace(0.25, 1.0, 31)


def _groups(w: jax.Array) -> jax.Array:
    k, n = w.shape
    return jnp.asarray(w, jnp.float32).T.reshape(n, k // GROUP_SIZE, GROUP_SIZE)  # [N, G, 64]


def _ungroup(x: jax.Array) -> jax.Array:
    n, g, _ = x.shape
    return x.reshape(n, g * GROUP_SIZE).T


@jax.jit
def rtn_symmetric_4level(w: jax.Array) -> jax.Array:
    """Levels ``(-1.5, -0.5, 0.5, 1.5) * d`` per 64 rows, ``d = nib * super_scale`` as in WINT2.

    ``d`` per group: best of a grid of fractions of the group's absmax, then least-squares
    refined; nibbles and the bf16 super scale are chosen as the encoder chooses them.
    """
    x = _groups(w)  # [N, G, 64]
    amax = jnp.abs(x).max(-1, keepdims=True)

    def levels(d):
        safe = jnp.where(d > 0, d, 1.0)
        return jnp.clip(jnp.floor(x / safe), -2, 1) + 0.5

    d_grid = amax[..., None] * _SHRINK / 1.5  # [N, G, 1, S]
    lv = jnp.clip(jnp.floor(x[..., None] / jnp.where(d_grid > 0, d_grid, 1)), -2, 1) + 0.5
    err = ((x[..., None] - lv * d_grid) ** 2).sum(-2)  # [N, G, S]
    d = jnp.take_along_axis(d_grid[..., 0, :], jnp.argmin(err, -1)[..., None], -1)[..., 0]
    for _ in range(3):
        lv = levels(d[..., None])
        d = (x * lv).sum(-1) / (lv * lv).sum(-1)
    lv = levels(d[..., None])
    ss, nib = quantize_scales(d, (lv * lv).sum(-1))
    dq = (nib * ss[:, None])[..., None]
    return _ungroup(levels(dq) * dq)


@jax.jit
def rtn_asymmetric_2bit(w: jax.Array) -> jax.Array:
    """``q in 0..3``, ``w = q * scale + zero`` per 64 rows with fp16 scale and zero.

    The range ``[lo, hi]`` is the best of a grid of shrunk min/max pairs, then the line
    ``scale * q + zero`` is least-squares refined for the chosen codes.
    """
    x = _groups(w)[..., None]  # [N, G, 64, 1]
    lo0, hi0 = x.min(-2, keepdims=True), x.max(-2, keepdims=True)
    f = jnp.linspace(0.4, 1.0, 13)
    s2 = f.size * f.size
    grid = (*lo0.shape[:-1], f.size, f.size)
    lo = jnp.broadcast_to(lo0[..., None] * f[:, None], grid).reshape(*grid[:-2], s2)
    hi = jnp.broadcast_to(hi0[..., None] * f[None, :], grid).reshape(*grid[:-2], s2)

    def codes(scale, zero):
        return jnp.clip(jnp.round((x - zero) / jnp.where(scale > 0, scale, 1)), 0, 3)

    scale, zero = (hi - lo) / 3, lo  # [N, G, 1, S*S]
    err = ((x - codes(scale, zero) * scale - zero) ** 2).sum(-2)  # [N, G, S*S]
    j = jnp.argmin(err, -1)[..., None, None]
    scale = jnp.take_along_axis(scale, j, -1)
    zero = jnp.take_along_axis(zero, j, -1)
    for _ in range(3):
        q = codes(scale, zero)
        qm, xm = q.mean(-2, keepdims=True), x.mean(-2, keepdims=True)
        var = ((q - qm) ** 2).sum(-2, keepdims=True)
        scale = jnp.where(var > 0, ((q - qm) * (x - xm)).sum(-2, keepdims=True)
                          / jnp.where(var > 0, var, 1), scale)
        zero = xm - scale * qm
    scale = scale.astype(jnp.float16).astype(jnp.float32)
    zero = zero.astype(jnp.float16).astype(jnp.float32)
    return _ungroup((codes(scale, zero) * scale + zero)[..., 0])


def relative_error(w, w_hat) -> float:
    """``||W - W_hat||^2 / ||W||^2`` in float64."""
    w = np.asarray(w, np.float64)
    return float(((w - np.asarray(w_hat, np.float64)) ** 2).sum() / (w * w).sum())


def sample(dist: str, k: int, n: int, seed: int = 0) -> np.ndarray:
    """An i.i.d. ``[k, n]`` float32 matrix: ``"gaussian"`` or ``"student_t5"``."""
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        return rng.standard_normal((k, n), np.float32)
    if dist == "student_t5":
        return rng.standard_t(5, (k, n)).astype(np.float32)
    raise ValueError(f"unknown distribution {dist!r}")


def quality(k: int, n: int, seed: int = 0, effort: str = "default") -> list[dict]:
    rows = []
    for dist in ("gaussian", "student_t5"):
        w = sample(dist, k, n, seed)
        enc = encode_wint2(w, effort=effort)
        rows.append({"bench": "quality", "dist": dist, "shape": [k, n], "effort": effort,
                     "wint2_ccq": relative_error(w, np.asarray(dequantize_wint2(**enc),
                                                               np.float32)),
                     "rtn_sym4_same_scales": relative_error(w, rtn_symmetric_4level(w)),
                     "rtn_asym2_g64_fp16": relative_error(w, rtn_asymmetric_2bit(w)),
                     "bits_per_weight": {"wint2_ccq": 2 + (4 / 64) + (16 + 64) / k,
                                         "rtn_sym4_same_scales": 2 + 4 / 64 + 16 / k,
                                         "rtn_asym2_g64_fp16": 2.5}})
    return rows


def correlated_activations(k: int, rows: int, seed: int) -> np.ndarray:
    """``[rows, k]`` activations with a decaying-spectrum input covariance (LLM-like)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / (k / 8))[None, :]
    scale = np.exp(rng.standard_normal(k) * 0.5)  # a few loud input channels
    return (rng.standard_normal((rows, k)) @ mix.T * scale).astype(np.float32)


def calibration(k: int, n: int, seed: int = 0, effort: str = "default") -> dict:
    """Output error ``||X W - X W_hat|| / ||X W||`` on held-out X, without / with a Hessian."""
    from .encode_gptq import hessian_from_activations

    x_cal = correlated_activations(k, 4 * k, seed)
    x_test = correlated_activations(k, 4 * k + 1024, seed)[4 * k:]
    w = sample("gaussian", k, n, seed + 1)
    y = x_test @ w

    def out_err(enc):
        wh = np.asarray(dequantize_wint2(**enc), np.float32)
        return float(np.linalg.norm(y - x_test @ wh) / np.linalg.norm(y))

    plain = encode_wint2(w, effort=effort)
    cal = encode_wint2(w, hessian=hessian_from_activations(x_cal), effort=effort)
    return {"bench": "calibration", "shape": [k, n], "effort": effort,
            "calibration_rows": int(x_cal.shape[0]), "held_out_rows": int(x_test.shape[0]),
            "output_error_plain": out_err(plain), "output_error_gptq": out_err(cal),
            "weight_error_plain": relative_error(w, dequantize_wint2(**plain)),
            "weight_error_gptq": relative_error(w, dequantize_wint2(**cal))}


def speed(k: int, n: int, repeats: int = 3, seed: int = 0, effort: str = "default") -> dict:
    w = jax.device_put(jnp.asarray(sample("gaussian", k, n, seed), jnp.bfloat16))
    t0 = time.perf_counter()
    jax.block_until_ready(encode_device(w, effort=effort))  # compile + warm-up
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(encode_device(w, effort=effort))
        times.append(time.perf_counter() - t0)
    packed = pack_checkpoint(out)
    err = relative_error(np.asarray(w, np.float32),
                         np.asarray(dequantize_wint2(**packed), np.float32))
    return {"bench": "speed", "shape": [k, n], "effort": effort,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "seconds_median": float(np.median(times)), "seconds_all": times,
            "seconds_first_call_incl_compile": first, "relative_error": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="WINT2 encoder quality/speed benchmark (JSON lines)")
    p.add_argument("--quality-shape", type=int, nargs=2, default=(4096, 4096))
    p.add_argument("--speed-shape", type=int, nargs=2, default=(8192, 7168))
    p.add_argument("--speed-efforts", nargs="+", default=["default"],
                   choices=("fast", "default", "best"))
    p.add_argument("--quality-efforts", nargs="+", default=["default"],
                   choices=("fast", "default", "best"))
    p.add_argument("--calibration-shape", type=int, nargs=2, default=None,
                   help="also run the calibration (GPTQ) bench at this [K, N]")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    a = p.parse_args(argv)
    if not a.skip_speed:
        for effort in a.speed_efforts:
            print(json.dumps(speed(*a.speed_shape, effort=effort)), flush=True)
    if a.calibration_shape:
        print(json.dumps(calibration(*a.calibration_shape)), flush=True)
    if not a.skip_quality:
        for effort in a.quality_efforts:
            for row in quality(*a.quality_shape, effort=effort):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
