"""``python -m converters.bench_rss``: peak memory of the converter on a synthetic checkpoint.

Writes a synthetic w4w2 Paddle checkpoint of about ``--size-gb`` GB (WINT8 attention and dense
MLP, one WINT4 MoE layer, WINT2 MoE layers, 4 shards; streamed, one layer in memory), then runs
``python -m jaxwint2.convert`` on it in a child process and reports the child's peak resident set
size (``ru_maxrss`` from ``wait4``), next to the peak of a child that only imports the same
modules. Prints one JSON line.

The converter streams one layer at a time, so the peak should track the largest layer, not the
checkpoint (the issue's bar: a 2 GB checkpoint converts under 1.5 GB RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxwint2.checkpoint import part_names, part_shapes
from jaxwint2.config import ErnieConfig, QuantConfig

_IMPORTS = "import converters, jaxwint2.checkpoint, jaxwint2.convert, orbax.checkpoint, tqdm"


def synthetic_config(size_bytes: int, *, hidden: int = 2048, experts: int = 64) -> ErnieConfig:
    """A w4w2 config whose checkpoint is about ``size_bytes`` (layers added until it is), with
    ERNIE-like proportions (I = 2H dense, H/2 per expert, 128-wide heads)."""
    vocab = 16 * hidden

    def make(layers: int) -> ErnieConfig:
        return ErnieConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            moe_intermediate_size=hidden // 2, num_hidden_layers=layers,
            num_attention_heads=hidden // 128, num_key_value_heads=4, head_dim=128,
            moe_num_experts=experts, moe_k=8, moe_layer_start_index=1,
            moe_layer_end_index=layers - 1, tie_word_embeddings=False,
            quant=QuantConfig(dense="wint8", moe="wint2", w4_end_layer=1))

    layers = 3
    while checkpoint_bytes(make(layers)) < size_bytes:
        layers += 1
    return make(layers)


def _nbytes(tree) -> int:
    return sum(_nbytes(v) if isinstance(v, dict) else int(np.prod(v.shape)) * v.dtype.itemsize
               for v in tree.values())


def part_bytes(cfg: ErnieConfig) -> dict[str, int]:
    """Bytes of each part as the Paddle source holds it (WINT2 without ``code_a`` / ``code_b``,
    which the converter adds: 8 bytes a column)."""
    return {p: _nbytes(part_shapes(cfg, p, integer_codes=False)) for p in part_names(cfg)}


def checkpoint_bytes(cfg: ErnieConfig) -> int:
    return sum(part_bytes(cfg).values())


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss(cmd: list[str], poll_s: float = 0.02) -> tuple[int, float, int]:
    """Run ``cmd``; return (exit status, seconds, peak RSS in bytes) of the child.

    The peak is the child's ``VmHWM`` (high-water mark of its own address space), polled until
    it exits. ``ru_maxrss`` would not do: Linux carries the parent's RSS at ``fork`` into it.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid) or 0)
        time.sleep(poll_s)
    out, err = proc.communicate()
    if proc.returncode:
        sys.stderr.write(err.decode()[-2000:])
    return proc.returncode, time.perf_counter() - t0, peak


def measure(size_bytes: int, workdir: str | os.PathLike, *, hidden: int = 2048,
            seed: int = 0) -> dict:
    """Write a synthetic checkpoint of ~``size_bytes`` in ``workdir``, convert it, report RSS."""
    from jaxwint2.testing import random_part

    from .paddle_writer import write_paddle_checkpoint

    work = pathlib.Path(workdir)
    src, dst = work / "src", work / "dst"
    cfg = synthetic_config(size_bytes, hidden=hidden)
    t0 = time.perf_counter()
    write_paddle_checkpoint(cfg, lambda p: random_part(cfg, p, seed), src, num_shards=4,
                            bf16_header="U16")
    write_s = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rc, secs, rss = peak_rss([sys.executable, "-m", "jaxwint2.convert", str(src), str(dst),
                              "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"conversion failed with exit status {rc}")
    _, _, base = peak_rss([sys.executable, "-c", _IMPORTS])
    sizes = part_bytes(cfg)
    return {"checkpoint_bytes": on_disk, "layers": cfg.num_hidden_layers,
            "largest_part_bytes": max(sizes.values()), "peak_rss_bytes": rss,
            "import_baseline_rss_bytes": base, "growth_bytes": rss - base,
            "convert_seconds": round(secs, 1), "write_seconds": round(write_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.bench_rss", description=__doc__)
    p.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size (GB)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the synthetic model")
    p.add_argument("--workdir", help="where to write (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic and converted dirs")
    args = p.parse_args(argv)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="jaxwint2-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(int(args.size_gb * 1e9), work, hidden=args.hidden)
    finally:
        if not args.keep:
            shutil.rmtree(work / "src", ignore_errors=True)
            shutil.rmtree(work / "dst", ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
