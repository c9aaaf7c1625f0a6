"""WINT2 encoder: round trip through the exact decode, decode exactness, quality, calibration."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from converters.bench_encode import relative_error, rtn_symmetric_4level, sample
from converters.encode_codebooks import (
    CANDIDATES,
    candidate_table,
    codebook,
    is_exact_pair,
    search,
)
from converters.encode_gptq import gptq_assign, hessian_from_activations
from converters.encode_wint2 import assign, encode_wint2, quantize_scales, refine_nibbles
from pallas_kernels import count_unfused_mismatches, decode_wint2, dequantize_wint2
from pallas_kernels.wint2 import wint2_codes_exact

K, N = 256, 128


def _decode(enc, **kw) -> np.ndarray:
    return np.asarray(dequantize_wint2(**enc, **kw), np.float32)


@pytest.fixture(scope="module")
def gaussian():
    w = sample("gaussian", K, N, seed=1) * 0.02
    return w, encode_wint2(w)


def test_checkpoint_layout(gaussian):
    _, enc = gaussian
    expect = {"quant_weight": (np.uint8, (K // 4, N)), "weight_scale": (np.uint8, (K // 128, N)),
              "super_scales": (ml_dtypes.bfloat16, (N,)), "code_scale": (np.float32, (N,)),
              "code_zp": (np.float32, (N,))}
    assert set(enc) == set(expect)
    for key, (dtype, shape) in expect.items():
        assert enc[key].dtype == dtype and enc[key].shape == shape, key
    nibs = np.concatenate([enc["weight_scale"] >> 4, enc["weight_scale"] & 0xF])
    assert nibs.min() >= 1 and nibs.max() <= 15


def test_codes_fit_15_bits_and_decode_is_fma_proof(gaussian):
    _, enc = gaussian
    u = np.arange(256)[:, None]
    codes = wint2_codes_exact(u, enc["code_scale"][None], enc["code_zp"][None])
    assert codes.min() >= 0 and codes.max() < 2**15
    assert count_unfused_mismatches(enc["code_scale"], enc["code_zp"]) == 0
    # the traced (unfused on CPU) decode agrees bit for bit with the exact decode
    traced = decode_wint2(*(jnp.asarray(np.asarray(enc[k]).astype(np.float32)
                                        if k == "super_scales" else enc[k])
                            for k in ("quant_weight", "weight_scale", "super_scales",
                                      "code_scale", "code_zp")))
    np.testing.assert_array_equal(np.asarray(traced, np.float32), _decode(enc))


def test_round_trip_error_gaussian(gaussian):
    w, enc = gaussian
    err = relative_error(w, _decode(enc))
    assert err < 0.112, err
    assert err < relative_error(w, rtn_symmetric_4level(w)), "worse than 4-level RTN"


def test_round_trip_error_student_t():
    w = sample("student_t5", K, N, seed=2)
    err = relative_error(w, _decode(encode_wint2(w)))
    # the former default (16 codebook pairs, no scale restarts or nibble search) gave 0.1413
    assert err < 0.140, err


def test_candidates_are_exact():
    cs, zp, sign = candidate_table()
    assert len(cs) == 2 * len(CANDIDATES) and set(sign) == {1.0, -1.0}
    assert all(is_exact_pair(c, z) for c, z in CANDIDATES)
    assert count_unfused_mismatches(cs, zp) == 0
    # the traced codebook equals the exact decode's windows for every byte value
    u = np.arange(256)[None, :]
    codes = wint2_codes_exact(u, cs[:, None], zp[:, None])  # [C, 256]
    windows = np.stack([((codes >> s) & 63) - 32 for s in (9, 6, 3, 0)], -1)
    np.testing.assert_array_equal(np.asarray(codebook(cs, zp)), windows)
    assert not is_exact_pair(121.0, 64.0) and not is_exact_pair(128.5, 0.0078125)


def test_quantize_scales_bf16_and_nibbles():
    rng = np.random.default_rng(0)
    s_opt = jnp.asarray(rng.uniform(0.1, 1.0, (16, 12)), jnp.float32)
    ss, nib = quantize_scales(s_opt, jnp.ones_like(s_opt))
    ss = np.asarray(ss)
    np.testing.assert_array_equal(ss, ss.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.asarray(nib).min() >= 1 and np.asarray(nib).max() <= 15
    rel = np.abs(np.asarray(nib) * ss[:, None] - np.asarray(s_opt)) / np.asarray(s_opt)
    assert np.median(rel) < 0.05


def test_zero_column_and_odd_group_count():
    w = sample("gaussian", 192, 16, seed=3)  # 3 groups: the last weight_scale byte is half used
    w[:, 5] = 0
    enc = encode_wint2(w, effort="fast")
    assert enc["weight_scale"].shape == (2, 16)
    wh = _decode(enc)
    assert np.all(wh[:, 5] == 0)
    assert relative_error(w, wh) < 0.13


def test_shuffled_k_order():
    w = sample("gaussian", K, N, seed=4)  # the fixture's shape: no new compilation
    nat, shuf = encode_wint2(w), encode_wint2(w, k_order="shuffled")
    e_shuf = relative_error(w, _decode(shuf, k_order="shuffled"))
    assert e_shuf < 0.115 and abs(e_shuf - relative_error(w, _decode(nat))) < 0.01
    assert relative_error(w, _decode(shuf)) > 0.5  # decoded in the wrong order it is garbage


def test_exhaustive_assignment_matches_brute_force():
    rng = np.random.default_rng(5)
    q = codebook(*candidate_table(2)[:2])[:1]  # [1, 256, 4]
    x = jnp.asarray(rng.standard_normal((1, 2, 16, 4)), jnp.float32)
    s = jnp.asarray([[0.05, 0.08]], jnp.float32)
    idx = np.asarray(assign(x, q, s))
    qf = np.asarray(q[0], np.float64)
    for g in range(2):
        d = ((np.asarray(x[0, g])[:, None, :] - float(s[0, g]) * qf[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(idx[0, g], d.argmin(-1))


def test_gptq_with_identity_hessian_is_plain_assignment():
    rng = np.random.default_rng(6)
    k, n = 128, 8
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    q = jnp.broadcast_to(codebook(*candidate_table(1)[:2])[0], (n, 256, 4))
    s = jnp.full((n, k // 64), 0.06, jnp.float32)
    plain = assign(w.T.reshape(n, k // 64, 16, 4), q, s)
    fed = gptq_assign(w, q, s, jnp.eye(k, dtype=jnp.float32))
    np.testing.assert_array_equal(np.asarray(fed), np.asarray(plain))


def test_calibration_lowers_output_error_on_held_out_activations():
    rng = np.random.default_rng(7)
    k, n = 256, 64
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 24)[None, :]  # correlated inputs
    x_cal = rng.standard_normal((2048, k)) @ mix.T
    x_test = rng.standard_normal((512, k)) @ mix.T
    w = sample("gaussian", k, n, seed=8)
    plain = _decode(encode_wint2(w, effort="fast"))
    calib = _decode(encode_wint2(w, hessian=hessian_from_activations(x_cal), effort="fast"))
    y = x_test @ w

    def out_err(wh):
        return np.linalg.norm(y - x_test @ wh) / np.linalg.norm(y)

    assert out_err(calib) < 0.85 * out_err(plain), (out_err(calib), out_err(plain))


def test_rejects_bad_input():
    with pytest.raises(NotImplementedError, match="group_size"):
        encode_wint2(np.zeros((128, 8), np.float32), group_size=128)
    with pytest.raises(ValueError, match="multiple of 64"):
        encode_wint2(np.zeros((100, 8), np.float32))
    with pytest.raises(ValueError, match="hessian"):
        encode_wint2(np.zeros((128, 8), np.float32), hessian=np.eye(64))


def test_nibble_neighbour_search_never_increases_error():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_t(5, (4, 3, 16, 4)), jnp.float32)
    q = jnp.broadcast_to(codebook(*candidate_table(1)[:2])[0], (4, 256, 4))
    ss = jnp.full((4,), 0.01, jnp.float32)
    nib = jnp.full((4, 3), 7, jnp.int32)

    def err(nb):
        s = nb * ss[:, None]
        idx = assign(x, q, s)
        qa = jax.vmap(lambda qn, i: qn[i])(q.astype(jnp.float32), idx)
        return float(((x - s[..., None, None] * qa) ** 2).sum())

    new = refine_nibbles(x, q, nib, ss, rounds=2)
    assert np.asarray(new).min() >= 1 and np.asarray(new).max() <= 15
    assert err(new) <= err(nib) and not np.array_equal(np.asarray(new), np.asarray(nib))


def test_codebook_search_ranks_exact_pairs():
    rows = search(cs_range=(120.9, 121.0), zp_values=np.array([64.1328125, 876.9453125, 50.0]),
                  n_samples=256)
    assert len(rows) == 2 * 7  # cs in 120.90625..121.0 (x64: 7 values) x the two exact zps
    errs = [r[2] for r in rows]
    assert errs == sorted(errs) and all(is_exact_pair(c, z) for c, z, _ in rows)
    assert 0.08 < errs[0] < 0.2
