"""The Mosaic kernel's operand prologue (``prologue.py``): one Triton launch against the jnp
composition it replaces (``expert_tiles``, ``fp16_row_scales``, the plane permutation,
``fp16_plane_columns``, ``group_sums``).

On a CPU the kernel runs in Pallas's interpret mode and lowers through Triton for CUDA; on an
sm90 GPU it runs compiled. Tiles, x planes and inverse row scales must be identical; the group
sums equal up to fp32 summation order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kernel_mosaic as km
from pallas_kernels import prologue

CASES = [  # m, k, group sizes, bm, sums, fp16, k_order, (layer, layers)
    (8, 512, [2, 0, 3], 4, True, True, "natural", None),  # padding rows past the sizes' sum
    (16, 768, [2, 0, 3, 5], 8, True, False, "shuffled", None),  # K = 3 * 256: 3 chunks
    (12, 256, [12, 0, 0], 8, False, False, "natural", (1, 3)),  # wgmma: x planes only
    (40, 512, [10, 3, 0, 20, 1], 16, True, True, "natural", (2, 3)),  # layer fold, 2 tiles
    (8, 1024, [0, 0, 0, 0, 0, 0, 8, 0], 8, True, True, "shuffled", None),  # one expert
]


def _pieces(k):  # several programs a row: 1, 2 or 3 of them, whole K steps each
    return k // km.BLOCK_K if k // km.BLOCK_K <= 3 else 2


def _x(m, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.exp2(rng.integers(-20, 20, (m, 1)))
    x[1] = 0.0  # a zero row: scale 2^14
    x[2] = rng.standard_normal(k) * 2.0**-118  # under the exponent floor (FP16_MIN_EXPONENT)
    x[3, 5] = 3e38  # near bf16's largest
    return jnp.asarray(x, jnp.bfloat16)


def _run(case, **kw):
    m, k, sizes, bm, sums, fp16, k_order, lay = case
    layer, layers = lay or (None, 1)
    return prologue.expert_operands(_x(m, k), jnp.asarray(sizes, jnp.int32), bm=bm, sums=sums,
                                    fp16=fp16, k_order=k_order, layer=layer,
                                    num_layers=layers, **kw)


def _assert_same(got, want, *, bm: int, sums: bool, fp16: bool):
    for a, b, name in zip(got.tiles, want.tiles, ("group", "row0", "hi"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    _, row0, hi = (np.asarray(a) for a in want.tiles)
    # The rows the matmul kernel stores (row i of tile t: row0 + i < hi); the rest are padding.
    rows = [t * bm + i for t in range(len(row0)) for i in range(bm) if row0[t] + i < hi[t]]
    assert len(rows) == len(set(row0[t] + i for t in range(len(row0)) for i in range(bm)
                                if row0[t] + i < hi[t]))
    assert got.x_planes.dtype == want.x_planes.dtype
    np.testing.assert_array_equal(np.asarray(got.x_planes, np.float32)[rows],
                                  np.asarray(want.x_planes, np.float32)[rows])
    if sums:
        # fp32 sums of 64 terms in another order: within a few ulps of the terms' magnitudes
        offsets = km.FP16_PLANE_OFFSETS if fp16 else km.BF16_PLANE_OFFSETS
        mag = np.asarray(km.group_sums(jnp.abs(want.x_planes), offsets))
        mag = mag[rows]
        a, b = np.asarray(got.sums)[rows], np.asarray(want.sums)[rows]
        with np.errstate(invalid="ignore"):  # bf16 planes: 3e38 * 160 is inf in both
            assert ((a == b) | (np.abs(a - b) <= 1e-6 * mag)).all()
    else:
        assert got.sums is None and want.sums is None
    if fp16:
        np.testing.assert_array_equal(np.asarray(got.row_inv), np.asarray(want.row_inv))
        assert np.isfinite(np.asarray(got.row_inv)).all()
    else:
        assert got.row_inv is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-k{c[1]}-bm{c[3]}-{c[6]}")
def test_one_launch_equals_the_jnp_composition(case):
    got = _run(case)
    want = _run(case, implementation="xla")
    _assert_same(got, want, bm=case[3], sums=case[4], fp16=case[5])


@pytest.mark.parametrize("case", [c for c in CASES if _pieces(c[1]) > 1],
                         ids=lambda c: f"m{c[0]}-k{c[1]}-bm{c[3]}-{c[6]}")
def test_rows_in_pieces_equal_the_jnp_composition(case):
    """Several programs a row (each K / pieces columns; fp16 rows' scale from the whole row)."""
    got = _run(case, pieces=_pieces(case[1]))
    _assert_same(got, _run(case, implementation="xla"), bm=case[3], sums=case[4], fp16=case[5])


SWIGLU_CASES = [  # m, k, group sizes, bm, sums, fp16, k_order, (layer, layers), splits, pieces
    (8, 512, [2, 0, 3], 8, True, True, "natural", None, 2, 1),
    (16, 768, [2, 0, 3, 5], 8, True, False, "shuffled", None, 4, 3),
    (24, 1024, [10, 3, 0, 11], 16, False, False, "natural", (1, 2), 2, 2),
    # fp16 in pieces: each piece's row maximum from a pass over the whole row (K = 768 pads
    # to 1024 by re-reading column 767)
    (8, 768, [3, 0, 5], 8, True, True, "shuffled", None, 2, 3),
]


def _partials(s, m, k, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((s, m, 2 * k)) * np.exp2(rng.integers(-6, 6, (1, m, 1)))
    return jnp.asarray(p, jnp.float32)


def _run_swiglu(case, **kw):
    m, k, sizes, bm, sums, fp16, k_order, lay, splits, pieces = case
    layer, layers = lay or (None, 1)
    return prologue.expert_operands(_partials(splits, m, k), jnp.asarray(sizes, jnp.int32),
                                    bm=bm, sums=sums, fp16=fp16, k_order=k_order, layer=layer,
                                    num_layers=layers, swiglu_partials=True, **kw)


@pytest.mark.parametrize("case", SWIGLU_CASES, ids=lambda c: f"m{c[0]}-k{c[1]}-s{c[8]}")
def test_rows_from_swiglu_partials_equal_the_jnp_composition(case):
    """The down projection's operands straight from the up_gate's split-K partial sums: the
    sum, SwiGLU and bf16 rounding of the rows happen in the launch (``swiglu_rows``)."""
    got = _run_swiglu(case, pieces=case[-1])
    _assert_same(got, _run_swiglu(case, implementation="xla"), bm=case[3], sums=case[4],
                 fp16=case[5])
    # and the spec itself against numpy: silu(sum of gates) * sum of ups, rounded to bf16
    p = np.asarray(_partials(case[8], case[0], case[1]), np.float64).sum(0)
    g, u = p[:, :case[1]], p[:, case[1]:]
    want = g / (1 + np.exp(-g)) * u
    got_rows = np.asarray(prologue.swiglu_rows(_partials(case[8], case[0], case[1])), np.float64)
    np.testing.assert_allclose(got_rows, want, rtol=2**-8, atol=1e-9)  # fp32 sums vs float64


def test_swiglu_partials_must_be_fp32_splits():
    with pytest.raises(ValueError, match="swiglu_partials takes fp32 partial sums"):
        prologue.expert_operands(_x(8, 512), jnp.asarray([8], jnp.int32), bm=8, sums=True,
                                 fp16=False, swiglu_partials=True)


def test_pieces_that_do_not_split_k_into_steps_are_refused():
    with pytest.raises(ValueError, match="pieces=3 must split K=512"):
        _run(CASES[0], pieces=3)


def test_fp16_rows_fit_fp16_and_the_inverse_undoes_the_scale():
    """Independent of the code under test: every row's largest scaled value is in [2^13, 2^14)
    (or the row is zero / under the exponent floor), and ``row_inv`` is a power of two."""
    case = (8, 512, [3, 5], 8, True, True, "natural", None)
    ops = _run(case)
    x = np.asarray(_x(8, 512), np.float32)
    inv = np.asarray(ops.row_inv, np.float64)
    assert (np.frexp(inv)[0] == 0.5).all()
    for r in range(8):
        amax = np.abs(x[r]).max() / inv[r]
        if r == 1:
            assert inv[r] == 2.0**-14
        elif r == 2:
            assert amax < 2.0**13 and inv[r] == 2.0**-126
        else:
            assert 2.0**13 <= amax < 2.0**14


@pytest.mark.parametrize("m,k,bm,sums,fp16,k_order,layers,pieces,splits", [
    (8, 8192, 8, True, True, "natural", None, 1, 0),  # 300B up_gate at 1 token
    (8, 8192, 8, True, True, "natural", None, 8, 0),  # ... 8 programs a row
    (128, 2560, 16, False, False, "shuffled", 3, 1, 0),  # 21B up_gate, wgmma, a layer stack
    (48, 3584, 8, True, False, "natural", None, 1, 0),  # 300B down: 7 chunks of 512
    (8, 3584, 8, True, False, "natural", None, 7, 0),  # ... 7 programs a row
    (8, 3584, 8, True, True, "natural", None, 7, 2),  # ... from the up_gate's 2 K splits
])
def test_lowers_through_triton_for_cuda(m, k, bm, sums, fp16, k_order, layers, pieces, splits):
    """The Triton lowering (shapes, dtypes, gathers) runs without a GPU on jax 0.10; newer jax
    wants a GPU's description for it and the test then skips."""
    def f(x, gs, layer):
        return prologue._expert_operands(x, gs, layer, bm=bm, sums=sums, fp16=fp16,
                                         k_order=k_order, num_layers=layers, interpret=False,
                                         pieces=pieces, swiglu_partials=splits > 0)

    sd = jax.ShapeDtypeStruct
    x = sd((splits, m, 2 * k), jnp.float32) if splits else sd((m, k), jnp.bfloat16)
    try:
        lowered = jax.jit(f).trace(x, sd((64,), jnp.int32),
                                   sd((1,), jnp.int32)).lower(lowering_platforms=("cuda",))
    except RuntimeError as err:
        if "No supported GPU" in str(err):
            pytest.skip("this jax's Triton lowering needs a GPU")
        raise
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", SWIGLU_CASES, ids=lambda c: f"m{c[0]}-k{c[1]}-s{c[8]}")
def test_compiled_swiglu_partials_match_the_jnp_composition(case):
    """Compiled, the launch's exp (Triton) and XLA's may differ in the last bits of silu, so an
    element of h may sit one bf16 ulp away; everything else is as on the CPU."""
    got = jax.jit(lambda: _run_swiglu(case, pieces=case[-1]))()
    want = _run_swiglu(case, implementation="xla")
    for a, b in zip(got.tiles, want.tiles, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, row0, hi = (np.asarray(a) for a in want.tiles)
    rows = [t * case[3] + i for t in range(len(row0)) for i in range(case[3])
            if row0[t] + i < hi[t]]
    a = np.asarray(got.x_planes, np.float32)[rows]
    b = np.asarray(want.x_planes, np.float32)[rows]
    np.testing.assert_allclose(a, b, rtol=2**-7)
    assert (a == b).mean() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["one-program-a-row", "pieces"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-k{c[1]}-bm{c[3]}-{c[6]}")
def test_compiled_kernel_equals_the_jnp_composition(case, split):
    got = jax.jit(lambda: _run(case, pieces=_pieces(case[1]) if split else 1))()
    want = _run(case, implementation="xla")
    _assert_same(got, want, bm=case[3], sums=case[4], fp16=case[5])
