"""Calibration-aware WINT2 byte choice: GPTQ-style error feedback over 4-row byte blocks.

Owns the Hessian bookkeeping (``H = X^T X`` from calibration activations, damping, the Cholesky
factor of ``H^-1``) and the sequential byte-row pass. It does not choose codebooks or scales:
:mod:`converters.encode_wint2` fixes those first and hands over the per-column codebook and the
group scales; only the bytes change here.

The pass (Frantar et al., GPTQ, with a 4-row vector quantizer in place of a scalar one). With
``H^-1 = U^T U`` (U upper triangular) and K rows processed in order, byte row ``j`` covers rows
``r = 4j .. 4j+3`` (one 64-row group, so one scale per column). The output error caused by
rounding those rows, once all later rows compensate optimally, is
``||U_rr^-T (w_r - w_hat_r)||^2``; so the byte is the exhaustive best of the 256 tuples in that
metric, and the error ``E = U_rr^-T (w_r - w_hat_r)`` is fed forward as
``W[later] -= U[r, later]^T E``. Without calibration (``H = I``) it reduces to the plain
nearest-tuple assignment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hessian_from_activations(x, *, dtype=np.float64) -> np.ndarray:
    """``X^T X / n`` ``[K, K]`` from calibration activations ``x [..., K]`` (accumulated in f64)."""
    x = np.asarray(x, dtype).reshape(-1, np.shape(x)[-1])
    return (x.T @ x) / max(1, x.shape[0])


@jax.jit
def inverse_hessian_factor(h: jax.Array, damp: float = 0.01) -> jax.Array:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``; dead inputs get ``H_kk = 1``.

    An input that never fires (``H_kk = 0``) carries no output error either way; giving it a unit
    diagonal keeps the factorisation defined and quantizes it as the plain encoder would.
    """
    h = jnp.asarray(h, jnp.float32)
    k = h.shape[0]
    diag = jnp.diagonal(h)
    dead = diag <= 0
    h = jnp.where(dead[:, None] | dead[None, :], 0.0, h) + jnp.diag(jnp.where(dead, 1.0, 0.0))
    h = h + jnp.eye(k, dtype=h.dtype) * (damp * jnp.mean(jnp.diagonal(h)))
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
    return jnp.linalg.cholesky(h_inv).T


def gptq_assign(w: jax.Array, q: jax.Array, s: jax.Array, u: jax.Array) -> jax.Array:
    """Bytes ``[n, K/64, 16]`` chosen row block by row block with error feedback.

    Args:
      w: ``[K, n]`` f32 target weights (natural K order).
      q: ``[n, 256, 4]`` per-column codebook tuples.
      s: ``[n, K/64]`` group scales (``nib * super_scale``), fixed.
      u: ``[K, K]`` from :func:`inverse_hessian_factor`.
    """
    k, n = w.shape
    qf = q.astype(jnp.float32)
    rows = jnp.arange(k)
    cols = jnp.arange(n)

    def step(j, carry):
        wk, idx = carry  # [K, n], [K/4, n]
        r0 = 4 * j
        target = jax.lax.dynamic_slice_in_dim(wk, r0, 4, axis=0)  # [4, n]
        urow = jax.lax.dynamic_slice_in_dim(u, r0, 4, axis=0)  # [4, K]
        u_rr = jax.lax.dynamic_slice_in_dim(urow, r0, 4, axis=1)  # [4, 4] upper
        lin = jnp.linalg.inv(u_rr.T)  # U_rr^-T, lower
        sg = jax.lax.dynamic_index_in_dim(s, r0 // 64, axis=1, keepdims=False)  # [n]
        t_m = lin @ target  # [4, n]
        c_m = jnp.einsum("ab,nub->nua", lin, qf) * sg[:, None, None]  # [n, 256, 4]
        a = jnp.argmin(((t_m.T[:, None, :] - c_m) ** 2).sum(-1), axis=-1)  # [n]
        w_hat = sg[:, None] * qf[cols, a]  # [n, 4]
        err = lin @ (target - w_hat.T)  # [4, n]
        later = jnp.where(rows[None, :] >= r0 + 4, urow, 0.0)  # [4, K]
        wk = wk - jnp.dot(later.T, err, precision=jax.lax.Precision.HIGHEST)
        return wk, idx.at[j].set(a.astype(jnp.int32))

    idx0 = jnp.zeros((k // 4, n), jnp.int32)
    _, idx = jax.lax.fori_loop(0, k // 4, step, (w, idx0))
    return idx.T.reshape(n, k // 64, 16)
