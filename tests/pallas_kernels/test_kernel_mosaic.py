"""The Mosaic GPU WINT2 kernel (``kernel_mosaic.py``): byte order on the CPU, the kernel on sm90.

The fragment order is checked against the wgmma register-fragment layout as PTX documents it
(``wgmma .m64nNk16``, A in registers: thread ``lane`` of warp ``w`` holds rows
``16w + lane/4`` and ``+8``, columns ``2(lane%4)``, ``+1``, ``+8``, ``+9`` of each 16-wide K
slice), not against the module's own index tables. The GPU tests compare the kernel with the
reference path on random data, and the decode bit-exactly with ``dequantize_wint2`` through
a one-hot x.
"""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import config, kernel_mosaic, reference, shapes, wint2
from pallas_kernels.checks import _exact_oracle, _poison, skewed_group_sizes
from pallas_kernels.config import MosaicConfig
from pallas_kernels.numerics import assert_close
from pallas_kernels.wint2 import dequantize_wint2

ON_SM90 = kernel_mosaic.available()


def _rand_linear(k, n, e, seed=0, layers=None):
    w = shapes.random_linear(jax.random.key(seed), "wint2", k, n, e)
    if layers:
        w = {f: jnp.stack([a] + [jnp.roll(a, i, axis=0) for i in range(1, layers)])
             for f, a in w.items()}
    return w


