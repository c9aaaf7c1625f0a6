"""Exact WINT2 decode: FastDeploy's golden vectors, every byte value, nibble order, K order."""

import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import wint2

CASES = ["k128_n256", "k256_n128", "k320_n64", "k512_n192"]


def _bf16(bits):
    return np.asarray(bits).view(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def golden(data_dir):
    return np.load(data_dir / "wint2_golden.npz")


@pytest.mark.parametrize("case", CASES)
def test_golden_dequant_exact(golden, case):
    g = lambda f: golden[f"{case}/{f}"]  # noqa: E731
    w = pk.dequantize_wint2(g("quant_weight"), g("weight_scale"),
                            _bf16(g("super_scales_bf16bits")), g("code_scale"), g("code_zp"))
    ref = _bf16(g("dequant_bf16bits")).astype(np.float32)
    got = np.asarray(w).astype(np.float32)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)  # values: -0.0 == 0.0


@pytest.mark.parametrize("case", CASES)
def test_golden_dequant_exact_per_expert_and_bits_input(golden, case):
    g = lambda f: golden[f"{case}/{f}"]  # noqa: E731
    e = 0
    w = pk.dequantize_wint2(g("quant_weight")[e], g("weight_scale")[e],
                            g("super_scales_bf16bits")[e],  # raw uint16 bits accepted
                            g("code_scale")[e], g("code_zp")[e])
    np.testing.assert_array_equal(np.asarray(w).astype(np.float32),
                                  _bf16(g("dequant_bf16bits")[e]).astype(np.float32))


@pytest.mark.parametrize("case", CASES)
def test_golden_matmul(golden, case):
    g = lambda f: golden[f"{case}/{f}"]  # noqa: E731
    w = np.asarray(pk.dequantize_wint2(g("quant_weight"), g("weight_scale"),
                                       _bf16(g("super_scales_bf16bits")), g("code_scale"),
                                       g("code_zp"))).astype(np.float32)
    x = _bf16(g("x_bf16bits")).astype(np.float32)
    y = np.einsum("mk,ekn->emn", x, w)
    ref = _bf16(g("y_bf16bits")).astype(np.float32)
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel < 4e-3, rel


def test_golden_has_non_dyadic_columns_where_unfused_math_differs(golden):
    """The golden file must exercise the fused multiply-add: unfused math gets some codes wrong."""
    mism = sum(pk.count_unfused_mismatches(golden[f"{c}/code_scale"], golden[f"{c}/code_zp"])
               for c in CASES)
    assert mism > 0


def _spec_decode_one(u, cs, zp, t, nib, ss):
    """Scalar decode of §3.1 written from the doc with Python floats (independent of the code)."""
    import math
    import struct

    def f32(v):
        return struct.unpack("f", struct.pack("f", v))[0]

    from fractions import Fraction
    exact = Fraction(int(u)) * Fraction(float(cs)) + Fraction(float(zp))
    # correctly rounded to fp32 (one rounding, as an FMA): round via float64 is exact enough
    # except at ties, which Fraction comparison settles.
    cand = f32(float(exact))
    towards = np.float32(np.inf if exact > Fraction(cand) else -np.inf)
    lo, hi = sorted([cand, np.nextafter(np.float32(cand), towards)])
    dlo, dhi = abs(exact - Fraction(float(lo))), abs(exact - Fraction(float(hi)))
    if dlo < dhi:
        r = lo
    elif dhi < dlo:
        r = hi
    else:
        r = lo if (np.float32(lo).view(np.uint32) & 1) == 0 else hi
    code = math.floor(f32(float(np.float32(r)) + 0.5))
    q = ((code >> (9, 6, 3, 0)[t]) & 0x3F) - 32
    return float(ml_dtypes.bfloat16(np.float32(q * nib * float(ss))))


