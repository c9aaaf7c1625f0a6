"""Tuning configs of the grouped weight-only matmul kernel: the type, a heuristic, tuned tables.

This module owns the choice of block sizes / warps / pipeline stages for one call. It knows the
kernel's shape constraints (powers of two, divisibility) but not how the kernel uses the blocks.
Lookup order: an explicit ``config=``, then the tuned table of the current device
(``tuned/<device_key>.json``, written only by ``bench.py --tune``), then :func:`heuristic_config`.

A tuned-table key is ``fmt|activation|groups|K|N|rows-bucket``; rows are the activation rows the
kernel sees (tokens x top-k for a MoE layer) rounded up to a power of two.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import NamedTuple

import jax

TUNED_DIR = pathlib.Path(__file__).parent / "tuned"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """Block sizes of one kernel launch (all powers of two).

    Attributes:
      block_m: activation rows per tile (>= 16, the MMA's minimum).
      block_n: output columns per program (per half with swiglu).
      block_k: K rows per pipelined step (WINT2: a multiple of 128, two scale groups a byte).
      num_warps: warps per program.
      num_stages: software-pipelining depth of the K loop.
      mode: ``"mma"`` (one tensor-core dot per decoded plane, x columns plane-permuted),
        ``"mma_merged"`` (planes interleaved back to natural K order, one dot per K block) or
        ``"mma_gs"`` (WINT2 only: per 64-row group, dots of the raw integers, the group scale
        applied to the fp32 partial product) or ``"fma"`` (GEMV-style CUDA-core FMAs for tiles
        of at most 8 rows).
      split_k: programs sharing one output tile's K range (each a contiguous ``K / split_k``);
        their fp32 partial sums are added, and the epilogue applied, outside the kernel. More
        programs stream weights at once when the grid is small (few rows, narrow N).
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "mma"
    split_k: int = 1

    def __post_init__(self):
        for f in ("block_m", "block_n", "block_k", "num_warps", "split_k"):
            v = getattr(self, f)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"{f}={v} must be a positive power of two")
        if self.mode not in ("mma", "mma_merged", "mma_gs", "fma"):
            raise ValueError(f"mode={self.mode!r} must be 'mma', 'mma_merged', 'mma_gs' or "
                             "'fma'")
        if self.mode == "fma" and self.block_m > 8:
            raise ValueError(f"mode='fma' takes block_m <= 8, got {self.block_m}")
        if self.mode != "fma" and self.block_m < 16:
            raise ValueError(f"tensor-core modes need block_m >= 16, got {self.block_m}")
        if self.split_k > 1 and self.mode == "fma":
            raise ValueError("split_k > 1 takes a tensor-core mode, not mode='fma'")
        if self.block_n < 16:
            raise ValueError(f"block_n={self.block_n} must be >= 16")

    def to_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


class TunedKey(NamedTuple):
    fmt: str
    activation: str
    groups: int
    k: int
    n: int
    rows: int

    def __str__(self) -> str:
        return "|".join(str(v) for v in self)


def rows_bucket(m: int) -> int:
    return max(1, 1 << (max(m, 1) - 1).bit_length())


def device_key() -> str:
    """``nvidia_h100_80gb_hbm3``-style name of the default device (``cpu`` without a GPU)."""
    d = jax.devices()[0]
    if d.platform != "gpu":
        return d.platform
    return "".join(c if c.isalnum() else "_" for c in d.device_kind.lower()).strip("_")


# A device without its own table borrows the table of a same-architecture device (same SM count,
# shared memory and registers; only the memory bandwidth differs): the H200 uses the H100's.
FALLBACK_TABLES = {"nvidia_h200": "nvidia_h100_80gb_hbm3"}


@functools.cache
def _tuned_table(device: str) -> dict[str, TuningConfig]:
    path = TUNED_DIR / f"{device}.json"
    if not path.exists() and device in FALLBACK_TABLES:
        path = TUNED_DIR / f"{FALLBACK_TABLES[device]}.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {key: TuningConfig(**entry["config"]) for key, entry in raw.get("configs", {}).items()}


def heuristic_config(fmt: str, m: int, k: int, n_out: int, *, activation: str | None = None,
                     num_groups: int = 1) -> TuningConfig:
    """A reasonable config when no tuned entry exists (from H100 sweeps, see ``bench.py``).

    Few rows per expert: one 16-row tile per active expert, narrow column blocks (many
    programs stream weights in parallel) and a K block that keeps the decoded planes within
    ~128 registers per thread (occupancy is register-limited). Many rows per expert: 64-row
    tiles raise the MMA's arithmetic intensity.
    """
    per_group = max(1, m // max(1, min(num_groups, m)))
    if per_group <= 16:
        bm, bn, bk, nw = 16, 32, 256, 4
    elif per_group <= 64:
        bm, bn, bk, nw = 32, 64, 128, 4
    else:
        bm, bn, bk, nw = 64, 64, 128, 4
    if fmt in ("bf16", "wint8"):
        bk = 128
        bn = 64 if bm == 16 else bn
    bk = max(min(bk, _largest_pow2_divisor(k)), 16)
    bn = max(min(bn, _largest_pow2_divisor(n_out)), 16)
    return TuningConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=3)


def _largest_pow2_divisor(v: int) -> int:
    return v & -v if v > 0 else 1


def get_config(fmt: str, m: int, k: int, n_out: int, *, activation: str | None = None,
               num_groups: int = 1) -> TuningConfig:
    """The tuned config of the nearest tuned row bucket (within 4x; ties: the larger), else
    the heuristic."""
    want = TunedKey(fmt, activation or "none", num_groups, k, n_out, rows_bucket(m))
    best, best_dist = None, 3
    for key, cfg in _tuned_table(device_key()).items():
        *head, rows = key.split("|")
        if head == [str(v) for v in want[:-1]]:
            dist = abs(int(rows).bit_length() - want.rows.bit_length())
            if dist < best_dist or (dist == best_dist and int(rows) > want.rows):
                best, best_dist = cfg, dist
    if best is not None:
        return best
    return heuristic_config(fmt, m, k, n_out, activation=activation, num_groups=num_groups)
