"""``python -m jaxwint2.profile``: where the time of one decode step goes, phase by phase.

Builds the synthetic full-size model of :mod:`jaxwint2.bench` (optionally only its first
``--layers`` layers: the layer mix keeps its first runs, so every layer kind is present while the
weights fit a smaller GPU), runs greedy decode steps exactly as the bench does (``model.step_jit``
then ``bench.feed_back``, tokens fed back on device) and captures a ``jax.profiler`` trace.

Every GPU kernel of the trace is attributed to a phase through the compiled HLO: the kernel's
``hlo_op`` names an instruction, whose ``op_name`` metadata carries the named scopes the model puts
on its parts (``attention``; ``moe/{router,dispatch,experts,combine,shared_experts}``;
``dense_mlp``; ``embed``; ``lm_head``), and whose enclosing ``while`` loop (one per
:func:`~jaxwint2.decoder.layer_groups` run) names the layer group. Kernels of the feed-back jit are
``sampling``. Reported per step: wall time, device-busy time (union of kernel intervals), host
overhead (their difference), time per phase and per layer group, per-layer times extrapolated to
the full layer count, and the top kernels. JSON out (``--json``), a table on stdout.

Example:
  python -m jaxwint2.profile --model 300b --layers 12 --batches 1,64 --json prof.jsonl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .decoder import layer_groups

PHASES = ("attention", "router", "dispatch", "experts", "combine", "shared_experts",
          "dense_mlp", "embed", "lm_head")

_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS_RE = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?([^}\s,]+"
                       r"(?:,\s*%?[\w.\-]+)*)\}?")
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')
_CONTAINERS = ("while", "conditional", "call")  # host-side control flow, not kernels (CPU)


@dataclasses.dataclass
class HloIndex:
    """Instruction name -> (op_name, layer-group index or None), from compiled HLO text."""

    op_name: dict[str, str]
    group: dict[str, int | None]


def index_hlo(text: str) -> HloIndex:
    """Parse optimized HLO text: each instruction's ``op_name`` and the top-level ``while``
    (in ENTRY order, i.e. layer-group order) whose body it runs in, if any."""
    comp_of: dict[str, str] = {}
    op_name: dict[str, str] = {}
    calls: dict[str, list[str]] = collections.defaultdict(list)
    entry = None
    entry_whiles: list[str] = []  # body computations of ENTRY's while loops, in order
    comp = None
    for line in text.splitlines():
        m = _COMP_RE.match(line)
        if m:
            comp = m.group(1)
            if line.lstrip().startswith("ENTRY"):
                entry = comp
            continue
        m = _INSTR_RE.match(line)
        if not m or comp is None:
            continue
        name, rest = m.groups()
        comp_of[name] = comp
        om = _OPNAME_RE.search(rest)
        if om:
            op_name[name] = om.group(1)
        for cm in _CALLS_RE.finditer(rest):
            callees = [c.strip().lstrip("%") for c in cm.group(1).split(",")]
            calls[comp].extend(callees)
        if comp == entry and re.search(r"\swhile\(", rest):
            bm = re.search(r"body=%?([\w.\-]+)", rest)
            if bm:
                entry_whiles.append(bm.group(1))
    # Every computation reachable from a top-level while body belongs to that layer group.
    group_of_comp: dict[str, int] = {}
    for gi, body in enumerate(entry_whiles):
        stack = [body]
        while stack:
            c = stack.pop()
            if c in group_of_comp:
                continue
            group_of_comp[c] = gi
            stack.extend(calls.get(c, ()))
    group = {name: group_of_comp.get(c) for name, c in comp_of.items()}
    return HloIndex(op_name, group)


def phase_of(op_name: str) -> str:
    parts = op_name.split("/")
    for p in PHASES:
        if p in parts:
            return p
    return "moe_other" if "moe" in parts else "other"


@dataclasses.dataclass
class Kernel:
    name: str
    hlo_op: str
    module: str
    start_ns: float
    dur_ns: float


def device_kernels(trace_dir: str) -> list[Kernel]:
    """Device kernel events (``hlo_op`` set) of the newest ``*.xplane.pb`` under ``trace_dir``
    (on a CPU backend, its host thunks: :func:`pallas_kernels.profiling.trace_events`)."""
    from pallas_kernels.profiling import trace_events

    out: list[Kernel] = []
    for ev in trace_events(trace_dir, host_fallback=True):
        stats = dict(ev.stats)
        if "hlo_op" not in stats or str(stats["hlo_op"]).startswith(_CONTAINERS):
            continue
        out.append(Kernel(ev.name, str(stats["hlo_op"]), str(stats.get("hlo_module", "")),
                          float(ev.start_ns), float(ev.duration_ns)))
    return out


def busy_ns(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' [start, end) intervals."""
    total, end = 0.0, -np.inf
    for k in sorted(kernels, key=lambda k: k.start_ns):
        lo, hi = k.start_ns, k.start_ns + k.dur_ns
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def summarise(kernels: list[Kernel], index: HloIndex, *, steps: int,
              step_module: str) -> dict[str, Any]:
    phase_ms: dict[str, float] = collections.defaultdict(float)
    group_ms: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for k in kernels:
        if step_module in k.module:
            phase = phase_of(index.op_name.get(k.hlo_op, ""))
            g = index.group.get(k.hlo_op)
        else:
            phase, g = "sampling", None
        ms = k.dur_ns / 1e6 / steps
        phase_ms[phase] += ms
        group_ms["outside layers" if g is None else f"group {g}"] += ms
        by_kernel[(phase, k.name[:80])].append(ms)
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:20]
    return {
        "device_busy_ms": busy_ns(kernels) / 1e6 / steps,
        "kernel_sum_ms": sum(k.dur_ns for k in kernels) / 1e6 / steps,
        "phase_ms": dict(sorted(phase_ms.items(), key=lambda kv: -kv[1])),
        "group_ms": dict(group_ms),
        "top_kernels": [{"phase": p, "kernel": n, "ms_per_step": sum(v),
                         "launches_per_step": len(v) / steps} for (p, n), v in top],
    }