def test_all_256_bytes_every_window_against_scalar_spec():
    rng = np.random.default_rng(0)
    n = 4
    k = 4 * 256  # byte row p holds byte value p: all 256 values in every column
    qw = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, n))
    # codes must stay in 15 bits: cs * 255 + zp < 32768
    cs = rng.uniform(1.0, 120.0, n).astype(np.float32)
    zp = rng.uniform(0.0, 2000.0, n).astype(np.float32)
    ws = rng.integers(0, 256, (k // 128, n), dtype=np.uint8)
    ss = rng.uniform(0.001, 0.01, n).astype(ml_dtypes.bfloat16)
    w = np.asarray(pk.dequantize_wint2(qw, ws, ss, cs, zp)).astype(np.float32)
    for kk in range(0, k, 7):
        for c in range(n):
            g = kk // 64
            nib = (ws[g // 2, c] >> 4) & 0xF if g % 2 == 0 else ws[g // 2, c] & 0xF
            ref = _spec_decode_one(qw[kk // 4, c], cs[c], zp[c], kk % 4, int(nib), ss[c])
            assert w[kk, c] == ref, (kk, c, w[kk, c], ref)


def test_exact_codes_at_fp32_ties():
    """Values exactly representable mid-way between fp32 numbers after the product."""
    cs = np.float32(1.0) + np.float32(2.0**-23)  # u * cs needs 31 bits: product not in fp32
    zp = np.float32(0.5)
    u = np.arange(256, dtype=np.uint8)
    got = wint2.wint2_codes_exact(u, cs, zp)
    from fractions import Fraction
    for uu in range(256):
        exact = Fraction(uu) * Fraction(float(cs)) + Fraction(float(zp))
        r = np.float32(float(exact))  # float64 of a 32-bit product + 0.5 is exact here
        assert got[uu] == int(np.floor(np.float32(r) + np.float32(0.5)))


def test_nibble_order_even_group_high():
    k, n = 256, 2
    qw = np.full((k // 4, n), 0b11_111_111, np.uint8)  # some nonzero code pattern
    cs = np.full(n, 64.0, np.float32)
    zp = np.full(n, 100.0, np.float32)
    ss = np.ones(n, np.float32)
    ws = np.array([[0x12, 0x12], [0x34, 0x34]], np.uint8)
    w = np.asarray(pk.dequantize_wint2(qw, ws, ss, cs, zp)).astype(np.float32)
    ones = np.full_like(ws, 0x11)
    base = np.asarray(pk.dequantize_wint2(qw, ones, ss, cs, zp)).astype(np.float32)
    for g, nib in enumerate([1, 2, 3, 4]):
        np.testing.assert_array_equal(w[64 * g:64 * (g + 1)], base[64 * g:64 * (g + 1)] * nib)


def test_shuffled_k_order_is_the_documented_permutation():
    rng = np.random.default_rng(1)
    k, n = 128, 8
    args = (rng.integers(0, 256, (k // 4, n), dtype=np.uint8),
            rng.integers(0, 256, (k // 128, n), dtype=np.uint8),
            rng.uniform(0.01, 0.02, n).astype(np.float32),
            np.full(n, 100.0, np.float32), np.full(n, 3.0, np.float32))
    nat = np.asarray(pk.dequantize_wint2(*args)).astype(np.float32)
    shf = np.asarray(pk.dequantize_wint2(*args, k_order="shuffled")).astype(np.float32)
    expect = nat.reshape(k // 64, 4, 8, 2, n).transpose(0, 2, 1, 3, 4).reshape(k, n)
    np.testing.assert_array_equal(shf, expect)
    np.testing.assert_array_equal(nat[pk.shuffled_k_index(k)], shf)
    np.testing.assert_array_equal(pk.unshuffle_k(shf, axis=0), nat)


def _affine_codes_ok(a, b, cs, zp):
    """Which columns' ``(u * A + B) >> 16`` (mod 2^32, as ``mad.lo.u32`` computes it) equals
    the fused decode's code for all 256 bytes, from the scalar spec (Python floats + one fp32
    rounding of the exact product-sum, ``fractions``-free: u * cs + zp is exact in float64)."""
    u = np.arange(256, dtype=np.int64)[:, None]
    want = wint2.wint2_codes_exact(u, cs.reshape(1, -1), zp.reshape(1, -1)).astype(np.int64)
    got = ((u * a.reshape(1, -1).astype(np.int64) + b.reshape(1, -1)) % 2**32) >> 16
    # the kernel's pair step: prmt(c_a, c_b, 0x7632) keeps the high halves, windows read bits 0..14
    return (got == want).all(0)


def test_affine_codes_reproduce_the_fused_decode_on_the_golden_columns(golden):
    """The integer code step (``(u A + B) >> 16``, results/NOTES.md §59): every golden column it
    claims is exact; all of the dyadic half and all but one of the arbitrary half have one."""
    claimed = total = 0
    for case in CASES:
        cs, zp = golden[f"{case}/code_scale"], golden[f"{case}/code_zp"]
        a, b, exact = wint2.affine_codes(cs, zp)
        assert a.dtype == b.dtype == np.int32 and a.shape == cs.shape
        assert _affine_codes_ok(a, b, cs, zp)[exact.reshape(-1)].all(), case
        claimed += int(exact.sum())
        total += exact.size
    assert (claimed, total) == (1023, 1024)


def test_affine_codes_on_arbitrary_and_dyadic_columns():
    rng = np.random.default_rng(0)
    cs = rng.uniform(100, 125, 6000).astype(np.float32)
    zp = (rng.uniform(0, 1, 6000) * (32767 - 255 * cs)).astype(np.float32)
    a, b, exact = wint2.affine_codes(cs, zp, chunk=1000)
    assert _affine_codes_ok(a, b, cs, zp)[exact].all()
    assert 0.95 < exact.mean() < 1  # ~2 % of arbitrary fp32 columns are not floor-affine
    # a column flagged inexact has codes that no nearby slope fits (a wider search agrees)
    bad = np.flatnonzero(~exact)[:5]
    for d in range(-64, 65):
        slope = np.rint(cs[bad].astype(np.float64) * 65536).astype(np.int64) + d
        u = np.arange(256, dtype=np.int64)[:, None]
        codes = wint2.wint2_codes_exact(u, cs[None, bad], zp[None, bad]).astype(np.int64)
        lo = ((codes << 16) - u * slope).max(0)
        hi = (((codes + 1) << 16) - 1 - u * slope).min(0)
        assert (lo > hi).all()
    # coarse dyadic columns (the closed form, no search), some with code 0 at u = 0
    cs2 = np.floor(cs * 64) / 64
    zp2 = np.floor(zp * 64) / 64 + 1 / 128
    zp2[:10] = -0.5 + 1 / 128
    cs2, zp2 = cs2.astype(np.float32), zp2.astype(np.float32)
    a2, b2, exact2 = wint2.affine_codes(cs2, zp2)
    assert exact2.all() and (a2 != 0).all()
    assert _affine_codes_ok(a2, b2, cs2, zp2).all()
    with pytest.raises(ValueError, match="code_scale"):
        wint2.affine_codes(cs, zp[:10])


def test_affine_codes_refuse_codes_outside_15_bits():
    cs = np.float32([120.0, 120.0, 0.0])
    zp = np.float32([32767.0 - 255 * 120 + 1, -2.0, 5.0])  # code 32768 at u=255; code < 0; flat
    a, b, exact = wint2.affine_codes(cs, zp)
    assert exact.tolist() == [False, False, True]
    assert a[2] != 0  # A == 0 marks "none" for the kernel: a flat column gets another slope
    assert _affine_codes_ok(a, b, cs, zp)[2]
