"""Dispatch (``implementation=``), shape errors, tile tables, configs, import hygiene."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import config, kernels, shapes
from pallas_kernels.codecs import plane_permutation


@pytest.fixture(scope="module")
def w2():
    return shapes.random_linear(jax.random.key(0), "wint2", 256, 64, 2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the default is the kernel on a GPU")
def test_xla_and_default_paths_agree_on_cpu(w2):
    x = jax.random.normal(jax.random.key(1), (8, 256), jnp.bfloat16)
    gs = jnp.asarray([5, 3], jnp.int32)
    a = pk.quant_grouped_matmul(x, w2, gs, fmt="wint2", implementation="xla")
    b = pk.quant_grouped_matmul(x, w2, gs, fmt="wint2")  # None: reference on a CPU
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the default is the kernel on a GPU")
def test_expert_ffn_is_the_two_projections_off_the_mosaic_kernel():
    """Off a Hopper GPU the FFN op is its two grouped calls, also for fragment-ordered weights
    (decoded back); naming the Pallas kernel for those refuses instead of falling back."""
    w_up = shapes.random_linear(jax.random.key(2), "wint2", 256, 2 * 256, 2)
    w_down = shapes.random_linear(jax.random.key(3), "wint2", 256, 256, 2)
    x = jax.random.normal(jax.random.key(1), (8, 256), jnp.bfloat16)
    gs, r = jnp.asarray([5, 2], jnp.int32), jnp.linspace(0.5, 1.0, 8)
    h = pk.quant_grouped_matmul(x, w_up, gs, fmt="wint2", activation="swiglu",
                                implementation="xla")
    want = np.asarray(pk.quant_grouped_matmul(h, w_down, gs, fmt="wint2", row_scale=r,
                                              out_dtype=jnp.float32, implementation="xla"))
    frag = pk.to_fragments(w_up), pk.to_fragments(w_down)
    for (wu, wd), order in (((w_up, w_down), "rows"), (frag, "fragments")):
        got = pk.quant_expert_ffn(x, wu, wd, gs, fmt="wint2", row_scale=r,
                                  out_dtype=jnp.float32, byte_order=order)
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(NotImplementedError, match="Hopper"):
        pk.quant_expert_ffn(x, *frag, gs, fmt="wint2", implementation="pallas",
                            byte_order="fragments")


def test_unknown_implementation_raises(w2):
    x = jnp.zeros((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="implementation"):
        pk.quant_matmul(x, {k: v[0] for k, v in w2.items()}, fmt="wint2", implementation="cuda")


@pytest.mark.parametrize("k,msg", [(192, "divisible by block_k"), (64, "block_k >= 128")])
def test_pallas_raises_not_implemented_naming_the_constraint(k, msg):
    w = shapes.random_linear(jax.random.key(0), "wint2", k, 64)
    x = jnp.ones((4, k), jnp.bfloat16)
    cfg = config.TuningConfig(block_m=16, block_n=32, block_k=128 if k == 192 else 64)
    with pytest.raises(NotImplementedError, match=msg):
        kernels.quant_matmul(x, w, interpret=True, fmt="wint2", config=cfg)


@pytest.mark.parametrize("rows", [4, 1])  # 1: the GEMV-style heuristic
def test_pallas_named_explicitly_never_falls_back(rows):
    w = shapes.random_linear(jax.random.key(0), "wint8", 64, 24)  # N=24: no block_n divides it
    x = jnp.ones((rows, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="N_out=24 must be divisible by block_n"):
        pk.quant_matmul(x, w, fmt="wint8", implementation="pallas")
    y = pk.quant_matmul(x, w, fmt="wint8", implementation=None)  # falls back to the reference
    assert y.shape == (rows, 24)


@pytest.mark.parametrize("bad,msg", [
    (dict(k_order="shuffled", fmt="wint4"), "only applies to wint2"),
    (dict(activation="gelu", fmt="wint4"), "activation"),
    (dict(fmt="wint3"), "is not one of"),
])
def test_bad_arguments(bad, msg):
    w = shapes.random_linear(jax.random.key(0), "wint4", 128, 64)
    with pytest.raises(NotImplementedError, match=msg):
        kernels.quant_matmul(jnp.ones((4, 128), jnp.bfloat16), w, interpret=True, **bad)


@pytest.mark.parametrize("sizes,m,bm", [([3, 0, 0, 20, 5], 40, 16), ([0, 0], 5, 16),
                                        ([16, 16], 32, 16), ([1] * 8, 8, 1), ([7, 9], 16, 4),
                                        # the bound ceil(M/bm) + min(E, M) is reached:
                                        ([1] * 8 + [0] * 56, 8, 16), ([1, 1, 1], 8, 4),
                                        ([1] * 7, 8, 16), ([2, 0, 3, 1, 0, 2], 9, 2)])
def test_tile_table_covers_every_row_once(sizes, m, bm):
    grp, blk, lo, hi = (np.asarray(a) for a in kernels.tile_table(jnp.asarray(sizes), m, bm))
    assert len(grp) == -(-m // bm) + min(len(sizes), m)
    owner = np.full(m, -1)
    for g, b, a, z in zip(grp, blk, lo, hi, strict=True):
        if z > a:
            assert b * bm <= a < z <= b * bm + bm  # inside its aligned block
            assert (owner[a:z] == -1).all()
            owner[a:z] = g
    expect = np.repeat(np.arange(len(sizes) + 1), [*sizes, m - sum(sizes)])
    np.testing.assert_array_equal(owner, expect)  # padding rows belong to group E


@pytest.mark.parametrize("sizes,m,bm", [([3, 0, 0, 20, 5], 40, 16), ([0, 0], 5, 16),
                                        ([16, 16], 32, 16), ([1] * 8, 8, 1), ([7, 9], 16, 4),
                                        ([1] * 8 + [0] * 56, 8, 16), ([1, 1, 1], 8, 4),
                                        ([2, 0, 3, 1, 0, 2], 9, 2), ([5, 5, 5], 16, 4),
                                        # the bound m // bm + min(E + 1, m) is reached:
                                        ([1] * 7, 8, 16), ([9, 9], 20, 8)])
def test_expert_tiles_start_each_group_and_cover_every_row_once(sizes, m, bm):
    (grp, lo, hi), src = (
        jax.tree.map(np.asarray, kernels.expert_tiles(jnp.asarray(sizes), m, bm)))
    num_tiles = m // bm + min(len(sizes) + 1, m)
    assert len(grp) == num_tiles and src.shape == (num_tiles * bm,)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.full(m, -1)
    for t, (g, a, z) in enumerate(zip(grp, lo, hi, strict=True)):
        if z <= a:
            continue
        assert z - a <= bm
        assert (owner[a:z] == -1).all()
        owner[a:z] = g
        if g < len(sizes):  # a real group's tile starts at its first row or bm rows later
            assert (a - starts[g]) % bm == 0
        np.testing.assert_array_equal(src[t * bm:t * bm + z - a], np.arange(a, z))
    expect = np.repeat(np.arange(len(sizes) + 1), [*sizes, m - sum(sizes)])
    np.testing.assert_array_equal(owner, expect)  # padding rows belong to group E
    assert ((src >= 0) & (src < m)).all()
    # Each non-empty group costs ceil(rows / bm) tiles: no tile shared by two groups.
    assert (hi > lo).sum() == sum(-(-s // bm) for s in [*sizes, m - sum(sizes)])


def test_expert_tiles_fold_layers_into_group_ids():
    (grp, lo, hi), _ = kernels.expert_tiles(jnp.asarray([2, 0, 3]), 8, 4, layer=2,
                                                  num_layers=3)
    used = np.asarray(grp)[np.asarray(hi) > np.asarray(lo)]
    np.testing.assert_array_equal(used, [6, 8, 9])  # layer 2's groups 0, 2; padding past all


def test_plane_permutation_groups_rows_by_byte_position():
    perm = plane_permutation(16, 8, 4)
    np.testing.assert_array_equal(perm, [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15])
    assert sorted(plane_permutation(512, 256, 2)) == list(range(512))


def test_tuning_config_validation_and_heuristic():
    with pytest.raises(ValueError, match="power of two"):
        config.TuningConfig(block_n=48)
    with pytest.raises(ValueError, match="block_m <= 8"):
        config.TuningConfig(block_m=16, mode="fma")
    small = config.heuristic_config("wint2", 8, 8192, 3584, activation="swiglu", num_groups=64)
    big = config.heuristic_config("wint2", 32768, 8192, 3584, activation="swiglu", num_groups=64)
    assert small.block_m == 16 and big.block_m > small.block_m
    assert 8192 % small.block_k == 0 and 3584 % big.block_n == 0
    key = config.TunedKey("wint2", "swiglu", 64, 8192, 3584, 8)
    assert str(key) == "wint2|swiglu|64|8192|3584|8"
    # a dense WINT8 linear at a few rows splits K until ~192 programs, where the K blocks divide
    assert config.heuristic_config("wint8", 4, 2560, 3072, activation="swiglu").split_k == 4
    assert config.heuristic_config("wint8", 4, 3072, 2560).split_k == 8  # 40 column blocks
    assert config.heuristic_config("wint8", 4, 2560, 2560).split_k == 4  # 20 K blocks: not 8
    assert config.heuristic_config("wint8", 4, 8192, 8192 * 4).split_k == 1  # 512 programs
    assert config.heuristic_config("wint8", 256, 2560, 2560).split_k == 1  # many rows
    # ... and at one row runs GEMV-style, K split up to 16 ways where the 16-row K blocks divide
    one = config.heuristic_config("wint8", 1, 2560, 2560)
    assert (one.mode, one.block_m, one.block_k, one.split_k) == ("fma", 1, 16, 16)
    assert config.heuristic_config("wint8", 1, 2576, 2560).split_k == 1  # 161 K blocks
    assert config.heuristic_config("wint8", 1, 2560, 96).block_n == 32
    assert config.heuristic_config("wint8", 1, 2560, 24).block_n == 16  # the kernel refuses it
    assert config.heuristic_config("bf16", 1, 2560, 2560).mode == "mma"  # measured on WINT8 only
    assert config.heuristic_config("wint2", 8, 8192, 3584, num_groups=64).split_k == 1


def test_a_tuned_gemv_entry_is_fitted_to_the_rows(monkeypatch):
    """A one-row GEMV-style entry serves 2-8 rows as one tile of them all (a tile per row would
    read the weights once per row), in blocks that keep the partial sums in registers; past
    8 rows the heuristic takes over."""
    fma = config.TuningConfig(block_m=1, block_n=256, block_k=32, num_warps=4, num_stages=1,
                              split_k=16, mode="fma")
    key = str(config.TunedKey("wint8", "none", 1, 2560, 2560, 1))
    monkeypatch.setattr(config, "_tuned_table", lambda device, section="configs": {key: fma})
    assert config.get_config("wint8", 1, 2560, 2560) == fma
    two = config.get_config("wint8", 2, 2560, 2560)
    assert (two.mode, two.block_m, two.block_k, two.block_n, two.split_k) == ("fma", 2, 16, 256, 16)
    four = config.get_config("wint8", 4, 2560, 2560)  # bucket 4: 2 bit-lengths from 1, found
    assert (four.block_m, four.block_k, four.block_n) == (4, 16, 128)
    key4 = str(config.TunedKey("wint8", "none", 1, 2560, 2560, 4))
    monkeypatch.setattr(config, "_tuned_table", lambda device, section="configs": {key4: fma})
    assert config.get_config("wint8", 12, 2560, 2560).mode == "mma"  # bucket 16: found, refit


def test_tuned_tables_parse():
    for path in config.TUNED_DIR.glob("*.json"):
        table = config._tuned_table(path.stem)
        assert table and all(isinstance(c, config.TuningConfig) for c in table.values())
        mosaic = config._tuned_table(path.stem, "mosaic")  # optional section
        assert all(isinstance(c, config.MosaicConfig) for c in mosaic.values())


def test_import_pulls_in_no_jaxwint2_or_flax():
    code = "import sys, pallas_kernels, pallas_kernels.kernels; " \
           "print(any(m.split('.')[0] in ('jaxwint2', 'flax') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fmt", ["wint2", "wint8"])
def test_layer_of_a_stack_equals_that_layer_alone(fmt):
    """``layer=`` on an ``[L, E, ...]`` stack == the op on ``w[layer]`` (kernel and reference)."""
    stack = [shapes.random_linear(jax.random.key(i), fmt, 256, 64, 2) for i in range(3)]
    w = {k: jnp.stack([s[k] for s in stack]) for k in stack[0]}
    x = jax.random.normal(jax.random.key(7), (8, 256), jnp.bfloat16)
    gs = jnp.asarray([5, 2], jnp.int32)  # one padding row
    for impl in ("pallas", "xla"):
        for layer in (0, 2):
            got = jax.jit(lambda x, w, gs, i, impl=impl: pk.quant_grouped_matmul(
                x, w, gs, fmt=fmt, activation="swiglu", implementation=impl, layer=i))(
                x, w, gs, jnp.int32(layer))
            want = jax.jit(lambda x, w, gs, impl=impl: pk.quant_grouped_matmul(
                x, w, gs, fmt=fmt, activation="swiglu", implementation=impl))(
                x, stack[layer], gs)
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.asarray(want, np.float32))
            dense = {k: v[:, 1] for k, v in w.items()}  # [L, K, N]: expert 1 of each layer
            got = jax.jit(lambda x, w, i, impl=impl: pk.quant_matmul(
                x, w, fmt=fmt, implementation=impl, layer=i))(x, dense, jnp.int32(layer))
            want = jax.jit(lambda x, w, impl=impl: pk.quant_matmul(
                x, w, fmt=fmt, implementation=impl))(
                x, {k: v[1] for k, v in stack[layer].items()})
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.asarray(want, np.float32))


def test_layer_stack_reaches_the_kernel_whole():
    """The Pallas kernel takes the whole stack (folded ``[L*E, ...]``), never a layer slice:
    a sliced operand of a custom call is copied by XLA on every scan iteration."""
    w = {k: jnp.stack([v, v, v]) for k, v in
         shapes.random_linear(jax.random.key(0), "wint2", 256, 64, 2).items()}
    x = jnp.ones((4, 256), jnp.bfloat16)
    gs = jnp.asarray([2, 2], jnp.int32)
    jaxpr = jax.make_jaxpr(lambda x, w, i: pk.quant_grouped_matmul(
        x, w, gs, fmt="wint2", implementation="pallas", layer=i))(x, w, jnp.int32(1))
    text = str(jaxpr)
    assert "pallas_call" in text
    assert "u8[6,64,64]" in text  # quant_weight [3, 2, 64, 64] folded to [6, 64, 64]
    assert "dynamic_slice" not in text


def test_large_ref_offset_workaround_is_installed():
    """The 64-bit-offset hook for 2**31..2**32-element refs found this jax's Triton lowering
    (if jax moves it, kernels.py refuses such stacks; this test says so first)."""
    from pallas_kernels import kernel_triton

    assert kernel_triton.LARGE_REFS_OK


def test_a_device_table_falls_back_per_key(tmp_path, monkeypatch):
    """The H200 reads its own entries first and the H100's for every key it lacks."""
    monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
    cfg = lambda bn: {"config": config.TuningConfig(block_n=bn).to_dict()}  # noqa: E731
    (tmp_path / "nvidia_h100_80gb_hbm3.json").write_text(
        json.dumps({"configs": {"a": cfg(32), "b": cfg(64)}}))
    config._tuned_table.cache_clear()
    try:
        assert {k: c.block_n for k, c in config._tuned_table("nvidia_h200").items()} == {
            "a": 32, "b": 64}  # no table of its own: all borrowed
        (tmp_path / "nvidia_h200.json").write_text(json.dumps({"configs": {"b": cfg(128)}}))
        config._tuned_table.cache_clear()
        assert {k: c.block_n for k, c in config._tuned_table("nvidia_h200").items()} == {
            "a": 32, "b": 128}
        assert config._tuned_table("nvidia_h200", "mosaic") == {}
        assert config._tuned_table("cpu") == {}
    finally:
        config._tuned_table.cache_clear()


