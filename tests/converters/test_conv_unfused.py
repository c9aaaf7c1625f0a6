"""The converter's fast count of unfused-FMA exposure agrees with the spec's exact count."""

import numpy as np

import pallas_kernels as pk
from converters.loader import count_unfused


def test_count_unfused_matches_spec_on_arbitrary_floats():
    rng = np.random.default_rng(0)
    cs = rng.uniform(1, 128, 3000).astype(np.float32)
    zp = rng.uniform(0, 10000, 3000).astype(np.float32)
    want = pk.count_unfused_mismatches(cs, zp)
    assert want > 0
    assert count_unfused(cs, zp, chunk=512) == want
    # repeated (cs, zp) pairs are counted once per column
    assert count_unfused(np.tile(cs[:50], 7), np.tile(zp[:50], 7)) == 7 * \
        pk.count_unfused_mismatches(cs[:50], zp[:50])


def test_dyadic_code_scales_are_never_exposed():
    cs = (np.arange(32 * 64, 128 * 64, 7) / 64).astype(np.float32)
    zp = np.full_like(cs, 123.4567)
    assert pk.count_unfused_mismatches(cs, zp) == 0 == count_unfused(cs, zp)
