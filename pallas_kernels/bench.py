"""``python -m pallas_kernels.bench``: check, then time, the MoE expert FFN on ERNIE-4.5 shapes.

Owns the measurement protocol (not the kernels). One run:

1. measures the device's ceilings (device copy, read + write counted; a bf16 8192^3 matmul);
2. checks every Pallas kernel against the jnp reference on fresh random data (all formats,
   dense + grouped with empty experts and padding rows, swiglu + row_scale, shuffled K order,
   f32 x), with outputs landing in memory pre-filled with NaN, and the in-kernel WINT2 decode
   bit-exact against ``dequantize_wint2`` through a one-hot x (FastDeploy golden tensors);
3. times the whole expert FFN of one layer (up_gate + SwiGLU + down, routing weight folded into
   down's epilogue) for tokens in ``shapes.TOKENS``, uniform and skewed routing, against
   baselines timed in the same run: bf16 weights through XLA per-expert matmuls (active experts,
   routing known to the compiler), the naive path (jnp decode of the active experts' WINT2
   weights + XLA per-expert matmuls), and the WINT4 Pallas kernel. On a Hopper GPU the WINT2
   row is the Mosaic GPU kernel (``kernel_mosaic.py``, fragment byte order; impl
   ``pallas_mosaic``) and the Triton WINT2 kernel is timed beside it as one more baseline.

Timing (:func:`time_instances`): each timed program runs ``R`` independent instances (fresh x;
expert labels rotated so that the instances touch different weights while their total exceeds
~3x the L2); the program is dispatched back to back (>= 20 ms of work) with one sync, so host
dispatch overlaps GPU work; median over 5 repetitions of wall time / (calls x R). Output: JSON
lines (``--out``) and a table printed last. ``--tune`` sweeps the Triton kernel's configs on the
two grouped projections, ``--tune-mosaic`` the Mosaic kernel's (tile rows, pipeline stages,
decode schedule, K split, column blocks a program, K steps a pipeline step, the instruction;
then the winner's tail heights, ``--tails-only`` those alone); both write ``tuned/<device>.json``
(the only writer of those files).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, codecs, kernel_mosaic, profiling, reference, shapes
from . import config as config_lib
from .api import quant_expert_ffn, quant_grouped_matmul
from .drive import add_code_step_args, use_code_step_args
from .numerics import assert_close

L2_BYTES = 50 * 2**20


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _program(fn):
    """One jitted program calling ``fn`` (jitted on its own, so a Pallas kernel is lowered and
    compiled once, not once per instance) on every instance of a list. Cached by ``fn``, so that
    a row timed both by wall clock and by GPU kernel time compiles it once."""
    inner = jax.jit(fn)
    return jax.jit(lambda insts: [inner(*a) for a in insts])


def time_instances(fn, instances, *, reps: int = 5, min_seconds: float = 0.02) -> float:
    """Median seconds per call of ``fn(*inst)`` over ``instances``, with dispatch overlapped.

    One jitted program (:func:`_program`) calls ``fn`` on every instance; a timing dispatches
    that program back to back until ``min_seconds`` of work is queued and syncs once. A single
    dispatch + sync costs ~0.1-0.2 ms on the GPU machine, as much as a 1-token 300B FFN: timed
    one program per sync over 2 instances, that FFN read 354 µs for 158 µs of GPU work
    (results/NOTES.md §25).
    """
    run = _program(fn)
    jax.block_until_ready(run(instances))
    t0 = time.perf_counter()
    jax.block_until_ready(run(instances))
    calls = min(200, max(1, math.ceil(min_seconds / (time.perf_counter() - t0))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = run(instances)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts) / len(instances)


def device_seconds(fn, instances) -> float:
    """Seconds of GPU kernel time per call of ``fn(*inst)``, summed from a profiler trace.

    For calls of a few µs, where :func:`time_instances` would time the host's dispatch rather
    than the GPU (results/NOTES.md §50, §54): one jitted program runs every instance, and the
    durations of the kernels it launched (the split-K sum included; memcpys excluded) are read
    from a ``jax.profiler`` trace of one run (:func:`profiling.gpu_kernel_ns`). Inside the
    jitted decode step, where XLA's command buffers replay whole runs of kernels, this is what a
    call costs. Falls back to :func:`time_instances` off a GPU, or where the trace holds no GPU
    stream.
    """
    if jax.default_backend() != "gpu":
        return time_instances(fn, instances)
    run = _program(fn)
    for _ in range(2):
        jax.block_until_ready(run(instances))
    ns = sum(profiling.gpu_kernel_ns(lambda: run(instances)).values())
    if not ns:
        return time_instances(fn, instances)
    return ns * 1e-9 / len(instances)


def ceilings() -> dict[str, float]:
    a = jnp.ones((2**29,), jnp.float32)  # 2 GiB
    copy = time_instances(lambda v: v * 2.0, [(a,)], reps=10)
    n = 8192
    x = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = time_instances(lambda p, q: p @ q, [(x, y)], reps=10)
    return {"copy_GBps": 2 * a.nbytes / copy / 1e9, "bf16_matmul_TFLOPs": 2 * n**3 / mm / 1e12}


# ---------------------------------------------------------------------------------------------
# the expert FFN: Pallas ops and the XLA baselines
# ---------------------------------------------------------------------------------------------


def ffn_pallas(x, w_up, w_down, gs, rw, *, fmt, impl="pallas", byte_order="rows"):
    """The expert FFN as the model runs it (``quant_expert_ffn``: on the Mosaic kernel one op
    that may fuse the projections' hand-over); ``impl="xla"``: the reference."""
    return quant_expert_ffn(x, w_up, w_down, gs, fmt=fmt, row_scale=rw, implementation=impl,
                            byte_order=byte_order)


def ffn_two_calls(x, w_up, w_down, gs, rw, *, fmt, impl="pallas", byte_order="rows"):
    """The expert FFN as two ``quant_grouped_matmul`` calls (``--two-calls``: the A/B)."""
    kw = dict(fmt=fmt, implementation=impl, byte_order=byte_order)
    h = quant_grouped_matmul(x, w_up, gs, activation="swiglu", **kw)
    return quant_grouped_matmul(h, w_down, gs, row_scale=rw, **kw)


def ffn_static(x, w_up, w_down, rw, *, fmt, sizes):
    """XLA per-expert matmuls over the active experts (``sizes``: rows of each, known statically).

    ``w_up`` / ``w_down`` are lists with one ``<linear>`` dict per active expert (separate
    buffers, so no slicing copies); non-bf16 formats are decoded by the jnp reference first
    (the naive path).
    """
    outs, start = [], 0
    for s, wu_leaves, wd_leaves in zip(sizes, w_up, w_down, strict=True):
        wu = reference.dequantize(wu_leaves, fmt)
        wd = reference.dequantize(wd_leaves, fmt)
        hx = jnp.dot(x[start:start + s], wu, preferred_element_type=jnp.float32)
        h = reference.apply_epilogue(hx, "swiglu", None).astype(x.dtype)
        y = jnp.dot(h, wd, preferred_element_type=jnp.float32)
        outs.append(reference.apply_epilogue(y, None, rw[start:start + s]).astype(x.dtype))
        start += s
    if start < x.shape[0]:
        outs.append(jnp.zeros((x.shape[0] - start, outs[-1].shape[-1]), x.dtype))
    return jnp.concatenate(outs)


def ffn_bytes(fmt: str, shape: shapes.MoeShape, active: int, rows: int) -> int:
    h, i = shape.hidden, shape.inter
    w = active * (shapes.packed_bytes(fmt, h, 2 * i) + shapes.packed_bytes(fmt, i, h))
    return w + 2 * rows * (h + 2 * i + h)  # x read, h written + read, y written


# ---------------------------------------------------------------------------------------------
# one benchmark row
# ---------------------------------------------------------------------------------------------


class Case:
    """Weights of one MoE shape in every timed format, generated on device once."""

    def __init__(self, shape: shapes.MoeShape, formats=("wint2", "wint4", "bf16")):
        self.shape = shape
        key = jax.random.key(0)
        self.w = {}
        for j, fmt in enumerate(formats):
            k1, k2 = jax.random.split(jax.random.fold_in(key, j))
            self.w[fmt] = (shapes.random_linear(k1, fmt, *shape.up_gate, shape.experts),
                           shapes.random_linear(k2, fmt, *shape.down, shape.experts))
        # The Mosaic GPU kernel's copy of the WINT2 experts (fragment byte order), if it runs here.
        self.frag = None
        if "wint2" in self.w and kernel_mosaic.available():
            self.frag = tuple(kernel_mosaic.to_fragments(w) for w in self.w["wint2"])
        jax.block_until_ready((self.w, self.frag))


def _instances_count(active_bytes: int, rows: int, hidden: int) -> int:
    r = -(-3 * L2_BYTES // max(active_bytes, 1))
    r = min(max(r, 2), 8)
    while r > 2 and r * rows * hidden * 2 * 3 > 4 * 2**30:  # keep activations under ~4 GiB
        r //= 2
    return r


def bench_row(case: Case, tokens: int, routing: str, ceil: dict, *, baselines: bool,
              two_calls: bool = False, gpu_time: bool = False) -> list[dict]:
    s = case.shape
    ids = shapes.route(tokens, s, routing, seed=tokens)
    gs = shapes.group_sizes(ids, s.experts)
    rows, active = tokens * s.top_k, int((gs > 0).sum())
    act_ids = np.nonzero(gs)[0]
    sizes = tuple(int(v) for v in gs[act_ids])
    r = _instances_count(ffn_bytes("wint2", s, active, rows), rows, s.hidden)
    shifts = [(7 * i) % s.experts for i in range(r)]
    key = jax.random.key(tokens)
    xs = [jax.random.normal(jax.random.fold_in(key, i), (rows, s.hidden), jnp.bfloat16)
          for i in range(r)]
    rw = jax.random.uniform(jax.random.fold_in(key, 99), (rows,), jnp.float32)
    flops = 2 * rows * s.weights_per_expert()
    out = []

    def record(impl, fmt, fn, insts, nbytes):
        sec = time_instances(fn, insts)
        extra = {"gpu_us": device_seconds(fn, insts) * 1e6} if gpu_time else {}
        row = dict(shape=s.name, routing=routing, tokens=tokens, rows=rows, active=active,
                   impl=impl, fmt=fmt, us=sec * 1e6, **extra, bytes=nbytes,
                   GBps=nbytes / sec / 1e9, pct_copy=100 * nbytes / sec / 1e9 / ceil["copy_GBps"],
                   TFLOPs=flops / sec / 1e12,
                   pct_mm=100 * flops / sec / 1e12 / ceil["bf16_matmul_TFLOPs"])
        out.append(row)
        print(json.dumps(row), flush=True)

    runs = [("pallas", fmt, case.w[fmt], "rows") for fmt in ("wint2", "wint4")]
    if case.frag is not None:
        runs.insert(0, ("pallas_mosaic", "wint2", case.frag, "fragments"))
    for impl, fmt, (w_up, w_down), order in runs:
        op = ffn_two_calls if two_calls and impl == "pallas_mosaic" else ffn_pallas
        fn = functools.partial(op, fmt=fmt, byte_order=order)
        insts = [(xs[i], w_up, w_down, jnp.asarray(np.roll(gs, shifts[i])), rw) for i in range(r)]
        y = jax.jit(fn)(*insts[0])
        if rows * s.experts * s.hidden * 2 > 16 * 2**30:
            # XLA's GPU ragged_dot materialises [rows, E, K]: no reference at this size.
            print(f"(no reference check at {rows} rows: ragged_dot would need "
                  f"{rows * s.experts * s.hidden * 2 / 2**30:.0f} GiB)", flush=True)
            record(impl, fmt, fn, insts, ffn_bytes(fmt, s, active, rows))
            continue
        ref = jax.jit(functools.partial(op, fmt=fmt, impl="xla", byte_order=order))(*insts[0])
        # Two chained bf16 roundings (h, then y): a one-ulp difference in h moves y, so the
        # FFN is held to rel-L2 and 97% elementwise; each op alone is checked tighter (checks).
        assert_close(y, ref, rel_l2=1e-2, min_frac_close=0.97,
                     context=f"{s.name} {impl} {fmt} ffn tokens={tokens} {routing}")
        record(impl, fmt, fn, insts, ffn_bytes(fmt, s, active, rows))

    if baselines:
        for impl, fmt in (("xla_bf16", "bf16"), ("xla_naive_decode", "wint2")):
            w_up, w_down = case.w[fmt]
            fn = functools.partial(ffn_static, fmt=fmt, sizes=sizes)
            nb = ffn_bytes(fmt, s, active, rows)
            ri = _instances_count(nb, rows, s.hidden) if active < s.experts else 1
            insts = []
            for i in range(max(1, min(ri, r))):
                sel = (act_ids + shifts[i]) % s.experts
                take = lambda t: [{k: v[e] for k, v in t.items()} for e in sel]  # noqa: E731
                insts.append((xs[i], take(w_up), take(w_down), rw))
            record(impl, fmt, fn, insts, nb)
            del insts
    return out


# ---------------------------------------------------------------------------------------------
# dense (non-expert) linears: attention, dense MLP, lm_head
# ---------------------------------------------------------------------------------------------


def dense_rows(ceil: dict, tokens_list, *, shape_names, linears=None, baselines: bool = True,
               gpu_time: bool = False) -> list[dict]:
    """Time the dense linears of each model (``shapes.DENSE``) in their checkpoint format.

    Per (linear, tokens): the Pallas kernel, the XLA reference (jnp decode then ``jnp.dot``, which
    XLA may fuse), and bf16 weights through XLA, each checked against the reference first.
    ``baselines=False``: the Pallas kernel only (still checked). ``gpu_time``: each row also gets
    ``gpu_us``, its GPU kernel time (:func:`device_seconds`).
    """
    from .api import quant_matmul

    out = []
    for name in shape_names:
        for lin in shapes.DENSE[name]:
            if linears and lin.name not in linears:
                continue
            key = jax.random.key(hash(lin.name) % 2**31)
            ws = {fmt: shapes.random_linear(jax.random.fold_in(key, i), fmt, lin.k, lin.n)
                  for i, fmt in enumerate(dict.fromkeys((lin.fmt, "bf16")))}
            for tokens in tokens_list:
                x = jax.random.normal(jax.random.fold_in(key, tokens), (tokens, lin.k),
                                      jnp.bfloat16)
                if lin.fmt == "bf16":
                    impls = [("xla", "bf16")]
                else:
                    impls = [("pallas", lin.fmt), *([("xla", lin.fmt), ("xla", "bf16")]
                                                    if baselines else [])]
                ref = None
                for impl, fmt in impls:
                    fn = functools.partial(quant_matmul, fmt=fmt, implementation=impl)
                    y = jax.jit(fn)(x, ws[fmt])
                    if fmt == lin.fmt:
                        if ref is None:
                            ref = jax.jit(functools.partial(quant_matmul, fmt=fmt,
                                                            implementation="xla"))(x, ws[fmt])
                        assert_close(y, ref, rel_l2=1e-2, min_frac_close=0.97,
                                     context=f"{name} {lin.name} {impl} tokens={tokens}")
                    nb = shapes.packed_bytes(fmt, lin.k, lin.n) + 2 * tokens * (lin.k + lin.n)
                    r = max(2, min(8, -(-3 * L2_BYTES // nb)))
                    xs = [(x + i, ws[fmt]) for i in range(r)]
                    sec = time_instances(fn, xs)
                    row = dict(kind="dense", shape=name, linear=lin.name, k=lin.k, n=lin.n,
                               tokens=tokens, impl=impl, fmt=fmt, us=sec * 1e6, bytes=nb,
                               GBps=nb / sec / 1e9,
                               pct_copy=100 * nb / sec / 1e9 / ceil["copy_GBps"],
                               TFLOPs=2 * tokens * lin.k * lin.n / sec / 1e12)
                    if gpu_time:
                        g = device_seconds(fn, xs)
                        row.update(gpu_us=g * 1e6, gpu_pct_copy=100 * nb / g / 1e9
                                   / ceil["copy_GBps"])
                    out.append(row)
                    print(json.dumps(row), flush=True)
    return out


def _dense_table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["linear"], r["tokens"]), {})[r["impl"] + ":" + r["fmt"]] = r
    lines = ["| shape | linear | tokens | impl:fmt | µs | GB/s | %copy BW | GPU µs | GPU %copy |",
             "|" + "---|" * 9]
    for (shape, lin, tokens), d in by.items():
        for k, r in d.items():
            gpu = (f"{r['gpu_us']:.1f} | {r['gpu_pct_copy']:.0f}%" if "gpu_us" in r else "- | -")
            lines.append(f"| {shape} | {lin} | {tokens} | {k} | {r['us']:.1f} | "
                         f"{r['GBps']:.0f} | {r['pct_copy']:.0f}% | {gpu} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------------


def _dense_candidates(rows: int):
    T = config_lib.TuningConfig  # noqa: N806
    if rows <= 16:  # few rows: also split K, so that narrow N still fills the GPU
        table = [(16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (16, 64, 256, 4, 4),
                 (16, 128, 128, 4, 4), (16, 32, 128, 4, 3, 4), (16, 32, 256, 4, 3, 2),
                 (16, 32, 256, 4, 3, 4), (16, 64, 128, 4, 3, 2), (16, 64, 128, 4, 3, 4),
                 (16, 64, 128, 4, 3, 8), (16, 64, 256, 4, 3, 4), (16, 128, 128, 4, 4, 4),
                 (16, 128, 128, 4, 3, 8)]
    elif rows <= 128:
        table = [(16, 64, 256, 4, 4), (32, 64, 128, 4, 3), (64, 64, 128, 4, 3),
                 (32, 128, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3)]
    else:
        table = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 128, 4, 3),
                 (64, 64, 128, 4, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3)]
    for bm, bn, bk, nw, ns, *split in table:
        yield T(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns,
                split_k=split[0] if split else 1)
    if rows <= 8:  # GEMV-style CUDA-core FMAs, K split 4-32 ways (results/NOTES.md §57)
        bm = config_lib.rows_bucket(rows)
        shapes_ = ([(bn, bk) for bn in (128, 256) for bk in (16, 32)] if bm <= 2 else
                   [(64, 16), (128, 16)])
        for (bn, bk), nw, split in itertools.product(shapes_, (4, 8), (
                (8, 16, 32) if bm <= 2 else (4, 8, 16))):
            yield T(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=1,
                    split_k=split, mode="fma")


def _sweep(op, args, candidates, key: config_lib.TunedKey, label: str, *,
           timer=time_instances) -> tuple[str, dict]:
    """Time ``op(*inst, config=cfg)`` over the instances ``args`` for each candidate (with
    ``timer``); the tuned-table entry of the fastest.

    A config the kernel refuses (NotImplementedError naming the constraint) or Triton fails to
    compile is reported and skipped.
    """
    results = []
    for cfg in candidates:
        fn = functools.partial(op, interpret=False, config=cfg)
        try:
            sec = timer(fn, args)
        except Exception as err:  # noqa: BLE001 - a config that fails to compile or is refused
            print(f"  skip {cfg}: {type(err).__name__}: {str(err)[:120]}")
            continue
        print(f"  {label}: {cfg} {sec * 1e6:.1f} us", flush=True)
        results.append((sec, cfg))
    results.sort(key=lambda v: v[0])
    best_sec, best = results[0]
    print(f"tune {label}: {best} {best_sec * 1e6:.1f} us ({len(results)} configs)", flush=True)
    return str(key), {"config": best.to_dict(), "us": best_sec * 1e6,
                      "runner_up_us": results[1][0] * 1e6 if len(results) > 1 else None}


def tune_dense(tokens_list, *, shape_names, linears=None, write=None) -> dict:
    """Sweep ``_dense_candidates`` for every quantized dense linear of ``shapes.DENSE``.

    As the model calls them: the instances are the layers of one stacked weight, each read in
    place (``layer=i``), enough of them to exceed ~3x the L2; timed by :func:`device_seconds`
    (a few-µs call timed by wall clock reads the host's dispatch, and picked configs by it).
    The weight is an argument of the timed program, not a constant it closes over: closed
    over, every candidate's compile embedded the whole stack (~10 s a candidate).
    ``linears``: only these names of ``shapes.DENSE``; ``write(table)``: called with each new
    entry as it is found (a run cut short keeps what it tuned).
    """
    from . import kernels

    table = {}
    for name in shape_names:
        for lin in shapes.DENSE[name]:
            if lin.fmt == "bf16" or (linears and lin.name not in linears):
                continue
            act = "swiglu" if lin.name.endswith("up_gate") else None
            n_out = lin.n // 2 if act else lin.n
            layers = max(2, min(16, -(-3 * L2_BYTES // shapes.packed_bytes(lin.fmt, lin.k,
                                                                            lin.n))))
            w = shapes.random_linear(jax.random.key(5), lin.fmt, lin.k, lin.n, layers)

            def op(x, w, layer, *, act=act, fmt=lin.fmt, **kw):
                return kernels.quant_matmul(x, w, fmt=fmt, activation=act, layer=layer, **kw)

            for tokens in tokens_list:
                x = jax.random.normal(jax.random.key(3), (tokens, lin.k), jnp.bfloat16)
                key = config_lib.TunedKey(lin.fmt, act or "none", 1, lin.k, n_out,
                                          config_lib.rows_bucket(tokens))
                insts = [(x + i, w, jnp.int32(i)) for i in range(layers)]
                k, entry = _sweep(op, insts, _dense_candidates(tokens), key,
                                  f"{name} {lin.name} tokens={tokens}", timer=device_seconds)
                table[k] = entry
                if write is not None:
                    write({k: entry})
            del w
    return table


def _write_tuned(table: dict, meta: dict, section: str = "configs") -> None:
    path = config_lib.TUNED_DIR / f"{config_lib.device_key()}.json"
    old = json.loads(path.read_text()) if path.exists() else {"configs": {}}
    old.setdefault(section, {}).update(table)
    old["meta" if section == "configs" else f"{section}_meta"] = meta  # the last sweep's run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    config_lib._tuned_table.cache_clear()


def _candidates(fmt: str, rows: int, experts: int):
    """Configs worth timing for ``rows`` activation rows over ``experts`` experts."""
    T = config_lib.TuningConfig  # noqa: N806
    gs = "mma_gs" if fmt == "wint2" else "mma"
    per = -(-rows // min(rows, experts))  # rows of an expert under uniform routing
    if per <= 16:
        # few warps per column block: every warp reloads the x fragment for its own MMAs
        table = [(16, 32, 256, 4, "mma"), (16, 32, 128, 4, gs), (16, 64, 128, 4, gs),
                 (16, 32, 128, 2, gs), (16, 32, 256, 2, gs), (16, 64, 128, 2, gs),
                 (16, 32, 128, 1, gs), (16, 64, 256, 4, gs), (16, 128, 128, 4, gs),
                 (16, 64, 256, 2, gs)]
        if per <= 2:
            table += [(per, 32, 256, 4, "fma"), (16, 64, 256, 4, gs, 2),
                      (16, 32, 128, 2, gs, 2), (16, 64, 128, 2, gs, 2)]
            # GEMV-style with a K split, as the dense linears' one-row entries (§57)
            bk = max(32, codecs.CODECS[fmt].min_block_k)
            table += [(per, bn, bk, 4, "fma", s) for bn in (64, 128) for s in (4, 8, 16)]
    elif per <= 64:
        table = [(16, 64, 128, 4, "mma"), (32, 64, 128, 4, "mma"), (32, 32, 256, 4, "mma"),
                 (32, 64, 128, 4, gs), (16, 64, 128, 4, gs), (64, 64, 128, 4, "mma")]
    else:
        table = [(64, 64, 128, 4, "mma"), (64, 64, 128, 4, gs), (128, 64, 128, 8, "mma"),
                 (128, 64, 128, 8, gs), (64, 128, 128, 8, "mma"), (128, 128, 128, 8, gs)]
    seen = set()
    for bm, bn, bk, nw, mode, *split in table:
        if (bm, bn, bk, nw, mode, *split) not in seen:
            seen.add((bm, bn, bk, nw, mode, *split))
            yield T(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, mode=mode,
                    split_k=split[0] if split else 1)


TUNE_ROUTINGS = ("uniform", "skewed")


def _tune_problems(case: Case, tokens_list, fmt: str, weights):
    """``(label, activation, key, instances, group sizes)`` of each grouped projection and token
    count to sweep. 4 calls per timing: 2 of the uniform routing and 2 of the skewed one, each
    with expert labels rotated as in ``bench_row`` (small experts do not stay in L2 from one
    call to the next). Both routings, because a config tuned on uniform routing alone can lose
    where routing spreads: an 8-row tile that won the 21B's 512-row uniform tune by 1 % cost its
    decode at batch 64 6 % end to end (results/NOTES.md §40). The group sizes returned (for
    the candidate tile heights) are the uniform routing's. ``weights``: the (up_gate, down)
    linears in the layout the swept kernel reads."""
    s = case.shape
    for proj, act in (("up_gate", "swiglu"), ("down", None)):
        w = weights[0 if proj == "up_gate" else 1]
        k, n = s.up_gate if proj == "up_gate" else s.down
        for tokens in tokens_list:
            gss = [shapes.group_sizes(shapes.route(tokens, s, r, seed=tokens), s.experts)
                   for r in TUNE_ROUTINGS]
            rows = tokens * s.top_k
            x = jax.random.normal(jax.random.key(3), (rows, k), jnp.bfloat16)
            key = config_lib.TunedKey(fmt, act or "none", s.experts, k, n // 2 if act else n,
                                      config_lib.rows_bucket(rows))
            insts = [(x, w, jnp.asarray(np.roll(gs, 7 * i))) for gs in gss for i in range(2)]
            yield f"{proj} tokens={tokens}", act, key, insts, np.asarray(gss[0])


def tune(case: Case, tokens_list, fmts=("wint2", "wint4")) -> dict:
    from . import kernels

    table = {}
    for fmt in fmts:
        for label, act, key, insts, _ in _tune_problems(case, tokens_list, fmt, case.w[fmt]):
            op = functools.partial(kernels.quant_grouped_matmul, fmt=fmt, activation=act)
            cands = _candidates(fmt, insts[0][0].shape[0], case.shape.experts)
            name, entry = _sweep(op, insts, cands, key, f"{fmt} {label}")
            table[name] = entry
    return table


def _mosaic_candidates(rows: int, experts: int, ksteps: int, activation=None, *,
                       stages=(2,), max_rows: int | None = None):
    """Mosaic configs worth timing: the heuristic's tile height, half and double it (8..64),
    and, given ``max_rows`` (the most rows of one expert in the routing tuned on), the heights
    that cut every expert into 1, 2 or 3 tiles (multiples of 8 up to 96 under SwiGLU, else 128:
    80 at 151 rows, the 300B at 1024 tokens, where 64 costs some experts a third tile); each
    with the schedules ``"all"`` and ``"one"`` (``"half"`` never beat ``"one"`` in the
    session-4 sweeps, results/NOTES.md §21; each candidate costs a ~1 s compile); at 8-row
    tiles also K split in 2 and 4 (more programs when few experts are active), from 32 rows
    also 2 column blocks a program (half the x traffic from L2), 4 for the plain projection
    (one accumulator a block: SwiGLU's 8 would not fit the registers); up to 16-row tiles
    each also with per-warp ``mma.sync`` instead of wgmma (it lost from 16 rows an expert in
    the session-7 A/B, by 45 % at 48-row tiles: results/NOTES.md §37), on bf16 and on fp16
    planes (§43), each with one and (where the K steps divide) two K steps a pipeline step
    (wgmma tiles: one; two lost 20-90 % at 24-80 rows, §50)."""
    bm0 = kernel_mosaic.block_m_for(rows, experts)
    heights = {b for b in (bm0 // 2, bm0, 2 * bm0) if 8 <= b <= 64}
    if max_rows:  # ceil(max_rows / k) rounded up to a multiple of 8
        cap = 96 if activation == "swiglu" else 128  # two accumulators or one
        heights |= {h for k in (1, 2, 3) if (h := -(-max_rows // (8 * k)) * 8) <= cap}
    for bm in sorted(heights):
        splits = [s for s in (1, 2, 4) if ksteps % s == 0] if bm == 8 else [1]
        col_blocks = ((1, 2) if activation == "swiglu" else (1, 2, 4)) if bm >= 32 else (1,)
        mmas = [("wgmma", "bf16")]
        if bm <= 16:
            mmas += [("sync", planes) for planes in config_lib.MOSAIC_PLANES]
        for sched, st, split, cb, (mma, planes) in itertools.product(
                ("all", "one"), stages, splits, col_blocks, mmas):
            unrolls = (1, 2) if mma == "sync" and (ksteps // split) % 2 == 0 else (1,)
            for unroll in unrolls:
                yield config_lib.MosaicConfig(block_m=bm, stages=st, schedule=sched,
                                              split_k=split, col_blocks=cb, mma=mma,
                                              planes=planes, k_unroll=unroll)


def tail_variants(cfg: config_lib.MosaicConfig) -> list[config_lib.MosaicConfig]:
    """``cfg`` with shorter heights for an expert's last tile (``MosaicConfig.tails``): every
    multiple of 16 below its height, or half of it (rounded up to 8). wgmma tiles of 24+ rows
    only. At 256 and 1024 tokens on the 300B they cut 1-8 % a projection (H100 sweeps,
    results/NOTES.md §69); every multiple of 8 never won."""
    if cfg.mma != "wgmma" or cfg.block_m < 24:
        return []
    sets = dict.fromkeys((config_lib.every_16_below(cfg.block_m), (-(-cfg.block_m // 16) * 8,)))
    return [dataclasses.replace(cfg, tails=s) for s in sets if s != cfg.tails]


def tune_mosaic(case: Case, tokens_list, *, stages=(2,), tails_only: bool = False) -> dict:
    """Sweep ``_mosaic_candidates`` for both projections of ``case`` (fragment byte order),
    then the winner's :func:`tail_variants` against it. ``tails_only``: the second stage
    alone, from the device's current entries (problems without a tuned entry are left
    alone)."""
    table = {}
    for label, act, key, insts, gs in _tune_problems(case, tokens_list, "wint2", case.frag):
        op = functools.partial(_mosaic_op, activation=act)
        if tails_only:
            if (best := config_lib.tuned_mosaic_entry(key)) is None:
                continue
        else:
            cands = _mosaic_candidates(insts[0][0].shape[0], case.shape.experts,
                                       key.k // kernel_mosaic.BLOCK_K, act, stages=stages,
                                       max_rows=int(gs.max()))
            name, entry = _sweep(op, insts, cands, key, f"mosaic {label}")
            table[name] = entry
            best = config_lib.MosaicConfig(**entry["config"])
        if variants := tail_variants(best):
            name, entry = _sweep(op, insts, [best, *variants], key, f"mosaic {label} tails")
            table[name] = entry
    return table


def _mosaic_op(x, w, gs, *, activation, config, interpret=False):
    del interpret  # the Mosaic kernel has no interpreter (``_sweep``'s common argument)
    return kernel_mosaic.grouped_matmul_fragments(x, w, gs, activation=activation,
                                                  config=config)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["routing"], r["tokens"]), {})[r["impl"] + ":" + r["fmt"]] = r
    lines = ["| shape | routing | tokens | WINT2 kernel | WINT2 µs | %copy BW | "
             "TFLOP/s (%bf16 mm) | x vs bf16 XLA | x vs naive | x vs WINT4 | x vs Triton WINT2 |",
             "|" + "---|" * 11]
    for (shape, routing, tokens), d in by.items():
        best = "pallas_mosaic:wint2" if "pallas_mosaic:wint2" in d else "pallas:wint2"
        w2 = d[best]
        ratio = lambda k: f"{d[k]['us'] / w2['us']:.2f}" if k in d else "-"  # noqa: E731
        lines.append(f"| {shape} | {routing} | {tokens} | {best.split(':')[0]} | {w2['us']:.1f} | "
                     f"{w2['pct_copy']:.0f}% | {w2['TFLOPs']:.1f} ({w2['pct_mm']:.0f}%) | "
                     f"{ratio('xla_bf16:bf16')} | {ratio('xla_naive_decode:wint2')} | "
                     f"{ratio('pallas:wint4')} | {ratio('pallas:wint2')} |")
        if "gpu_us" in w2:  # --gpu-time: the same ratios by GPU kernel time
            gpu = lambda k: f"{d[k]['gpu_us'] / w2['gpu_us']:.2f}" if k in d else "-"  # noqa: E731
            lines.append(f"| | | | GPU kernel time | {w2['gpu_us']:.1f} | | | "
                         f"{gpu('xla_bf16:bf16')} | {gpu('xla_naive_decode:wint2')} | "
                         f"{gpu('pallas:wint4')} | {gpu('pallas:wint2')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="ernie45_300b,ernie45_21b")
    p.add_argument("--tokens", default=",".join(map(str, shapes.TOKENS)))
    p.add_argument("--routings", default=",".join(shapes.ROUTINGS))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--two-calls", action="store_true",
                   help="time the Mosaic FFN as two grouped calls instead of the model's op "
                        "(quant_expert_ffn)")
    p.add_argument("--gpu-time", action="store_true",
                   help="also time each row (FFN or --dense) by its GPU kernel time "
                        "(device_seconds: a profiler trace), for rows of a few tens of µs where "
                        "wall time is noisy")
    p.add_argument("--tune", action="store_true", help="sweep configs, write tuned/<device>.json")
    p.add_argument("--fmts", default="wint2,wint4", help="formats to tune")
    p.add_argument("--tune-mosaic", action="store_true",
                   help="sweep the Mosaic WINT2 kernel's configs, write tuned/<device>.json")
    p.add_argument("--stages", default="2", help="pipeline stages --tune-mosaic sweeps")
    p.add_argument("--tails-only", action="store_true",
                   help="--tune-mosaic: only sweep the current entries' tail heights")
    p.add_argument("--dense", action="store_true",
                   help="time the dense (attention / dense MLP / lm_head) linears instead")
    p.add_argument("--linears", default=None,
                   help="--dense: only these linears (names in shapes.DENSE, comma-separated)")
    p.add_argument("--wint2-decode", choices=("ptx", "jnp"), default="ptx",
                   help="in-kernel WINT2 decode of mode mma_gs (A/B timing; ptx is the default)")
    p.add_argument("--int-decode", choices=("ptx", "jnp"), default="ptx",
                   help="WINT8 bytes -> fp32 in the GEMV-style 'fma' kernel (A/B timing; ptx "
                        "is the default)")
    add_code_step_args(p)
    p.add_argument("--out", default=None, help="JSON lines file")
    a = p.parse_args(argv)
    use_code_step_args(a)
    codecs.WINT2_PTX_DECODE = a.wint2_decode == "ptx"
    codecs.INT_PTX_DECODE = a.int_decode == "ptx"
    tokens = [int(t) for t in a.tokens.split(",")]
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
                wint2_decode=a.wint2_decode, int_decode=a.int_decode,
                code_step=a.code_step, dyadic_codes=a.dyadic_codes,
                command="python -m pallas_kernels.bench " + " ".join(argv or sys.argv[1:]))
    ceil = ceilings()
    meta.update(ceil)
    print(json.dumps(meta), flush=True)
    if not a.skip_checks:
        checks.run_all(interpret=jax.default_backend() != "gpu")
    if a.dense and a.tune:
        tune_dense(tokens, shape_names=a.shapes.split(","),
                   linears=a.linears.split(",") if a.linears else None,
                   write=functools.partial(_write_tuned, meta=meta))
        return 0
    if a.dense:
        rows = dense_rows(ceil, tokens, shape_names=a.shapes.split(","),
                          linears=a.linears.split(",") if a.linears else None,
                          baselines=not a.no_baselines, gpu_time=a.gpu_time)
        if a.out:
            with open(a.out, "a") as f:
                f.write("".join(json.dumps({**meta, **r}) + "\n" for r in rows))
        print(_dense_table(rows))
        return 0
    results = []
    out = open(a.out, "w") if a.out else None  # noqa: SIM115 (rows land as they are measured)
    if out:
        out.write(json.dumps({"meta": meta}) + "\n")
    for name in a.shapes.split(","):
        case = Case(shapes.SHAPES[name])
        if a.tune:
            _write_tuned(tune(case, tokens, tuple(a.fmts.split(","))), meta)
            continue
        if a.tune_mosaic:
            if case.frag is None:
                raise SystemExit("--tune-mosaic needs a Hopper GPU (the Mosaic WINT2 kernel)")
            stages = tuple(int(v) for v in a.stages.split(","))
            _write_tuned(tune_mosaic(case, tokens, stages=stages, tails_only=a.tails_only),
                         meta, "mosaic")
            continue
        for t in tokens:
            for routing in a.routings.split(","):
                rows = bench_row(case, t, routing, ceil, baselines=not a.no_baselines,
                                 two_calls=a.two_calls, gpu_time=a.gpu_time)
                results += rows
                if out:  # a run cut short keeps what it measured
                    out.write("".join(json.dumps(r) + "\n" for r in rows))
                    out.flush()
        del case
    if out:
        out.close()
    if results:
        print(f"\n{meta['device']}, jax {meta['jax']}, {meta['date']}: copy "
              f"{ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
        print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
