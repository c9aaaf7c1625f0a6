"""GPU kernel time of a piece of work, read from a ``jax.profiler`` trace (no Nsight needed).

Wall-clock timing of a call of a few µs times the host's dispatch, and a jitted decode step's
wall time alone cannot say whether the GPU or the host bounds it. A trace's device planes hold
every kernel the GPU ran with its duration: summed, that is the GPU's busy time.
"""

from __future__ import annotations

import collections
import pathlib
import tempfile
from collections.abc import Callable, Iterator

import jax


def trace_events(trace_dir: str, *, host_fallback: bool = False) -> Iterator:
    """The kernel events (``ProfileEvent``) of the newest ``*.xplane.pb`` under ``trace_dir``:
    those of the device planes' stream lines (every line of a plane that has none; derived
    lines such as "XLA Ops" would count kernels twice). ``host_fallback``: where the trace has
    no device plane (a CPU backend), the host CPU planes' lines, whose thunk events carry the
    same stats."""
    paths = sorted(str(p) for p in pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not paths:
        return
    data = jax.profiler.ProfileData.from_file(paths[-1])
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    if not planes and host_fallback:
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    for plane in planes:
        lines = list(plane.lines)
        for line in [ln for ln in lines if ln.name.startswith("Stream")] or lines:
            yield from line.events


def gpu_kernel_ns(work: Callable[[], object]) -> dict[str, int]:
    """Run ``work()`` (blocking on its result) under a trace; nanoseconds of GPU kernel time by
    kernel name (memcpys left out). Empty where the trace holds no device plane (a CPU)."""
    totals: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(work())
        for ev in trace_events(d):
            if "Memcpy" not in ev.name:
                totals[ev.name] += ev.duration_ns
    return dict(totals)
