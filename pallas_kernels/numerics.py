"""One comparison helper for kernels, tests and benchmarks: finiteness first, then error stats.

``diff_summary(got, want)`` reports max-abs, rel-L2 and the fraction of elements within an
elementwise tolerance; ``assert_close`` fails with that summary. Tolerances default by the
dtype of the *result* being checked (a bf16 output carries one bf16 rounding on top of the
accumulation; f32 outputs of f32 inputs are held far tighter). Nothing here knows about kernels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# rel-L2 tolerance by result dtype: a bf16 result is rounded once (2^-9 relative) plus
# accumulation-order differences; f32 with f32 (IEEE) dots lands far under 1e-5.
REL_L2_TOL = {"bfloat16": 8e-3, "float16": 2e-3, "float32": 1e-4}


@dataclasses.dataclass(frozen=True)
class DiffSummary:
    shape: tuple[int, ...]
    finite: bool
    max_abs: float
    rel_l2: float
    frac_close: float

    def __str__(self) -> str:
        return (f"shape={self.shape} finite={self.finite} max_abs={self.max_abs:.3g} "
                f"rel_l2={self.rel_l2:.3g} close={100 * self.frac_close:.2f}%")


def diff_summary(got, want, *, atol: float = 1e-2, rtol: float = 1.6e-2) -> DiffSummary:
    g = np.asarray(got, dtype=np.float32)
    w = np.asarray(want, dtype=np.float32)
    if g.shape != w.shape:
        raise AssertionError(f"shape mismatch: got {g.shape}, want {w.shape}")
    finite = bool(np.isfinite(g).all())
    d = np.abs(g - w)
    denom = float(np.linalg.norm(w)) or 1.0
    return DiffSummary(
        shape=g.shape, finite=finite,
        max_abs=float(np.nanmax(d)) if d.size else 0.0,
        rel_l2=float(np.linalg.norm(np.nan_to_num(g - w, nan=np.inf)) / denom),
        frac_close=float(np.mean(d <= atol + rtol * np.abs(w))) if d.size else 1.0)


def assert_close(got, want, *, rel_l2: float | None = None, min_frac_close: float = 0.99,
                 dtype=None, context: str = "") -> DiffSummary:
    """Finite, rel-L2 within the dtype's tolerance, and ``min_frac_close`` elementwise close."""
    name = np.dtype(dtype or np.asarray(got).dtype).name
    tol = rel_l2 if rel_l2 is not None else REL_L2_TOL.get(name, 8e-3)
    s = diff_summary(got, want)
    ok = s.finite and s.rel_l2 <= tol and s.frac_close >= min_frac_close
    if not ok:
        raise AssertionError(f"{context} not close (rel_l2 tol {tol:.1e}, dtype {name}): {s}")
    return s
