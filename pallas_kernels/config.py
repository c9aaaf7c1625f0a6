"""Tuning configs of the weight-only matmul kernels: the types, a heuristic, tuned tables.

This module owns the choice of block sizes / warps / pipeline stages for one call. It knows the
kernels' shape constraints (powers of two, divisibility) but not how they use the blocks.
Lookup order: an explicit ``config=``, then the tuned table of the current device
(``tuned/<device_key>.json``, written only by ``bench.py --tune`` / ``--tune-mosaic``), then a
heuristic (:func:`heuristic_config`; the Mosaic kernel's is ``kernel_mosaic.heuristic_config``).
The table holds two sections: ``configs`` (:class:`TuningConfig`, the Triton kernel) and
``mosaic`` (:class:`MosaicConfig`, the Mosaic GPU WINT2 kernel).

A tuned-table key is ``fmt|activation|groups|K|N|rows-bucket``; rows are the activation rows the
kernel sees (tokens x top-k for a MoE layer) rounded up to a power of two.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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
        if self.block_n < 16:
            raise ValueError(f"block_n={self.block_n} must be >= 16")

    def to_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


MOSAIC_SCHEDULES = ("all", "half", "one")
MOSAIC_MMAS = ("wgmma", "sync")
MOSAIC_PLANES = ("bf16", "fp16")


def every_16_below(block_m: int) -> tuple[int, ...]:
    """Tail heights every 16 rows below ``block_m`` (:attr:`MosaicConfig.tails`): the
    heuristic's, and the tuner's first variant."""
    return tuple(range(16, block_m, 16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicConfig:
    """Launch choices of the Mosaic GPU WINT2 kernel (``kernel_mosaic.py``).

    Attributes:
      block_m: rows per tile, the wgmma N side (a multiple of 8, at most 256).
      stages: depth of the TMA pipeline over K steps.
      schedule: how much of a K step is decoded before its wgmmas are issued (``"all"``,
        ``"half"``, ``"one"``; ``kernel_mosaic.SCHEDULES``).
      split_k: programs sharing one output tile's K range (fp32 partial sums added, and the
        epilogue applied, outside the kernel): more programs when the grid is small.
      col_blocks: 64-column output blocks per program, sharing its x tile (less L2 traffic for
        x at many rows; one more accumulator set each).
      mma: the tensor-core instruction, ``"wgmma"`` (warpgroup-wide, asynchronous) or ``"sync"``
        (per-warp ``mma.sync`` m16n8k16, x fragments by ``ldmatrix``, each scale group's
        partial sums scaled in fp32: fewer instructions a weight at tiles of a few rows; at
        most 64 rows).
      planes: the operand type of the decoded weights and x under ``mma="sync"``: ``"bf16"``, or
        ``"fp16"`` (x scaled per row into fp16's range; the 10-bit mantissa takes two of a byte's
        four windows without a shift: one shift a code pair instead of three).
      k_unroll: 256-deep K steps per pipeline step (1, 2 or 4): one TMA issue, one slot wait
        and (``mma="sync"``) one warpgroup barrier for that many decode steps. The issue code
        runs in every warp (10 % of the 1-token kernel's instructions with one step a pipeline
        step, results/NOTES.md §49); more steps cost shared memory (x, bytes and scales of each
        a stage) and registers: 2 wins under mma.sync, wgmma tiles and 4 lose (§50).
      tails: shorter tile heights (ascending multiples of 8 below ``block_m``; wgmma only): a
        tile of ``r`` rows (an expert's last) runs as the smallest of them ``>= r``, so its
        wgmmas skip the padding rows past that height. One code path each in the kernel.
    """

    block_m: int
    stages: int = 2
    schedule: str = "all"
    split_k: int = 1
    col_blocks: int = 1
    mma: str = "wgmma"
    planes: str = "bf16"
    k_unroll: int = 1
    tails: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "tails", tuple(self.tails))  # a JSON list from the table
        if self.block_m % 8 or not 8 <= self.block_m <= 256:
            raise ValueError(f"block_m={self.block_m} must be a multiple of 8 in [8, 256]")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be >= 1")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")
        if self.col_blocks not in (1, 2, 4):
            raise ValueError(f"col_blocks={self.col_blocks} must be 1, 2 or 4")
        if self.schedule not in MOSAIC_SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {MOSAIC_SCHEDULES}")
        if self.mma not in MOSAIC_MMAS:
            raise ValueError(f"mma={self.mma!r} must be one of {MOSAIC_MMAS}")
        if self.mma == "sync" and self.block_m > 64:
            raise ValueError(f"mma='sync' takes block_m <= 64, got {self.block_m}")
        if self.planes not in MOSAIC_PLANES:
            raise ValueError(f"planes={self.planes!r} must be one of {MOSAIC_PLANES}")
        if self.planes == "fp16" and self.mma != "sync":
            raise ValueError("planes='fp16' needs mma='sync'")
        if self.k_unroll not in (1, 2, 4):
            raise ValueError(f"k_unroll={self.k_unroll} must be 1, 2 or 4")
        heights = (*self.tails, self.block_m)
        if self.tails and (any(h % 8 or h < 8 for h in self.tails)
                           or any(a >= b for a, b in itertools.pairwise(heights))):
            raise ValueError(f"tails={self.tails} must be ascending multiples of 8 below "
                             f"block_m={self.block_m}")
        if self.tails and self.mma != "wgmma":
            raise ValueError("tails need mma='wgmma'")

    def to_dict(self) -> dict[str, int | str | tuple[int, ...]]:
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


# A device borrows the entries its own table lacks from a same-architecture device (same SM
# count, shared memory and registers; only the memory bandwidth differs): the H200 the H100's.
# Per key, so that tuning a few shapes on the H200 does not hide the rest of the H100's table.
# The H200's own sweeps picked the same or FFN-losing entries so far (results/NOTES.md §58,
# §73), so it has no table of its own yet.
FALLBACK_TABLES = {"nvidia_h200": "nvidia_h100_80gb_hbm3"}


SECTIONS = {"configs": TuningConfig, "mosaic": MosaicConfig}


@functools.cache
def _tuned_table(device: str, section: str = "configs") -> dict:
    """``{key: config}`` of one section of a device's table, over its fallback device's entries
    (``{}`` if neither has a table)."""
    table = _tuned_table(FALLBACK_TABLES[device], section) if device in FALLBACK_TABLES else {}
    path = TUNED_DIR / f"{device}.json"
    if path.exists():
        raw = json.loads(path.read_text())
        cls = SECTIONS[section]
        table = {**table, **{key: cls(**entry["config"])
                             for key, entry in raw.get(section, {}).items()}}
    return table


LARGE_ROWS = 8192
"""From this many rows up, a call past the largest tuned row bucket takes that bucket's entry if
it has at least ``LARGE_ROWS // 8`` rows (long prefills: throughput-bound tiles either way; the
300B's 8K prefill +8 % over the heuristic's configs, results/NOTES.md §67)."""


def _nearest(table: dict, want: TunedKey):
    """The entry of the nearest tuned row bucket (within 4x; ties: the larger); past the largest
    bucket from ``LARGE_ROWS`` rows up, the largest bucket's (if it is a large one); else None."""
    best, best_dist = None, 3
    largest, largest_rows = None, 0
    for key, cfg in table.items():
        *head, rows = key.split("|")
        if head == [str(v) for v in want[:-1]]:
            dist = abs(int(rows).bit_length() - want.rows.bit_length())
            if dist < best_dist or (dist == best_dist and int(rows) > want.rows):
                best, best_dist = cfg, dist
            if int(rows) > largest_rows:
                largest, largest_rows = cfg, int(rows)
    if (best is None and want.rows >= LARGE_ROWS and want.rows > largest_rows
            and largest_rows >= LARGE_ROWS // 8):
        return largest
    return best


def tuned_mosaic_entry(key: TunedKey) -> MosaicConfig | None:
    """The device's Mosaic entry of exactly this key (no nearest bucket), if any."""
    return _tuned_table(device_key(), "mosaic").get(str(key))


def tuned_mosaic_config(m: int, k: int, n_out: int, *, activation: str | None = None,
                        num_groups: int = 1) -> MosaicConfig | None:
    """The device's tuned Mosaic WINT2 config for this call (nearest row bucket), if any."""
    want = TunedKey("wint2", activation or "none", num_groups, k, n_out, rows_bucket(m))
    return _nearest(_tuned_table(device_key(), "mosaic"), want)


# A dense linear at a few rows splits K until about this many programs stream its weights.
DENSE_MIN_PROGRAMS = 192


def heuristic_config(fmt: str, m: int, k: int, n_out: int, *, activation: str | None = None,
                     num_groups: int = 1) -> TuningConfig:
    """A reasonable config when no tuned entry exists (from H100 sweeps, see ``bench.py``).

    Few rows per expert: one 16-row tile per active expert, narrow column blocks (many
    programs stream weights in parallel) and a K block that keeps the decoded planes within
    ~128 registers per thread (occupancy is register-limited). Many rows per expert: 64-row
    tiles raise the MMA's arithmetic intensity. A dense WINT8 linear at one row: GEMV-style.
    """
    if fmt == "wint8" and num_groups == 1 and m == 1:
        # One row: GEMV-style CUDA-core FMAs, K split up to 16 ways (the H100 sweeps of
        # results/NOTES.md §57: 11-43 % under the tensor-core kernel on every 1-row linear).
        split = next(s for s in (16, 8, 4, 2, 1) if (k // 16) % s == 0)
        return TuningConfig(block_m=1, block_n=max(16, min(128, _largest_pow2_divisor(n_out))),
                            block_k=16, num_warps=4, num_stages=1, split_k=split, mode="fma")
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
    split = 1
    if fmt in ("bf16", "wint8") and num_groups == 1 and bm == 16:
        # A dense linear at a few rows: split K until ~192 programs stream weights (the 1-token
        # device-timed sweeps of results/NOTES.md §54 picked splits of 2-8 on every shape).
        while (split < 8 and (n_out // bn) * split < DENSE_MIN_PROGRAMS
               and (k // bk) % (2 * split) == 0):
            split *= 2
    return TuningConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=3,
                        split_k=split)


def _fma_for_rows(cfg: TuningConfig, m: int) -> TuningConfig | None:
    """A GEMV-style entry of a nearby row bucket, fitted to ``m`` rows: one tile of all of them
    (a smaller tile would read the weights once per tile), K and N blocks halved until the
    per-row partial sums fit ~64 fp32 registers a thread; ``None`` past 8 rows."""
    bm = rows_bucket(m)
    if bm > 8:
        return None
    bk, bn = cfg.block_k, cfg.block_n
    while bm * bk * bn > 64 * 32 * cfg.num_warps and (bk > 16 or bn > 16):
        if bk > 16:
            bk //= 2
        else:
            bn //= 2
    return dataclasses.replace(cfg, block_m=bm, block_k=bk, block_n=bn)


def _largest_pow2_divisor(v: int) -> int:
    return v & -v if v > 0 else 1


def get_config(fmt: str, m: int, k: int, n_out: int, *, activation: str | None = None,
               num_groups: int = 1) -> TuningConfig:
    """The tuned config of the nearest tuned row bucket (within 4x; ties: the larger), else
    the heuristic."""
    want = TunedKey(fmt, activation or "none", num_groups, k, n_out, rows_bucket(m))
    best = _nearest(_tuned_table(device_key()), want)
    if best is not None and best.mode == "fma" and num_groups == 1:
        best = _fma_for_rows(best, m)  # grouped: a tile is one expert's rows, tuned as is
    if best is not None:
        return best
    return heuristic_config(fmt, m, k, n_out, activation=activation, num_groups=num_groups)