def extrapolate(summary: dict[str, Any], groups: list[range],
                full_groups: list[range]) -> dict[str, float]:
    """Per-layer time of each group x that group's full-model layer count (+ outside layers)."""
    est = {"outside layers": summary["group_ms"].get("outside layers", 0.0)}
    for gi, (g, fg) in enumerate(zip(groups, full_groups, strict=False)):
        per_layer = summary["group_ms"].get(f"group {gi}", 0.0) / len(g)
        est[f"layers {fg.start}-{fg.stop - 1} ({len(fg)} x {per_layer:.3f} ms)"] = \
            per_layer * len(fg)
    est["total"] = sum(est.values())
    return est


def _dump(dump_dir: str, tag: str, hlo: str, kernels: list[Kernel]) -> None:
    """The compiled HLO and per-``hlo_op`` kernel totals, for attributing by hand."""
    import pathlib

    d = pathlib.Path(dump_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{tag}.hlo.txt").write_text(hlo)
    per_op: dict[str, list] = {}
    for k in kernels:
        entry = per_op.setdefault(k.hlo_op, [k.name, k.module, 0, 0.0])
        entry[2] += 1
        entry[3] += k.dur_ns / 1e6
    (d / f"{tag}.ops.json").write_text(json.dumps(per_op, indent=0))


def profile(cfg, *, layers: int | None, kernels: str, batches: tuple[int, ...], context: int,
            block_size: int, steps: int, seed: int = 0,
            dump_dir: str | None = None) -> list[dict[str, Any]]:
    from . import bench
    from .model import ErnieForCausalLM, _step_jit

    full_cfg = cfg
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    params = jax.block_until_ready(bench.synthetic_params(cfg, seed))
    model = ErnieForCausalLM(cfg, params, kernels=kernels, dtype="bfloat16", donate_stacks=True)
    del params
    graphdef, state = nnx.split(model)
    step = _step_jit(graphdef)
    blocks_per_seq = -(-(context + 2 * steps + 8) // block_size)
    cache = model.init_cache(max(batches) * blocks_per_seq + 1, block_size)
    results = []
    for b in batches:
        tables = jnp.arange(b * blocks_per_seq, dtype=jnp.int32).reshape(b, blocks_per_seq)
        tok = jnp.ones((b, 1), jnp.int32)
        pos = jnp.full((b, 1), context, jnp.int32)
        at = jnp.zeros((b,), jnp.int32)
        # Compiled once: the executable both runs the steps and gives the HLO to attribute.
        compiled = step.lower(state, tok, pos, tables, cache, at).compile()
        hlo = compiled.as_text()
        index = index_hlo(hlo)
        module = re.search(r"HloModule\s+([\w.\-]+)", hlo).group(1)

        def run(n, tok, pos, cache, tables=tables, at=at, compiled=compiled):
            def step_fn(tok, pos, tables, cache, logits_at):
                return compiled(state, tok, pos, tables, cache, logits_at)

            tok, pos, cache = bench.decode_steps_on_device(step_fn, tok, pos, tables, cache,
                                                           at, n)
            jax.block_until_ready(tok)
            return tok, pos, cache

        tok, pos, cache = run(2, tok, pos, cache)  # warm up (compiles feed_back)
        t0 = time.perf_counter()
        tok, pos, cache = run(steps, tok, pos, cache)
        wall_ms = (time.perf_counter() - t0) / steps * 1e3
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            tok, pos, cache = run(steps, tok, pos, cache)
            jax.profiler.stop_trace()
            kern = device_kernels(d)
        if dump_dir:
            _dump(dump_dir, f"{cfg.num_hidden_layers}l_b{b}", hlo, kern)
        summary = summarise(kern, index, steps=steps, step_module=module.removeprefix("jit_"))
        row = {"batch": b, "context": context, "layers": cfg.num_hidden_layers,
               "wall_ms_per_step": wall_ms,
               "host_overhead_ms": wall_ms - summary["device_busy_ms"], **summary}
        if layers is not None:
            row["full_model_estimate_ms"] = extrapolate(summary, layer_groups(cfg),
                                                        layer_groups(full_cfg))
        results.append(row)
    return results


def main(argv=None) -> None:
    import os

    # XLA:GPU runs a scan body's kernels as one command buffer (CUDA graph), whose trace
    # events all carry the command buffer's name: turn them off so each kernel names its op.
    # Wall times then include per-kernel launches (jaxwint2.bench measures the default; its
    # --profile gives the default's GPU kernel time: the 21B's batch-1 step is GPU-bound with
    # command buffers and takes twice as long without, pallas_kernels/results/NOTES.md §54).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=")
    from .bench import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="300b")
    ap.add_argument("--layers", type=int, default=None,
                    help="build only the first N layers (per-layer times are extrapolated)")
    ap.add_argument("--kernels", default="auto", choices=("auto", "pallas", "reference"))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None, help="append JSON lines here")
    ap.add_argument("--dump", default=None, help="write the HLO and per-op kernel totals here")
    args = ap.parse_args(argv)

    cfg = PRESETS[args.model]()
    rows = profile(cfg, layers=args.layers, kernels=args.kernels,
                   batches=tuple(int(v) for v in args.batches.split(",")),
                   context=args.context, block_size=args.block_size, steps=args.steps,
                   dump_dir=args.dump)
    meta = {"model": args.model, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "kernels": args.kernels}
    lines = [json.dumps({**meta, **r}) for r in rows]
    if args.json:
        with open(args.json, "a") as f:
            f.write("".join(line + "\n" for line in lines))
    for r in rows:
        print(f"\n== {meta['model']} B={r['batch']} ctx={r['context']} layers={r['layers']} "
              f"on {meta['device']} (jax {meta['jax']}, kernels={meta['kernels']})")
        print(f"wall {r['wall_ms_per_step']:.2f} ms/step, device busy "
              f"{r['device_busy_ms']:.2f}, host overhead {r['host_overhead_ms']:.2f}")
        for name, ms in r["phase_ms"].items():
            print(f"  {name:16s} {ms:9.3f} ms")
        for name, ms in r["group_ms"].items():
            print(f"  [{name}] {ms:.3f} ms")
        for name, ms in r.get("full_model_estimate_ms", {}).items():
            print(f"  full model: {name:40s} {ms:9.3f} ms")
        for k in r["top_kernels"][:12]:
            print(f"    {k['ms_per_step']:8.3f} ms  x{k['launches_per_step']:<5.0f} "
                  f"{k['phase']:14s} {k['kernel']}")


if __name__ == "__main__":
    main()