def test_a_long_prefill_takes_the_largest_tuned_bucket():
    """Past the largest tuned row bucket, from ``LARGE_ROWS`` rows up, that bucket's entry (if it
    is a large one); otherwise more than 4x from every bucket means the heuristic."""
    tile = config.TuningConfig(block_m=64, block_n=64, block_k=128, num_warps=4, mode="mma")
    gemv = config.TuningConfig(block_m=1, block_n=256, block_k=32, num_warps=4, num_stages=1,
                               split_k=16, mode="fma")
    table = {str(config.TunedKey("wint4", "none", 64, 3584, 8192, 1024)): tile,
             str(config.TunedKey("wint4", "none", 64, 3584, 8192, 1)): gemv}
    want = lambda rows: config.TunedKey("wint4", "none", 64, 3584, 8192, rows)  # noqa: E731
    assert config._nearest(table, want(65536)) == tile  # 64x past the largest, a 1024-row one
    assert config._nearest(table, want(4096)) == tile  # within 4x
    assert config._nearest(table, want(64)) is None  # 16x from 1 and 1024, below LARGE_ROWS
    small = {str(config.TunedKey("wint4", "none", 64, 3584, 8192, 8)): gemv}
    assert config._nearest(small, want(65536)) is None  # the largest is not a large bucket
