"""Named ERNIE-4.5 MoE shapes, token buckets and routings: what the kernels are tuned and timed on.

This module owns the problem sizes (not the kernels): the per-layer expert FFN of the 300B and
21B models, the token counts of the benchmark, and deterministic routings (uniform and skewed)
turned into the rows-sorted-by-expert ``group_sizes`` the grouped ops take. It also builds
random, *valid* packed weights of every format (WINT2 codes inside the 15-bit range), used by the
tests and the benchmark alike.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
ROUTINGS = ("uniform", "skewed")


@dataclasses.dataclass(frozen=True)
class MoeShape:
    """One MoE layer's expert FFN: up_gate ``[H, 2I]`` (+ SwiGLU) then down ``[I, H]``."""

    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int

    @property
    def up_gate(self) -> tuple[int, int]:
        return self.hidden, 2 * self.inter

    @property
    def down(self) -> tuple[int, int]:
        return self.inter, self.hidden

    def weights_per_expert(self) -> int:
        return self.hidden * 2 * self.inter + self.inter * self.hidden


ERNIE_300B = MoeShape("ernie45_300b", experts=64, top_k=8, hidden=8192, inter=3584)
ERNIE_21B = MoeShape("ernie45_21b", experts=64, top_k=6, hidden=2560, inter=1536)
SHAPES = {s.name: s for s in (ERNIE_300B, ERNIE_21B)}


@dataclasses.dataclass(frozen=True)
class DenseLinear:
    """One non-expert linear ``[K, N]`` of a model, in its checkpoint format."""

    name: str
    k: int
    n: int
    fmt: str


# WINT8 attention / dense MLP of the w4w2 releases; the untied lm_head stays bf16.
DENSE = {
    "ernie45_300b": (DenseLinear("qkv", 8192, (64 + 2 * 8) * 128, "wint8"),
                     DenseLinear("o", 8192, 8192, "wint8"),
                     DenseLinear("dense_up_gate", 8192, 2 * 28672, "wint8"),
                     DenseLinear("dense_down", 28672, 8192, "wint8"),
                     DenseLinear("lm_head", 8192, 103424, "bf16")),
    "ernie45_21b": (DenseLinear("qkv", 2560, (20 + 2 * 4) * 128, "wint8"),
                    DenseLinear("o", 2560, 2560, "wint8"),
                    DenseLinear("dense_up_gate", 2560, 2 * 12288, "wint8"),
                    DenseLinear("dense_down", 12288, 2560, "wint8"),
                    DenseLinear("shared_up_gate", 2560, 2 * 3072, "wint8"),  # 2 shared experts
                    DenseLinear("shared_down", 3072, 2560, "wint8"),
                    DenseLinear("lm_head", 2560, 103424, "bf16")),
}


def route(tokens: int, shape: MoeShape, kind: str, seed: int = 0) -> np.ndarray:
    """Expert ids ``[tokens, top_k]`` (distinct per token), deterministic per seed.

    ``uniform``: each token picks top_k distinct experts uniformly. ``skewed``: experts drawn
    with probability ~ 1/(rank+1)^1.5 under a random ranking (a few hot experts, a long tail
    of cold or empty ones), the pattern real routers show on narrow prompts.
    """
    rng = np.random.default_rng(seed)
    e = shape.experts
    if kind == "uniform":
        p = np.full(e, 1.0 / e)
    elif kind == "skewed":
        p = 1.0 / (np.arange(e) + 1.0) ** 1.5
        p = p[rng.permutation(e)] / p.sum()
    else:
        raise ValueError(f"unknown routing {kind!r}")
    return np.stack([rng.choice(e, size=shape.top_k, replace=False, p=p) for _ in range(tokens)])


def group_sizes(expert_ids: np.ndarray, experts: int) -> np.ndarray:
    """Rows per expert once the ``tokens x top_k`` rows are sorted by expert id (int32 ``[E]``)."""
    return np.bincount(expert_ids.ravel(), minlength=experts).astype(np.int32)


DYADIC_CODES = False
""":func:`random_linear` makes WINT2 codes coarse dyadic (:func:`dyadic_codes`; a bench flag)."""


def random_linear(key: jax.Array, fmt: str, k: int, n: int,
                  experts: int | None = None) -> dict[str, jax.Array]:
    """Random runtime-layout ``<linear>`` leaves (``jaxwint2/layout.py``) of ``fmt``, on device.

    Values are scaled so that ``x @ W`` with unit-normal x has outputs of order one. WINT2
    ``code_scale`` / ``code_zp`` are arbitrary (non-dyadic) fp32 values, as in real checkpoints,
    with every code inside ``[0, 2^15)``.
    """
    e = () if experts is None else (experts,)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    u = functools.partial(jax.random.uniform, dtype=jnp.float32)
    if fmt == "bf16":
        return {"weight": (jax.random.normal(k1, (*e, k, n), jnp.bfloat16) / np.sqrt(k))
                .astype(jnp.bfloat16)}
    if fmt in ("wint8", "wint4"):
        qmax = 127 if fmt == "wint8" else 7
        scale = (u(k2, (*e, n), minval=0.5, maxval=1.5) / (qmax * np.sqrt(k) / 2))
        scale = scale.astype(jnp.bfloat16)
        if fmt == "wint8":
            q = jax.random.randint(k1, (*e, k, n), -qmax, qmax + 1, jnp.int32).astype(jnp.int8)
            return {"quant_weight": q, "weight_scale": scale}
        packed = jax.random.bits(k1, (*e, k // 2, n), jnp.uint8)  # two nibbles q + 8
        return {"quant_weight": packed, "weight_scale": scale}
    if fmt == "wint2":
        cs = u(k2, (*e, n), minval=100.0, maxval=125.0)
        zp = u(k3, (*e, n)) * (32767.0 - 255.0 * cs)
        ss = (u(k4, (*e, n), minval=0.5, maxval=1.5) / (32 * 8 * np.sqrt(k) / 2))
        k5, k6 = jax.random.split(k1)
        w = {"quant_weight": jax.random.bits(k5, (*e, k // 4, n), jnp.uint8),
             "weight_scale": jax.random.bits(k6, (*e, -(-k // 128), n), jnp.uint8),
             "super_scales": ss.astype(jnp.bfloat16).astype(jnp.float32),
             "code_scale": cs, "code_zp": zp}
        return dyadic_codes(w) if DYADIC_CODES else w
    raise ValueError(f"unknown format {fmt!r}")


def dyadic_codes(w: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A WINT2 ``w`` whose ``code_scale`` / ``code_zp`` are rounded to coarse dyadic values (cs
    a multiple of 1/64, zp 1/128 modulo 1/64, as our encoder writes them): every column then
    has an exact integer code step (``wint2.affine_codes``), where 0.02 % of this module's
    arbitrary ones (cs 100-125) do not, ~2 % at cs 32-120. For benchmarking that step on all
    columns."""
    cs = jnp.floor(w["code_scale"] * 64) / 64
    zp = jnp.floor(w["code_zp"] * 64) / 64 + 1 / 128
    return {**w, "code_scale": cs, "code_zp": zp}


def packed_bytes(fmt: str, k: int, n: int) -> int:
    """Bytes of one expert's ``<linear>`` in runtime layout (what a kernel must read)."""
    if fmt == "bf16":
        return 2 * k * n
    if fmt == "wint8":
        return k * n + 2 * n
    if fmt == "wint4":
        return k * n // 2 + 2 * n
    if fmt == "wint2":
        return k * n // 4 + -(-k // 128) * n + 12 * n
    raise ValueError(f"unknown format {fmt!r}")
