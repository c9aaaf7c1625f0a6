"""GPU kernel time of a piece of work, read from a ``jax.profiler`` trace (no Nsight needed).

Wall-clock timing of a call of a few µs times the host's dispatch, and a jitted decode step's
wall time alone cannot say whether the GPU or the host bounds it. A trace's device planes hold
every kernel the GPU ran with its duration: summed, that is the GPU's busy time.
"""

from __future__ import annotations

import collections
import pathlib
import tempfile
from collections.abc import Callable

import jax


def gpu_kernel_ns(work: Callable[[], object]) -> dict[str, int]:
    """Run ``work()`` (blocking on its result) under a trace; nanoseconds of GPU kernel time by
    kernel name (memcpys left out). Empty where the trace holds no GPU stream (a CPU)."""
    totals: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(work())
        for path in pathlib.Path(d).rglob("*.xplane.pb"):
            data = jax.profiler.ProfileData.from_file(str(path))
            for plane in data.planes:
                if not plane.name.startswith("/device:GPU"):
                    continue
                for line in plane.lines:
                    if "Stream" not in line.name:
                        continue
                    for ev in line.events:
                        if "Memcpy" not in ev.name:
                            totals[ev.name] += ev.duration_ns
    return dict(totals)
