"""The Mosaic WINT2 kernel's TMA pipeline with nothing computed: how fast its bytes can stream.

    python -m pallas_kernels.skeleton [--shape ernie45_300b] [--tokens 1]

:func:`stream` launches the grid of ``kernel_mosaic.grouped_matmul``'s mma.sync path (K split,
tiles, column blocks; gate and up blocks paired in one program) and runs its ``emit_pipeline``
over the same block specs and transforms (x tile, byte chunks, scale chunks) with an empty body.
Its time against the copy bandwidth says whether the pipeline itself can keep up; against the
real kernel, what the decode and the matmul cost on top of the stream. On the H100 (jax 0.11.2,
``results/NOTES.md`` §76) the 1-token 300B up_gate's skeleton streams its packed bytes at
100 % of the copy rate (41.0 µs), where the kernel takes 61.5.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from .kernel_mosaic import BLOCK_K, BLOCK_N


def stream(x, qwf, wsf, *, tiles: int, stages: int = 2, k_unroll: int = 2, split_k: int = 1,
           halves: int = 1, with_x: bool = True, with_scales: bool = True):
    """Stream the bytes ``grouped_matmul`` would read for ``tiles`` tiles of 8 rows, computing
    nothing. ``x [tiles * 8, K]`` bf16, ``qwf [G, N/64, K/256, 16, 256]`` and ``wsf [G, N/64,
    K/256, 128]`` uint8 (``fragment_weights`` / ``fragment_scales`` shapes); tile ``t`` reads
    group ``7 t mod G``. ``halves=2``: a SwiGLU projection's gate and up blocks in one program."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_groups, nblk, ksteps = qwf.shape[:3]
    out_blocks = nblk // halves
    psteps = ksteps // split_k // k_unroll
    if psteps * split_k * k_unroll != ksteps:
        raise ValueError(f"K/256 = {ksteps} steps must divide into split_k={split_k} x "
                         f"k_unroll={k_unroll}")
    x_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(x_ref, qw_ref, ws_ref, out_ref):
        s, t, jn = (jax.lax.axis_index(a) for a in "stn")
        g, k0 = (t * 7) % num_groups, s * psteps
        specs, refs = [], []
        if with_x:
            specs.append(plgpu.BlockSpec((8, BLOCK_K * k_unroll), lambda kk: (t, k0 + kk),
                                         transforms=x_transforms))
            refs.append(x_ref)
        for h in range(halves):
            nb = jn + h * out_blocks
            specs.append(plgpu.BlockSpec((1, 1, k_unroll, 16, 256),
                                         lambda kk, nb=nb: (g, nb, k0 + kk, 0, 0)))
            refs.append(qw_ref)
            if with_scales:
                specs.append(plgpu.BlockSpec((1, 1, k_unroll, 128),
                                             lambda kk, nb=nb: (g, nb, k0 + kk, 0)))
                refs.append(ws_ref)
        plgpu.emit_pipeline(lambda _, *smem: None, grid=(psteps,), in_specs=specs,
                            max_concurrent_steps=stages)(*refs)

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((BLOCK_N,), jnp.float32),
                          grid=(split_k, tiles, out_blocks), grid_names=("s", "t", "n"),
                          compiler_params=plgpu.CompilerParams())
    return kernel(x, qwf, wsf)


def main(argv=None) -> int:
    from . import bench, kernel_mosaic, shapes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="ernie45_300b")
    p.add_argument("--tokens", type=int, default=1)
    args = p.parse_args(argv)
    s = shapes.SHAPES[args.shape]
    tiles = args.tokens * s.top_k  # one row an expert: the few-token case
    ceil = bench.ceilings()
    print(json.dumps({"ceilings": ceil, "jax": jax.__version__,
                      "device": jax.devices()[0].device_kind}), flush=True)
    for proj, (k, n), act in (("up_gate", s.up_gate, "swiglu"), ("down", s.down, None)):
        cfg = kernel_mosaic.config_for(8 * tiles, k, n // 2 if act else n, s.experts, act)
        kq = jax.random.key(0)
        qwf = jax.random.bits(kq, (s.experts, n // BLOCK_N, k // BLOCK_K, 16, 256), jnp.uint8)
        wsf = jax.random.bits(kq, (s.experts, n // BLOCK_N, k // BLOCK_K, 128), jnp.uint8)
        insts = [(jax.random.normal(jax.random.key(i), (8 * tiles, k), jnp.bfloat16), qwf, wsf)
                 for i in range(4)]
        packed = tiles * shapes.packed_bytes("wint2", k, n)  # what the tiles' experts hold
        base = dict(tiles=tiles, stages=cfg.stages, k_unroll=cfg.k_unroll, split_k=cfg.split_k,
                    halves=2 if act else 1)
        for variant in ({}, {"with_x": False}, {"with_scales": False}, {"stages": 4}):
            fn = functools.partial(stream, **{**base, **variant})
            us = min(bench.device_seconds(fn, insts) * 1e6 for _ in range(2))
            print(json.dumps({"proj": proj, "tokens": args.tokens, **base, **variant,
                              "us": round(us, 2), "GBps": round(packed / us / 1e3),
                              "pct_copy": round(100 * packed / us / 1e3 / ceil["copy_GBps"], 1)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