def test_fragment_bytes_follow_the_wgmma_register_fragment():
    k, n = 512, 128
    qw = np.random.default_rng(0).integers(0, 256, (1, k // 4, n), dtype=np.uint8)
    frag = np.asarray(kernel_mosaic.fragment_weights(qw))  # [1, N/64, K/256, 16, 256]
    for nb in range(n // 64):
        for step in range(k // 256):
            chunk = frag[0, nb, step].reshape(-1)
            for t in (0, 5, 37, 127):
                w, lane = divmod(t, 32)
                mine = np.concatenate([chunk[2048 * h + 16 * t:2048 * h + 16 * t + 16]
                                       for h in range(2)])  # the thread's two 16-byte loads
                # In each byte-row tile j of 8 (a 16-wide K slice of bf16 pairs), the thread's
                # 4 bytes are (row, col), (row, col+1), (row+8, col), (row+8, col+1).
                for j in range(8):
                    row = 64 * nb + 16 * w + lane // 4
                    col = 64 * step + 8 * j + 2 * (lane % 4)
                    want = [qw[0, col, row], qw[0, col + 1, row],
                            qw[0, col, row + 8], qw[0, col + 1, row + 8]]
                    np.testing.assert_array_equal(mine[4 * j:4 * j + 4], want)


@pytest.mark.parametrize("k_order", ["natural", "shuffled"])
def test_group_sums_follow_the_scale_groups_of_k(k_order):
    """The mma.sync path's ``160 X``: x summed over each 64-row scale group of K, read from the
    plane-ordered (and, for a shuffled checkpoint, un-shuffled) columns the kernel gets."""
    m, k = 5, 768
    x = jax.random.normal(jax.random.key(4), (m, k), jnp.float32).astype(jnp.bfloat16)
    got = kernel_mosaic.group_sums(_plane_ordered(x, k_order))
    want = 160.0 * np.asarray(x, np.float32).reshape(m, k // 64, 64).sum(-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-3)


def test_fp16_group_sums_add_the_fp16_values_under_jit():
    """The fp16 path's group sums must add exactly the fp16 values the kernel multiplies. Under
    ``jit`` XLA's default ``xla_allow_excess_precision`` may drop a convert pair (f32 -> f16 ->
    f32) and sum the unrounded f32 values instead: seen on the H100 as a 1 % error of the 300B
    FFN where x came from XLA's split-K epilogue (results/NOTES.md §44). XLA's CPU backend kept
    the pair here even before the fix, so on a CPU this only guards the sums' arithmetic; the
    GPU test ``test_fp16_planes_take_x_computed_in_the_same_jit`` is the one that reproduces it."""
    km = kernel_mosaic
    m, k = 4, 512
    v = jax.random.normal(jax.random.key(5), (m, k), jnp.float32) * 1000.0  # not fp16 values

    def sums(v):
        return km.group_sums(km.fp16_plane_columns(v), km.FP16_PLANE_OFFSETS)

    x16 = np.asarray(km.fp16_plane_columns(v)).astype(np.float64)  # eager: the fp16 values
    c = np.asarray(km.FP16_PLANE_OFFSETS)[None, None, :, None, None]
    want = (x16.reshape(m, k // 256, 4, 4, 16) * c).sum(axis=(2, 4)).reshape(m, k // 64)
    np.testing.assert_allclose(np.asarray(jax.jit(sums)(v)), want, rtol=2e-6)


def test_fp16_planes_algebra_recovers_x_at_q():
    """The ``planes="fp16"`` arithmetic, emulated in float64 from the kernel's own pieces: rows
    scaled by ``fp16_row_scales``, plane columns by ``fp16_plane_columns``, each code pair's
    windows cut with ``_F16_PLANES`` (shift, mask) under fp16's 0x6400, partial sums minus
    ``group_sums(..., FP16_PLANE_OFFSETS)``, times the row inverse: exactly ``x @ q`` per scale
    group. Also: the all-planes PTX cuts the same windows as ``_F16_PLANES``."""
    km = kernel_mosaic
    rng = np.random.default_rng(3)
    m, k = 3, 256  # one K step: 4 planes x 64 byte rows, scale groups of 16 byte rows
    x = jnp.asarray(rng.standard_normal((m, k)) * np.array([[1e-3], [1.0], [3e4]]),
                    jnp.bfloat16)  # rows far outside fp16's range get scaled into it
    codes = rng.integers(0, 1 << 15, size=(2, 64))  # two columns' 15-bit codes, byte rows p
    scale, inv = km.fp16_row_scales(x)
    assert float(jnp.max(jnp.abs(x.astype(jnp.float32)) * scale[:, None])) < 2.0 ** 14
    x_planes = km.fp16_plane_columns(_plane_ordered(x.astype(jnp.float32) * scale[:, None]))
    xp = np.asarray(x_planes, np.float64)
    corr = np.asarray(km.group_sums(x_planes, km.FP16_PLANE_OFFSETS), np.float64)  # [m, 4]
    for col in codes:
        pair = (col[1::2] << 16) | col[0::2]  # byte rows (2j, 2j + 1) in one register
        parts = np.zeros((m, 4))
        for t, (shift, mask) in enumerate(km._F16_PLANES):
            bits = ((pair >> shift) & mask) | 0x64006400
            a = np.stack([bits & 0xFFFF, bits >> 16], -1).reshape(-1).astype(np.uint16)
            a = a.view(np.float16).astype(np.float64)  # plane t at byte rows p = 0..63
            contrib = xp[:, 64 * t:64 * t + 64] * a
            parts += contrib.reshape(m, 4, 16).sum(-1)
        got = (parts - corr) * np.asarray(inv, np.float64)[:, None]
        q = np.stack([((col >> s) & 63) - 32 for s in (9, 6, 3, 0)])  # [plane t, p]
        xn = np.asarray(x, np.float64)
        want = np.stack([sum(xn[:, 4 * p + t] * q[t, p] for t in range(4) for p in range(16 * g,
                                                                                   16 * g + 16))
                         for g in range(4)], -1)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(xn).max())
    text = km._RAW_PLANES_F16_ASM
    masks = {"m1": 0x003F003F, "m8": 0x01F801F8}
    for t, (shift, mask) in enumerate(km._F16_PLANES):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"lop3.b32 ${t},"))
        src, msk = line.split(",")[1].strip(), line.split(",")[2].strip()
        assert (src == "w") == (shift == 6) and masks[msk] == mask, line
    assert "shr.b32 w, $4, 6;" in text  # $4: the code pair


def _plane_ordered(x, k_order="natural"):
    """x's columns in the kernel's plane order (what ``grouped_matmul_fragments`` feeds it)."""
    from pallas_kernels.kernels import _permute_columns

    return _permute_columns(x, x.shape[1], kernel_mosaic.BLOCK_K, 4, k_order)


def test_fragment_scales_hold_each_threads_rows():
    k, n = 512, 128
    ws = np.random.default_rng(1).integers(0, 256, (1, k // 128, n), dtype=np.uint8)
    frag = np.asarray(kernel_mosaic.fragment_scales(ws))  # [1, N/64, K/256, 128]
    for t in (0, 9, 64, 127):
        w, lane = divmod(t, 32)
        row = 16 * w + lane // 4
        got = frag[0, 1, 1][4 * (t // 4):4 * (t // 4) + 4]  # column block 1, K step 1
        want = [ws[0, 2, 64 + row], ws[0, 3, 64 + row], ws[0, 2, 72 + row], ws[0, 3, 72 + row]]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layers", [None, 3])
def test_to_and_from_fragments_round_trip(layers):
    w = _rand_linear(512, 128, 2, layers=layers)
    f = pallas_kernels.to_fragments(w, integer=False)  # with integer codes: + code_a, code_b
    assert {a: f[a].shape for a in f} == {a: w[a].shape for a in w}
    assert not np.array_equal(np.asarray(f["quant_weight"]), np.asarray(w["quant_weight"]))
    back = pallas_kernels.from_fragments(f)
    for leaf in w:
        np.testing.assert_array_equal(np.asarray(back[leaf]), np.asarray(w[leaf]), leaf)
    inplace = pallas_kernels.to_fragments(jax.tree.map(jnp.copy, w), in_place=True,
                                          integer=False)
    np.testing.assert_array_equal(np.asarray(inplace["quant_weight"]),
                                  np.asarray(f["quant_weight"]))


def test_fragment_shapes_the_kernel_cannot_take_are_refused():
    with pytest.raises(NotImplementedError, match="K % 256"):
        pallas_kernels.to_fragments(_rand_linear(128, 64, 2))
    assert pallas_kernels.fragments_support(_rand_linear(512, 192, 2))
    assert not pallas_kernels.fragments_support(_rand_linear(512, 96, 2))


def test_block_m_follows_rows_per_expert():
    assert [kernel_mosaic.block_m_for(m, 64) for m in (8, 128, 512, 2048, 8192, 32768)] == \
        [8, 8, 16, 64, 64, 64]


def test_config_comes_from_the_tuned_table_else_the_rules(tmp_path, monkeypatch):
    """``config_for``: the device table's ``mosaic`` section (nearest row bucket within 4x, same
    fmt / activation / groups / K / N), else the heuristic; bad entries are refused."""
    entry = lambda **c: {"config": c, "us": 1.0}  # noqa: E731
    table = {"mosaic": {"wint2|swiglu|64|8192|3584|8": entry(block_m=16, stages=3,
                                                             schedule="one"),
                        "wint2|swiglu|64|8192|3584|1024": entry(block_m=32, stages=2,
                                                                schedule="all")}}
    (tmp_path / f"{config.device_key()}.json").write_text(json.dumps(table))
    monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
    config._tuned_table.cache_clear()
    try:
        got = [kernel_mosaic.config_for(m, 8192, 3584, 64, "swiglu") for m in (8, 16, 64, 512)]
        assert got[0] == got[1] == MosaicConfig(block_m=16, stages=3, schedule="one")
        # 8x from both entries / another activation: the heuristic
        assert got[2] == kernel_mosaic.heuristic_config(64, 64, "swiglu", n_out=3584, k=8192)
        assert got[3] == MosaicConfig(block_m=32, stages=2, schedule="all")
        # past the largest bucket, from config.LARGE_ROWS rows up: the largest bucket's entry
        assert kernel_mosaic.config_for(8 * config.LARGE_ROWS, 8192, 3584, 64, "swiglu") == \
            MosaicConfig(block_m=32, stages=2, schedule="all")
        assert kernel_mosaic.config_for(8, 8192, 3584, 64, None) == \
            kernel_mosaic.heuristic_config(8, 64, None, n_out=3584, k=8192)
    finally:
        config._tuned_table.cache_clear()
    wide = kernel_mosaic.heuristic_config(8192, 64, None, n_out=8192)  # 128 rows an expert
    assert wide.block_m == 64 and wide.col_blocks == 2 and wide.mma == "wgmma"
    eight = kernel_mosaic.heuristic_config(8, 64, "swiglu")  # 8-row tiles
    assert (eight.mma, eight.planes, eight.k_unroll) == ("sync", "fp16", 1)  # K unknown
    # two K steps a pipeline step under mma.sync where they divide (K = 3 x 256: one)
    assert kernel_mosaic.heuristic_config(8, 64, "swiglu", k=8192).k_unroll == 2
    assert kernel_mosaic.heuristic_config(8, 64, "swiglu", k=768).k_unroll == 1
    assert kernel_mosaic.heuristic_config(8192, 64, None, n_out=8192, k=8192).k_unroll == 1
    assert kernel_mosaic.heuristic_config(8192, 64, None, n_out=192).col_blocks == 1  # 3 blocks
    assert kernel_mosaic.heuristic_config(2048, 64, None, n_out=8192).col_blocks == 1
    with pytest.raises(ValueError, match="block_m=12"):
        MosaicConfig(block_m=12)
    with pytest.raises(ValueError, match="schedule='some'"):
        MosaicConfig(block_m=8, schedule="some")
    with pytest.raises(ValueError, match="mma='sync' takes block_m <= 64"):
        MosaicConfig(block_m=80, mma="sync")
    with pytest.raises(ValueError, match="mma='mma'"):
        MosaicConfig(block_m=8, mma="mma")
    with pytest.raises(ValueError, match="planes='fp16' needs mma='sync'"):
        MosaicConfig(block_m=8, planes="fp16")
    with pytest.raises(ValueError, match="k_unroll=3"):
        MosaicConfig(block_m=8, k_unroll=3)


def test_tail_heights_are_checked_and_chosen_by_the_rules():
    """``MosaicConfig.tails``: ascending multiples of 8 below block_m, wgmma only, a JSON list
    read back as a tuple; the heuristic gives wgmma tiles of 48+ rows every multiple of 16."""
    for bad in ((48, 16), (16, 16), (12,), (0,), (80,), (96,)):
        with pytest.raises(ValueError, match="tails="):
            MosaicConfig(block_m=80, tails=bad)
    with pytest.raises(ValueError, match="tails need mma='wgmma'"):
        MosaicConfig(block_m=16, mma="sync", tails=(8,))
    cfg = MosaicConfig(block_m=80, tails=[16, 40])
    assert cfg.tails == (16, 40) and MosaicConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert kernel_mosaic.heuristic_config(8192, 64, None, n_out=8192).tails == (16, 32, 48)
    assert kernel_mosaic.heuristic_config(2048, 64, "swiglu").block_m == 64
    assert kernel_mosaic.heuristic_config(1024, 64, "swiglu").tails == ()  # 32-row tiles
    assert kernel_mosaic.heuristic_config(8, 64, "swiglu").tails == ()  # mma.sync


@pytest.mark.skipif(ON_SM90, reason="on sm90 the kernel runs")
def test_reference_path_of_fragments_equals_rows():
    w = _rand_linear(256, 128, 3)
    x = jax.random.normal(jax.random.key(2), (12, 256), jnp.bfloat16)
    gs = jnp.asarray([5, 0, 6], jnp.int32)
    f = pallas_kernels.to_fragments(w)
    want = pallas_kernels.quant_grouped_matmul(x, w, gs, fmt="wint2", activation="swiglu",
                                               implementation="xla")
    for impl in ("xla", None):  # None: no Hopper GPU here -> the reference
        got = pallas_kernels.quant_grouped_matmul(x, f, gs, fmt="wint2", activation="swiglu",
                                                  implementation=impl, byte_order="fragments")
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    shuffled = pallas_kernels.quant_grouped_matmul(x, f, gs, fmt="wint2", k_order="shuffled",
                                                   implementation="xla", byte_order="fragments")
    np.testing.assert_array_equal(np.asarray(shuffled), np.asarray(
        pallas_kernels.quant_grouped_matmul(x, w, gs, fmt="wint2", k_order="shuffled",
                                            implementation="xla")))
    with pytest.raises(NotImplementedError, match="Hopper"):
        pallas_kernels.quant_grouped_matmul(x, f, gs, fmt="wint2", implementation="pallas",
                                            byte_order="fragments")


GPU_CASES = [
    dict(k=512, n=256, e=3, m=16, activation="swiglu"),
    dict(k=512, n=128, e=3, m=24, row_scale=True),
    dict(k=1024, n=512, e=4, m=40, activation="swiglu", block_m=16, schedule="one"),
    dict(k=1024, n=512, e=4, m=40, activation="swiglu", block_m=8, schedule="half", stages=3),
    dict(k=768, n=256, e=2, m=64, row_scale=True, block_m=64, schedule="one"),
    dict(k=1024, n=1024, e=16, m=600, activation="swiglu", seed=3),
    dict(k=512, n=512, e=8, m=2048, row_scale=True, padding=0, block_m=128, seed=4),
    dict(k=512, n=256, e=4, m=40, activation="swiglu", layers=3, layer=2, seed=5),
    dict(k=512, n=256, e=3, m=24, row_scale=True, k_order="shuffled", seed=6),
    dict(k=512, n=256, e=3, m=16, activation="swiglu", block_m=8, split_k=2, seed=7),
    dict(k=768, n=128, e=3, m=24, row_scale=True, block_m=8, split_k=3, seed=8),
    dict(k=512, n=256, e=4, m=40, activation="swiglu", layers=2, layer=1, block_m=16,
         schedule="one", split_k=2, seed=9),
    dict(k=512, n=512, e=3, m=40, activation="swiglu", block_m=16, schedule="one", col_blocks=2,
         seed=10),
    dict(k=768, n=256, e=3, m=24, row_scale=True, block_m=8, col_blocks=4, seed=11),
    dict(k=512, n=512, e=4, m=40, activation="swiglu", row_scale=True, layers=2, layer=1,
         block_m=8, split_k=2, col_blocks=2, seed=12),
    # tile heights that are not powers of two (the tuner cuts experts into 1-3 tiles)
    dict(k=512, n=512, e=4, m=300, activation="swiglu", block_m=80, schedule="one",
         col_blocks=2, seed=13),
    dict(k=768, n=256, e=5, m=200, row_scale=True, block_m=24, seed=14),
    # per-warp mma.sync (x fragments by ldmatrix from the swizzled tile) instead of wgmma
    dict(k=512, n=256, e=3, m=16, activation="swiglu", block_m=8, mma="sync", seed=15),
    dict(k=1024, n=512, e=4, m=40, activation="swiglu", block_m=16, schedule="one",
         mma="sync", seed=16),
    dict(k=768, n=256, e=3, m=64, row_scale=True, block_m=16, mma="sync", seed=17),
    dict(k=512, n=256, e=4, m=40, activation="swiglu", layers=2, layer=1, block_m=8,
         schedule="one", split_k=2, mma="sync", seed=18),
    dict(k=512, n=512, e=3, m=120, activation="swiglu", row_scale=True, block_m=24,
         col_blocks=2, mma="sync", seed=19),
    dict(k=512, n=256, e=3, m=24, row_scale=True, k_order="shuffled", block_m=8,
         mma="sync", seed=20),
    # fp16 planes (one shift a code pair; x scaled per row into fp16's range)
    dict(k=512, n=256, e=3, m=16, activation="swiglu", block_m=8, mma="sync", planes="fp16",
         seed=21),
    dict(k=1024, n=512, e=4, m=40, activation="swiglu", row_scale=True, block_m=16,
         schedule="one", mma="sync", planes="fp16", seed=22),
    dict(k=512, n=256, e=4, m=40, activation="swiglu", layers=2, layer=1, block_m=8,
         split_k=2, mma="sync", planes="fp16", seed=23),
    dict(k=768, n=256, e=3, m=24, row_scale=True, k_order="shuffled", block_m=8, mma="sync",
         planes="fp16", seed=24),
    # several K steps a pipeline step (one TMA issue, slot wait and barrier for all of them)
    dict(k=1024, n=512, e=4, m=40, activation="swiglu", block_m=8, split_k=2, mma="sync",
         planes="fp16", k_unroll=2, seed=25),
    dict(k=1024, n=256, e=3, m=24, row_scale=True, block_m=8, mma="sync", k_unroll=4, seed=26),
    dict(k=1024, n=512, e=4, m=300, activation="swiglu", block_m=80, schedule="one",
         k_unroll=2, seed=27),
    dict(k=1024, n=512, e=3, m=200, row_scale=True, block_m=48, col_blocks=2, k_unroll=2,
         layers=2, layer=1, seed=28),
    # shorter heights for tiles of fewer rows (each expert's last tile; m=300 over 4 experts
    # leaves last tiles of every height class, and empty experts)
    dict(k=512, n=512, e=4, m=300, activation="swiglu", block_m=80, schedule="one",
         tails=(16, 48), seed=29),
    dict(k=1024, n=512, e=5, m=300, row_scale=True, block_m=48, col_blocks=2, k_unroll=2,
         tails=(8, 24, 32), layers=2, layer=1, seed=30),
    dict(k=768, n=256, e=3, m=200, activation="swiglu", row_scale=True, block_m=64,
         split_k=3, tails=(32,), seed=31),
]


def _parse(case: dict) -> types.SimpleNamespace:
    c = dict(case)
    bm = c.pop("block_m", None)
    cfg = None if bm is None else MosaicConfig(block_m=bm, stages=c.pop("stages", 2),
                                               schedule=c.pop("schedule", "all"),
                                               split_k=c.pop("split_k", 1),
                                               col_blocks=c.pop("col_blocks", 1),
                                               mma=c.pop("mma", "wgmma"),
                                               planes=c.pop("planes", "bf16"),
                                               k_unroll=c.pop("k_unroll", 1),
                                               tails=c.pop("tails", ()))
    out = types.SimpleNamespace(
        k=c.pop("k"), n=c.pop("n"), e=c.pop("e"), m=c.pop("m"), seed=c.pop("seed", 0),
        layers=c.pop("layers", None), layer=c.pop("layer", None),
        act=c.pop("activation", None), rs=c.pop("row_scale", False), cfg=cfg,
        padding=c.pop("padding", 3), k_order=c.pop("k_order", "natural"))
    assert not c, f"unknown case fields {c}"
    return out


_CASE_IDS = lambda c: "-".join(f"{k}={v}" for k, v in c.items())  # noqa: E731


@pytest.mark.parametrize("case", GPU_CASES, ids=_CASE_IDS)
def test_kernel_lowers_for_cuda_on_any_host(case, monkeypatch):
    """Mosaic GPU's own lowering (wgmma register layouts, TMA tiling and swizzle, shared-memory
    allocation) runs on a CPU: every GPU case's kernel lowers for CUDA here, in CI, so a layout
    or API mistake fails before a GPU ever sees it (only ptxas and the run need the GPU)."""
    c = _parse(case)
    monkeypatch.setattr(kernel_mosaic, "available", lambda: True)
    lead = (c.layers, c.e) if c.layers else (c.e,)
    sd = jax.ShapeDtypeStruct
    w = {"quant_weight": sd((*lead, c.k // 4, c.n), jnp.uint8),
         "weight_scale": sd((*lead, c.k // 128, c.n), jnp.uint8),
         **{f: sd((*lead, c.n), jnp.float32) for f in ("super_scales", "code_scale", "code_zp")},
         **{f: sd((*lead, c.n), jnp.int32) for f in kernel_mosaic.INTEGER_CODE_LEAVES}}

    def f(x, w, gs, r):
        return kernel_mosaic.grouped_matmul_fragments(
            x, w, gs, activation=c.act, row_scale=r, layer=c.layer, k_order=c.k_order,
            config=c.cfg)

    args = (sd((c.m, c.k), jnp.bfloat16), w, sd((c.e,), jnp.int32),
            sd((c.m,), jnp.float32) if c.rs else None)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_operand_pieces_fit_the_k_steps():
    assert kernel_mosaic._fit_pieces(8, 32) == 8  # 300B up_gate: 32 K steps
    assert kernel_mosaic._fit_pieces(8, 14) == 7  # 300B down: 14
    assert kernel_mosaic._fit_pieces(4, 5) == 1
    assert kernel_mosaic._fit_pieces(1, 14) == 1


def test_k_unroll_that_does_not_divide_the_k_steps_is_refused(monkeypatch):
    monkeypatch.setattr(kernel_mosaic, "available", lambda: True)
    sd = jax.ShapeDtypeStruct
    w = {"quant_weight": sd((3, 192, 128), jnp.uint8), "weight_scale": sd((3, 6, 128), jnp.uint8),
         **{f: sd((3, 128), jnp.float32) for f in ("super_scales", "code_scale", "code_zp")}}
    cfg = MosaicConfig(block_m=8, mma="sync", k_unroll=2)  # K = 768: 3 steps of 256
    f = functools.partial(kernel_mosaic.grouped_matmul_fragments, config=cfg)
    with pytest.raises(NotImplementedError, match="k_unroll=2"):
        jax.jit(f).trace(sd((8, 768), jnp.bfloat16), w, sd((3,), jnp.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=_CASE_IDS)
def test_kernel_matches_reference(case):
    c = _parse(case)
    k, n, e, m, seed, layers, layer = c.k, c.n, c.e, c.m, c.seed, c.layers, c.layer
    act, rs, cfg, padding, k_order = c.act, c.rs, c.cfg, c.padding, c.k_order
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    w = _rand_linear(k, n, e, seed, layers)
    x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(jnp.bfloat16)
    r = jax.random.uniform(jax.random.fold_in(key, 2), (m,)) if rs else None
    gs = jnp.asarray(skewed_group_sizes(rng, m, e, padding=padding))
    w_layer = w if layer is None else {f: a[layer] for f, a in w.items()}
    oracle, _ = _exact_oracle(w_layer, "wint2", k_order)
    want = reference.quant_grouped_matmul_reference(x, oracle, gs, fmt="bf16", activation=act,
                                                    row_scale=r)
    f = pallas_kernels.to_fragments(w)
    _poison(m * n * 4)
    got = kernel_mosaic.grouped_matmul_fragments(x, f, gs, activation=act, row_scale=r,
                                                 layer=layer, k_order=k_order, config=cfg)
    assert_close(got, want, context=str(case))
    if padding:
        assert not np.asarray(got[m - padding:]).astype(np.float32).any(), "padding rows"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs a Hopper GPU")
def test_fp16_planes_take_x_computed_in_the_same_jit():
    """x made by XLA in the same ``jit`` (here f32 -> bf16): XLA may skip x's bf16 rounding, and
    the fp16 path must then still multiply and sum the same values (results/NOTES.md §44)."""
    k, n, e, m = 1024, 256, 3, 16
    w = _rand_linear(k, n, e, seed=31)
    v = jax.random.normal(jax.random.key(31), (m, k), jnp.float32)
    gs = jnp.asarray([6, 0, 10], jnp.int32)
    cfg = MosaicConfig(block_m=8, mma="sync", planes="fp16", split_k=2)

    def f(v, w, gs):
        return kernel_mosaic.grouped_matmul_fragments(v.astype(jnp.bfloat16), w, gs, config=cfg)

    oracle, _ = _exact_oracle(w, "wint2", "natural")
    want = reference.quant_grouped_matmul_reference(v, oracle, gs, fmt="bf16")  # fp32 x
    got = jax.jit(f)(v, pallas_kernels.to_fragments(w), gs)
    assert_close(got, want, rel_l2=4e-3, dtype=jnp.bfloat16, context="x from the same jit")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs a Hopper GPU")
@pytest.mark.parametrize("code_step", ["integer", "float"])
@pytest.mark.parametrize("mma", ["wgmma", "sync", "sync-fp16"])
def test_kernel_decode_is_exact_through_one_hot_rows(mma, code_step):
    """x = I reads back the weights. wgmma: bf16(bf16(q * nib) * super_scale), the documented
    rounding of the nibble folded into the bf16 weight; mma.sync (each scale group's partial
    sums scaled in fp32): the format's own bf16(q * nib * super_scale), one rounding. The
    integer code step runs in the warps whose 16 columns all have one, the float step in the
    others: this data has both kinds."""
    k, n = 512, 256
    w = _rand_linear(k, n, 1, seed=7)
    if code_step == "integer":  # column 37 (warp 2): the golden file's one non-affine column
        cs = np.asarray(w["code_scale"]).copy()
        zp = np.asarray(w["code_zp"]).copy()
        cs[0, 37], zp[0, 37] = np.uint32([1122399026, 1161729537]).view(np.float32)
        w = kernel_mosaic.integer_codes({**w, "code_scale": jnp.asarray(cs),
                                         "code_zp": jnp.asarray(zp)})
        per_warp = (np.asarray(w["code_a"]) != 0).reshape(-1, 16).all(1)
        assert per_warp.tolist() == [True] * 2 + [False] + [True] * 13
    leaves = [np.asarray(w[f])[0] for f in ("quant_weight", "weight_scale", "super_scales",
                                            "code_scale", "code_zp")]
    exact = np.asarray(dequantize_wint2(*leaves), np.float32)
    q_nib = dequantize_wint2(leaves[0], leaves[1], np.ones_like(leaves[2]), *leaves[3:])
    want = (np.asarray(q_nib, np.float32) * leaves[2].astype(np.float32)[None, :])
    want = np.asarray(jnp.asarray(want).astype(jnp.bfloat16).astype(jnp.float32))
    if mma != "wgmma":
        assert (want != exact).any()  # the two roundings differ on this data
        want = exact
    mma, _, planes = mma.partition("-")
    got = kernel_mosaic.grouped_matmul_fragments(
        jnp.eye(k, dtype=jnp.bfloat16), pallas_kernels.to_fragments(w, integer=False),
        jnp.asarray([k], jnp.int32),
        config=MosaicConfig(block_m=16, mma=mma, planes=planes or "bf16"))
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


FFN_CASES = [  # hidden, inter, experts, rows, (up_gate config, down config), layers
    (512, 256, 3, 16, (MosaicConfig(block_m=8, mma="sync", planes="fp16", split_k=2),
                       MosaicConfig(block_m=8, mma="sync", planes="fp16")), None),
    (1024, 512, 4, 40, (MosaicConfig(block_m=8, mma="sync", split_k=4, k_unroll=1),
                        MosaicConfig(block_m=8, mma="sync", k_unroll=2)), 2),
    (512, 256, 4, 40, (MosaicConfig(block_m=16, schedule="one"), None), None),  # no split
]


def _ffn_args(hidden, inter, e, m, layers, seed=30):
    w_up = _rand_linear(hidden, 2 * inter, e, seed, layers)
    w_down = _rand_linear(inter, hidden, e, seed + 1, layers)
    key = jax.random.key(seed)
    x = jax.random.normal(key, (m, hidden), jnp.float32).astype(jnp.bfloat16)
    r = jax.random.uniform(jax.random.fold_in(key, 1), (m,))
    return w_up, w_down, x, r


@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: f"h{c[0]}-m{c[3]}")
def test_expert_ffn_lowers_for_cuda_on_any_host(case, monkeypatch):
    """The FFN op's launches (with a K-split up_gate: its partial sums into the down's operand
    launch) lower for CUDA on a CPU, and a split up_gate leaves no XLA epilogue between them."""
    hidden, inter, e, m, cfgs, layers = case
    monkeypatch.setattr(kernel_mosaic, "available", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the Triton operand launches
    sd = jax.ShapeDtypeStruct
    lead = (layers, e) if layers else (e,)

    def leaves(k, n):
        return {"quant_weight": sd((*lead, k // 4, n), jnp.uint8),
                "weight_scale": sd((*lead, k // 128, n), jnp.uint8),
                **{f: sd((*lead, n), jnp.float32)
                   for f in ("super_scales", "code_scale", "code_zp")}}

    layer = 1 if layers else None

    def fused(x, w_up, w_down, gs, r):  # up to 8 operand programs a row: as K's steps allow
        return kernel_mosaic.expert_ffn_fragments(x, w_up, w_down, gs, row_scale=r,
                                                  layer=layer, configs=cfgs, fuse=True,
                                                  operand_pieces=8)

    def two_calls(x, w_up, w_down, gs, r):
        h = kernel_mosaic.grouped_matmul_fragments(x, w_up, gs, activation="swiglu",
                                                   layer=layer, config=cfgs[0])
        return kernel_mosaic.grouped_matmul_fragments(h, w_down, gs, row_scale=r, layer=layer,
                                                      config=cfgs[1])

    def lowered(f):
        return jax.jit(f).trace(
            sd((m, hidden), jnp.bfloat16), leaves(hidden, 2 * inter), leaves(inter, hidden),
            sd((e,), jnp.int32), sd((m,), jnp.float32)).lower(
                lowering_platforms=("cuda",)).as_text()

    try:
        text, control = lowered(fused), lowered(two_calls)
    except RuntimeError as err:
        if "No supported GPU" in str(err):
            pytest.skip("this jax's Triton lowering needs a GPU")
        raise
    assert text.count("custom_call @mosaic_gpu") == 2
    assert text.count("__gpu$xla.gpu.triton") == 2  # the two operand launches
    # A split up_gate's SwiGLU: an XLA epilogue between two calls, none in the FFN op (the
    # partial sums go to the down's operand launch as they are)
    assert ("stablehlo.exponential" in control) == (cfgs[0].split_k > 1)  # silu
    assert "stablehlo.exponential" not in text


def test_ffn_plan_fuses_a_split_up_gate_at_few_rows():
    split = MosaicConfig(block_m=8, mma="sync", split_k=2)
    whole = MosaicConfig(block_m=8, mma="sync")
    few = kernel_mosaic.FFN_FUSE_MAX_ROWS
    assert kernel_mosaic.ffn_plan(few, split, None, None) == (
        True, 1, kernel_mosaic.FFN_DOWN_PIECES)  # pieces on the down's operand launch only
    assert kernel_mosaic.ffn_plan(few + 1, split, None, None) == (False, 1, 1)
    assert kernel_mosaic.ffn_plan(few, whole, None, None) == (False, 1, 1)  # nothing to hand on
    assert kernel_mosaic.ffn_plan(few, whole, True, None) == (False, 1, 1)
    assert kernel_mosaic.ffn_plan(64, split, True, None)[:1] == (True,)
    assert kernel_mosaic.ffn_plan(few, split, False, 4) == (False, 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: f"h{c[0]}-m{c[3]}")
def test_expert_ffn_matches_the_two_projections(case):
    """Against the exact oracle (decoded weights, XLA matmuls) and against two
    ``grouped_matmul_fragments`` calls; with a split up_gate h is formed in the operand launch,
    whose exp may differ from XLA's in the last bits (h one bf16 ulp off in rare elements)."""
    hidden, inter, e, m, cfgs, layers = case
    w_up, w_down, x, r = _ffn_args(hidden, inter, e, m, layers)
    gs = jnp.asarray(skewed_group_sizes(np.random.default_rng(3), m, e, padding=3))
    layer = 1 if layers else None
    pick = (lambda w: w) if layer is None else (lambda w: {f: a[layer] for f, a in w.items()})
    up_oracle, _ = _exact_oracle(pick(w_up), "wint2", "natural")
    down_oracle, _ = _exact_oracle(pick(w_down), "wint2", "natural")
    h = reference.quant_grouped_matmul_reference(x, up_oracle, gs, fmt="bf16",
                                                 activation="swiglu")
    want = reference.quant_grouped_matmul_reference(h, down_oracle, gs, fmt="bf16", row_scale=r)
    fu, fd = pallas_kernels.to_fragments(w_up), pallas_kernels.to_fragments(w_down)
    got = kernel_mosaic.expert_ffn_fragments(x, fu, fd, gs, row_scale=r, layer=layer,
                                             configs=cfgs, fuse=True)
    two = kernel_mosaic.grouped_matmul_fragments(
        kernel_mosaic.grouped_matmul_fragments(x, fu, gs, activation="swiglu", layer=layer,
                                               config=cfgs[0]),
        fd, gs, row_scale=r, layer=layer, config=cfgs[1])
    assert_close(got, want, rel_l2=1e-2, min_frac_close=0.97, context=str(case))
    assert_close(got, two, rel_l2=1e-3, min_frac_close=0.99, context=str(case))
    assert not np.asarray(got[m - 3:]).astype(np.float32).any(), "padding rows"


def test_integer_codes_ride_along_and_are_dropped_by_from_fragments():
    w = _rand_linear(256, 128, 2, layers=2)
    plain = pallas_kernels.to_fragments(w, integer=False)
    assert not set(kernel_mosaic.INTEGER_CODE_LEAVES) & set(plain)
    f = pallas_kernels.to_fragments(w, integer=True)
    a, b = (np.asarray(f[leaf]) for leaf in kernel_mosaic.INTEGER_CODE_LEAVES)
    assert a.shape == b.shape == w["code_scale"].shape and a.dtype == np.int32
    u = np.arange(256, dtype=np.int64)[:, None]
    cs, zp = np.asarray(w["code_scale"]).reshape(-1), np.asarray(w["code_zp"]).reshape(-1)
    ok = a.reshape(-1) != 0
    assert ok.mean() > 0.99
    got = ((u * a.reshape(1, -1)[:, ok] + b.reshape(1, -1)[:, ok]) % 2**32) >> 16
    want = wint2.wint2_codes_exact(u, cs[None, ok], zp[None, ok])
    np.testing.assert_array_equal(got, want)
    back = pallas_kernels.from_fragments(f)
    assert sorted(back) == sorted(w)
    for leaf in w:
        np.testing.assert_array_equal(np.asarray(back[leaf]), np.asarray(w[leaf]))


def test_stored_integer_codes_are_kept_or_dropped_never_refitted():
    """A converted checkpoint stores code_a / code_b (jaxwint2.layout): the integer step uses
    them as they are (no fit at load), the float step (``--code-step float``) drops them."""
    w = _rand_linear(256, 128, 2)
    stored = {leaf: jnp.full(w["code_scale"].shape, 7, jnp.int32)
              for leaf in kernel_mosaic.INTEGER_CODE_LEAVES}  # not a fit: must come back as is
    f = pallas_kernels.to_fragments({**w, **stored}, integer=True)
    for leaf in kernel_mosaic.INTEGER_CODE_LEAVES:
        assert f[leaf] is stored[leaf]
    assert not set(kernel_mosaic.INTEGER_CODE_LEAVES) & set(
        pallas_kernels.to_fragments({**w, **stored}, integer=False))
    a, b = kernel_mosaic.fit_integer_codes(np.asarray(w["code_scale"]), np.asarray(w["code_zp"]))
    fitted = kernel_mosaic.integer_codes(w)
    np.testing.assert_array_equal(np.asarray(fitted["code_a"]), a)
    np.testing.assert_array_equal(np.asarray(fitted["code_b"]), b)


def test_integer_codes_are_placed_like_the_other_leaves():
    """Uncommitted like a plain array leaf: a committed one among them made jit compile the
    model's steps again once their token arguments became committed (results/NOTES.md §60)."""
    w = _rand_linear(256, 64, 2)
    out = kernel_mosaic.integer_codes(w)
    assert not w["code_scale"].committed
    assert not any(out[leaf].committed for leaf in kernel_mosaic.INTEGER_CODE_LEAVES)
