"""``python -m pallas_kernels.drive``: one grouped WINT2 projection, called in a loop.

For profilers: a process with nothing but this kernel (and its tile table) in it, e.g.::

    ncu --clock-control none --kernel-name regex:wint2 --launch-skip 2 --launch-count 1 \\
        --section SourceCounters --page source --print-source sass --csv \\
        python -m pallas_kernels.drive --tokens 1 --proj up_gate --config 16,32,128,4,mma_gs,1

``--kernel mosaic`` drives the Mosaic GPU kernel instead (fragment byte order; kernel name
``wint2_fragments_matmul``; ``--block-m`` / ``--stages`` / ``--schedule`` / ``--split-k`` /
``--col-blocks`` / ``--mma`` / ``--planes`` / ``--k-unroll`` override its tuned or heuristic config;
``--prologue xla`` prepares its operands with XLA ops instead of the Triton launch,
``--operand-pieces P`` with P programs a row in it). ``--proj ffn`` drives the whole expert FFN
(tuned configs; with ``--kernel mosaic --fused-ffn`` as one op, ``expert_ffn_fragments``).

Prints the mean wall time per call over ``--calls`` pipelined calls (one sync at the end). The
benchmark proper, with checks and baselines, is :mod:`pallas_kernels.bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from . import kernel_mosaic, kernels, shapes
from .config import MOSAIC_MMAS, MOSAIC_PLANES, TuningConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="ernie45_300b", choices=sorted(shapes.SHAPES))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--proj", choices=("up_gate", "down", "ffn"), default="up_gate",
                   help="one projection, or the whole expert FFN (both, tuned configs)")
    p.add_argument("--config", default=None,
                   help="block_m,block_n,block_k,num_warps,mode,split_k (default: tuned)")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--kernel", choices=("triton", "mosaic"), default="triton")
    p.add_argument("--block-m", type=int, default=None, help="mosaic: rows per tile")
    p.add_argument("--stages", type=int, default=None, help="mosaic: pipeline stages")
    p.add_argument("--schedule", choices=kernel_mosaic.SCHEDULES, default=None,
                   help="mosaic: decode schedule (default: tuned, else the heuristic)")
    p.add_argument("--split-k", type=int, default=None, help="mosaic: K split")
    p.add_argument("--col-blocks", type=int, default=None,
                   help="mosaic: 64-column output blocks per program")
    p.add_argument("--mma", choices=MOSAIC_MMAS, default=None,
                   help="mosaic: tensor-core instruction (default: tuned, else the heuristic)")
    p.add_argument("--planes", choices=MOSAIC_PLANES, default=None,
                   help="mosaic, with --mma sync: operand type of the decoded planes")
    p.add_argument("--k-unroll", type=int, default=None,
                   help="mosaic: 256-deep K steps a pipeline step")
    p.add_argument("--prologue", choices=("pallas", "xla"), default=None,
                   help="mosaic: the operands (tile table, x planes, group sums) from one Triton "
                        "launch (default) or XLA ops (prologue.expert_operands)")
    p.add_argument("--operand-pieces", type=int, default=None,
                   help="mosaic: programs a row in the operand launch (prologue.expert_operands;"
                        " default 1, or the FFN op's own choice)")
    p.add_argument("--fused-ffn", action="store_true",
                   help="mosaic, --proj ffn: the FFN as one op, as the model runs it "
                        "(expert_ffn_fragments; default: two grouped calls)")
    add_code_step_args(p)
    a = p.parse_args(argv)
    use_code_step_args(a)
    cfg = None
    if a.config:
        bm, bn, bk, nw, mode, split = a.config.split(",")
        cfg = TuningConfig(block_m=int(bm), block_n=int(bn), block_k=int(bk), num_warps=int(nw),
                           mode=mode, split_k=int(split))
    s = shapes.SHAPES[a.shape]
    if a.proj == "ffn":
        return _ffn(a, s, cfg)
    k, n = s.up_gate if a.proj == "up_gate" else s.down
    act = "swiglu" if a.proj == "up_gate" else None
    w = shapes.random_linear(jax.random.key(0), "wint2", k, n, s.experts)
    x, gs = _routed_rows(a, s, k)
    if a.kernel == "mosaic":
        w = kernel_mosaic.to_fragments(w)
        n_out = n // 2 if act else n
        mcfg = kernel_mosaic.config_for(x.shape[0], k, n_out, s.experts, act)
        overrides = dict(block_m=a.block_m, stages=a.stages, schedule=a.schedule,
                         split_k=a.split_k, col_blocks=a.col_blocks, mma=a.mma,
                         planes=a.planes, k_unroll=a.k_unroll)
        mcfg = dataclasses.replace(mcfg, **{f: v for f, v in overrides.items() if v is not None})
        f = jax.jit(lambda x, w, gs: kernel_mosaic.grouped_matmul_fragments(
            x, w, gs, activation=act, config=mcfg, prologue=a.prologue,
            operand_pieces=a.operand_pieces or 1))
    else:
        f = jax.jit(lambda x, w, gs: kernels.quant_grouped_matmul(
            x, w, gs, interpret=jax.default_backend() != "gpu", fmt="wint2", activation=act,
            config=cfg))
    what = (f"mosaic {mcfg} prologue={a.prologue or 'pallas'} pieces={a.operand_pieces} "
            f"code_step={a.code_step} dyadic={a.dyadic_codes}"
            if a.kernel == "mosaic"
            else cfg or "tuned config")
    _time(a, f, (x, w, gs), what)


def _ffn(a, s, cfg) -> None:
    """The whole expert FFN: up_gate + SwiGLU, then down with the routing weights."""
    (k, n), (k2, n2) = s.up_gate, s.down
    w_up = shapes.random_linear(jax.random.key(0), "wint2", k, n, s.experts)
    w_down = shapes.random_linear(jax.random.key(2), "wint2", k2, n2, s.experts)
    x, gs = _routed_rows(a, s, k)
    rw = jax.random.uniform(jax.random.key(3), (x.shape[0],), jnp.float32)
    if a.kernel == "mosaic":
        w_up, w_down = kernel_mosaic.to_fragments(w_up), kernel_mosaic.to_fragments(w_down)
        def ffn(x, wu, wd, gs, rw):  # two calls unless --fused-ffn (then the op's own plan)
            return kernel_mosaic.expert_ffn_fragments(
                x, wu, wd, gs, row_scale=rw, prologue=a.prologue,
                fuse=None if a.fused_ffn else False, operand_pieces=a.operand_pieces)
        what = (f"mosaic tuned configs {'one op' if a.fused_ffn else 'two calls'} "
                f"prologue={a.prologue or 'pallas'} pieces={a.operand_pieces} "
                f"code_step={a.code_step} dyadic={a.dyadic_codes}")
    else:
        kw = dict(interpret=jax.default_backend() != "gpu", fmt="wint2", config=cfg)

        def ffn(x, wu, wd, gs, rw):
            h = kernels.quant_grouped_matmul(x, wu, gs, activation="swiglu", **kw)
            return kernels.quant_grouped_matmul(h, wd, gs, row_scale=rw, **kw)
        what = cfg or "tuned config"
    _time(a, jax.jit(ffn), (x, w_up, w_down, gs, rw), what)


def add_code_step_args(p: argparse.ArgumentParser, *, dyadic: bool = True) -> None:
    """``--code-step`` and (``dyadic``: synthetic weights from :mod:`shapes`) ``--dyadic-codes``:
    this driver's, ``pallas_kernels.bench``'s and ``jaxwint2.bench``'s."""
    p.add_argument("--code-step", choices=("integer", "float"), default="integer",
                   help="the Mosaic WINT2 kernel's byte -> code step: integer in each warp whose "
                        "columns have one (kernel_mosaic.integer_codes), or float everywhere")
    if not dyadic:
        return
    p.add_argument("--dyadic-codes", action="store_true",
                   help="WINT2 weights with coarse dyadic code_scale / code_zp "
                        "(shapes.dyadic_codes: every column has an integer code step; the "
                        "default arbitrary fp32 columns: 99.98 %%)")


def use_code_step_args(a: argparse.Namespace) -> None:
    kernel_mosaic.INTEGER_CODES = a.code_step == "integer"
    shapes.DYADIC_CODES = getattr(a, "dyadic_codes", False)


def _routed_rows(a, s, k: int):
    """``--tokens`` random bf16 rows ``[tokens * top_k, k]`` and their uniform routing's group
    sizes."""
    gs = jnp.asarray(shapes.group_sizes(shapes.route(a.tokens, s, "uniform", seed=a.tokens),
                                        s.experts))
    return jax.random.normal(jax.random.key(1), (a.tokens * s.top_k, k), jnp.bfloat16), gs


def _time(a, f, args, what) -> None:
    for _ in range(3):  # compile, warm up
        jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(a.calls):
        y = f(*args)
    jax.block_until_ready(y)
    print(f"{a.shape} {a.proj} tokens={a.tokens} {what}: "
          f"{(time.perf_counter() - t0) / a.calls * 1e6:.1f} us per call "
          f"({jax.devices()[0].device_kind}, jax {jax.__version__})")


if __name__ == "__main__":
    main()
