"""Self-checks of the Pallas kernels against the jnp reference, shared by tests and ``bench.py``.

Owns *what* is checked (every format, dense and grouped, epilogues, K orders, x dtypes; the
in-kernel WINT2 decode bit-exact through a one-hot x) on fresh random data; it does not know
pytest. On a GPU the device memory is filled with NaN and released just before each kernel
call, so that an output element the kernel fails to write shows up as non-finite instead of a
stale correct value (best effort: it relies on the allocator reusing the block).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from . import api, kernels, reference, shapes
from .config import TuningConfig
from .numerics import assert_close
from .wint2 import count_unfused_mismatches, dequantize_wint2

FORMATS = ("wint2", "wint4", "wint8", "bf16")


def _poison(nbytes: int) -> None:
    if jax.default_backend() == "gpu":
        jax.block_until_ready(jnp.full((max(nbytes, 4) // 4 * 2,), jnp.nan, jnp.float32)).delete()


def skewed_group_sizes(rng: np.random.Generator, m: int, e: int, *, padding: int) -> np.ndarray:
    """Random sizes summing to ``m - padding`` with empty experts and one hot expert."""
    live = m - padding
    p = rng.dirichlet(np.full(e, 0.3))
    p[rng.choice(e, size=max(1, e // 3), replace=False)] = 0.0  # empty experts
    p = p / p.sum() if p.sum() > 0 else np.full(e, 1.0 / e)
    return rng.multinomial(live, p).astype(np.int32)


def _exact_oracle(w: dict, fmt: str, k_order: str) -> tuple[dict, str]:
    """Reference weights for ``fmt``: the WINT2 ones decoded bit-exactly (fused multiply-add).

    The traced reference decode evaluates ``u * cs + zp`` unfused on a CPU and so differs from
    the format on a few elements; the oracle must not, or it would blame the kernel for that.
    """
    if fmt != "wint2":
        return w, fmt
    leaves = (np.asarray(w[f]) for f in ("quant_weight", "weight_scale", "super_scales",
                                         "code_scale", "code_zp"))
    return {"weight": jnp.asarray(dequantize_wint2(*leaves, k_order=k_order))}, "bf16"


def check_matmul(fmt: str, *, grouped: bool, activation=None, row_scale: bool = False,
                 k_order: str = "natural", x_dtype=jnp.bfloat16, m: int = 24, k: int = 256,
                 n: int = 64, e: int = 3, padding: int = 3, seed: int = 0, interpret: bool,
                 config: TuningConfig | None = None):
    """Run the kernel once on fresh random data and assert it matches the reference."""
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    w = shapes.random_linear(key, fmt, k, n, e if grouped else None)
    x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(x_dtype)
    rs = jax.random.uniform(jax.random.fold_in(key, 2), (m,)) if row_scale else None
    kw = dict(fmt=fmt, k_order=k_order, activation=activation, row_scale=rs)
    n_out = n // 2 if activation == "swiglu" else n
    oracle, ref_fmt = _exact_oracle(w, fmt, k_order)
    ref_kw = dict(kw, fmt=ref_fmt, k_order="natural")
    if grouped:
        gs = jnp.asarray(skewed_group_sizes(rng, m, e, padding=padding))
        _poison(m * n_out * 4)
        got = kernels.quant_grouped_matmul(x, w, gs, interpret=interpret, config=config, **kw)
        want = reference.quant_grouped_matmul_reference(x, oracle, gs, **ref_kw)
    else:
        _poison(m * n_out * 4)
        got = kernels.quant_matmul(x, w, interpret=interpret, config=config, **kw)
        want = reference.quant_matmul_reference(x, oracle, **ref_kw)
    ctx = (f"{fmt} grouped={grouped} act={activation} row_scale={row_scale} {k_order} "
           f"x={jnp.dtype(x_dtype).name} M={m} K={k} N={n} config={config}")
    assert got.shape == want.shape and got.dtype == want.dtype, (ctx, got.shape, got.dtype)
    # WINT4/8 scale the fp32 accumulator (codecs.py): W is not rounded to bf16 per element, so
    # an f32 result differs from the reference by that rounding (~2^-9 relative per weight).
    scaled_acc = fmt in ("wint4", "wint8") or getattr(config, "mode", "") == "mma_gs"
    tol = 4e-3 if scaled_acc and x_dtype == jnp.float32 else None
    s = assert_close(got, want, rel_l2=tol, context=ctx)
    if grouped and padding:
        assert not np.asarray(got[m - padding:]).astype(np.float32).any(), f"{ctx}: padding rows"
    return s


def check_wint2_decode_exact(*, interpret: bool, k: int = 128, n: int = 64, seed: int = 0,
                             k_order: str = "natural", config: TuningConfig | None = None) -> int:
    """One-hot rows of x read the decoded weights back: they must equal the exact decode.

    Returns how many (column, byte) pairs of the random ``code_scale``/``code_zp`` would decode
    differently under unfused fp32 math (so the check has teeth when that count is > 0).
    """
    w = shapes.random_linear(jax.random.key(seed), "wint2", k, n)
    x = jnp.eye(k, dtype=jnp.bfloat16)
    got = kernels.quant_matmul(x, w, interpret=interpret, fmt="wint2", k_order=k_order,
                               config=config).astype(jnp.float32)  # one bf16 rounding
    exact = dequantize_wint2(*(np.asarray(w[f]) for f in ("quant_weight", "weight_scale",
                                                          "super_scales", "code_scale",
                                                          "code_zp")), k_order=k_order)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(exact).astype(np.float32))
    return count_unfused_mismatches(np.asarray(w["code_scale"]), np.asarray(w["code_zp"]))


def matrix(*, interpret: bool):
    """The check matrix: (kwargs of :func:`check_matmul`) for every format and feature."""
    for fmt, grouped in itertools.product(FORMATS, (True, False)):
        yield dict(fmt=fmt, grouped=grouped)
        yield dict(fmt=fmt, grouped=grouped, activation="swiglu", row_scale=True)
    yield dict(fmt="wint2", grouped=True, k_order="shuffled", activation="swiglu")
    yield dict(fmt="wint2", grouped=True, x_dtype=jnp.float32, row_scale=True)
    yield dict(fmt="wint4", grouped=False, x_dtype=jnp.float32)
    split2 = TuningConfig(block_m=16, block_n=32, block_k=128, split_k=2)
    yield dict(fmt="wint8", grouped=False, activation="swiglu", row_scale=True, config=split2)
    yield dict(fmt="wint2", grouped=True, activation="swiglu", row_scale=True,
               config=dataclasses.replace(split2, mode="mma_gs"))
    if not interpret:  # bigger, realistic shapes only where the real kernel runs
        for fmt in FORMATS:
            yield dict(fmt=fmt, grouped=True, activation="swiglu", m=600, k=1024, n=1024, e=16,
                       padding=40, seed=3)
            yield dict(fmt=fmt, grouped=True, row_scale=True, m=2048, k=512, n=512, e=8,
                       padding=0, seed=4, config=TuningConfig(block_m=128, block_n=128,
                                                              block_k=128, num_warps=8))
        yield dict(fmt="wint2", grouped=True, activation="swiglu", m=600, k=1024, n=1024, e=16,
                   padding=40, seed=5, config=TuningConfig(block_m=16, block_n=64, block_k=256,
                                                          mode="mma_gs"))


def check_large_layer_stack() -> float:
    """A WINT8 layer stack of > 2**31 int8 elements (2.2 GB), last layer, kernel vs reference.

    Pallas's Triton lowering would address it with 32-bit offsets (``kernel_triton``); this
    catches a jax whose lowering changed under the workaround. GPU only (memory, time).
    """
    layers, k, n = 33, 8192, 8192
    key = jax.random.key(11)
    q = jax.random.randint(key, (layers, k, n), -127, 128, jnp.int8)
    scale = jnp.full((layers, n), 1e-3, jnp.bfloat16)
    w = {"quant_weight": q, "weight_scale": scale}
    x = jax.random.normal(jax.random.fold_in(key, 1), (16, k), jnp.bfloat16)
    got = jax.jit(lambda x, w: api.quant_matmul(x, w, fmt="wint8", implementation="pallas",
                                                layer=layers - 1))(x, w)
    want = api.quant_matmul(x, {kk: v[layers - 1] for kk, v in w.items()}, fmt="wint8",
                            implementation="xla")
    return assert_close(got, want, rel_l2=1e-2, min_frac_close=0.97,
                        context="wint8 layer stack of > 2**31 elements")


def check_paged_attention(*, interpret: bool) -> list:
    """The paged decode-attention kernel vs its jnp reference at ERNIE-4.5 decode shapes
    (300B: 64 q / 8 kv heads; 21B: 20 / 4), rows of different lengths, a stacked cache."""
    from .paged_attention import paged_attention

    out = []
    shapes_ = [(4, 8, 2, 64, 16, 3)] if interpret else [(64, 64, 8, 128, 64, 33),
                                                         (8, 20, 4, 128, 64, 33)]
    for b, nh, nkv, d, bs, p in shapes_:
        key = jax.random.key(b * nh)
        nb = b * p + 1
        k = jax.random.normal(key, (2, nb, bs, nkv, d), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 1), (2, nb, bs, nkv, d), jnp.bfloat16)
        q = jax.random.normal(jax.random.fold_in(key, 2), (b, nh, d), jnp.bfloat16)
        tables = jax.random.permutation(jax.random.fold_in(key, 3), nb)[:b * p].reshape(b, p)
        lengths = jax.random.randint(jax.random.fold_in(key, 4), (b,), 0, p * bs + 1)
        lengths = lengths.at[0].set(p * bs)
        got = paged_attention(q, k, v, tables, lengths, layer=1, implementation="pallas")
        want = paged_attention(q, k, v, tables, lengths, layer=1, implementation="xla")
        out.append(assert_close(got, want, rel_l2=1e-2, min_frac_close=0.97,
                                context=f"paged attention b={b} heads={nh}/{nkv}"))
    return out


def run_all(*, interpret: bool) -> None:
    print(f"check ok: paged attention {check_paged_attention(interpret=interpret)}", flush=True)
    if not interpret:
        print(f"check ok: large layer stack {check_large_layer_stack()}", flush=True)
    n = 0
    for kw in matrix(interpret=interpret):
        s = check_matmul(interpret=interpret, **kw)
        n += 1
        print(f"check ok: {kw} -> {s}", flush=True)
    gs = TuningConfig(block_m=16, block_n=32, block_k=128, mode="mma_gs")
    for order, cfg in (("natural", None), ("shuffled", None), ("natural", gs)):
        exposed = check_wint2_decode_exact(interpret=interpret, k_order=order, config=cfg)
        print(f"check ok: wint2 one-hot decode bit-exact ({order}, {cfg}); {exposed} (column, "
              f"byte) pairs differ under unfused math", flush=True)
    print(f"all {n + 3} kernel checks passed", flush=True)
