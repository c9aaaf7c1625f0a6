"""Compile the Mosaic GPU WINT2 kernels on a host without a GPU: registers, spills, shared memory.

    python -m pallas_kernels.offline --shape ernie45_300b --proj up_gate --tokens 1 \\
        [--config '{"k_unroll": 1}'] [--dump DIR]

prints one JSON line: the kernel's configuration, registers a thread, spilled bytes, shared
memory a program, and how many 128-thread programs an SM can then hold (H100 / H200 limits),
with the limit that binds. ``--dump DIR`` keeps the PTX, ptxas' report and (where ``nvdisasm`` is
on ``PATH``) the SASS. A few seconds a configuration, where a GPU session costs minutes.

How: the CUDA plugin of ``jax[cuda12]`` (>= 0.11.2) holds all of Mosaic GPU's compiler (its MLIR
passes, LLVM's NVPTX backend, and a call of ptxas) behind ``MosaicGpuCompile``. The one question
it asks a driver is the device's compute capability. A stand-in ``libcuda.so.1`` of a few
functions, built here with the host's C compiler and loaded before the plugin looks for the
driver, answers 9.0 (sm_90a); the compile then runs to the cubin, and loading it fails, which is
expected. On a GPU host use the GPU: the stand-in would hide the real driver from this process.

Checked against ncu on an H100 (jax 0.11.2): the 1-token 300B up_gate and down kernels compile to
128 and 95 registers and 52224 and 34816 bytes of shared memory here, as ncu reports them
(``results/NOTES.md`` §74). Uses two internals of jax (``mosaic.gpu.core.KNOWN_KERNELS`` for the
lowered module, the plugin's exported ``MosaicGpuCompile``): a tool for kernel work, not a
runtime dependency.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# What an sm_90 SM gives its programs (CUDA occupancy rules; 1 KiB of shared memory a program
# is reserved by the system).
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 8  # registers a thread are allocated in steps of 8 (256 a warp)
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED = 1024
MAX_PROGRAMS = 32
MAX_THREADS = 2048
THREADS = 128  # one warpgroup a program, as kernel_mosaic launches them

_DRIVER_C = r"""
/* A stand-in CUDA driver: enough for Mosaic GPU's compile step to target sm_90a. */
typedef int CUresult;
static const char *message = "stand-in libcuda (pallas_kernels.offline): no GPU here";
CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12090; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 0; return 0; }
CUresult cuDeviceGet(int *d, int i) { *d = 0; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attribute, int device) {
  *v = attribute == 75 ? 9 : 0;  /* compute capability: major 9 (75), minor 0 (76) */
  return 0;
}
CUresult cuGetErrorString(CUresult e, const char **s) { *s = message; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = message; return 0; }
"""


@dataclasses.dataclass(frozen=True)
class Resources:
    """What ptxas and Mosaic GPU report for one kernel, and the residency that follows."""
    registers: int
    spill_bytes: int  # spill stores + loads
    smem_bytes: int

    def programs_per_sm(self) -> dict[str, int]:
        """Programs an SM holds by each limit, and ``"programs"``: the least of them."""
        regs = -(-self.registers // REGISTER_GRANULE) * REGISTER_GRANULE
        by = {"registers": REGISTERS_PER_SM // (regs * THREADS),
              "shared_memory": SMEM_PER_SM // (self.smem_bytes + SMEM_RESERVED),
              "threads": MAX_THREADS // THREADS, "programs_cap": MAX_PROGRAMS}
        return {**by, "programs": min(by.values())}


def parse_ptxas(report: str) -> tuple[int, int]:
    """(registers, spilled bytes) from ptxas' ``-v`` report of one kernel."""
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None or spill is None:
        raise ValueError(f"no register / spill counts in ptxas' report: {report[:300]!r}")
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))


def parse_smem(resources: str) -> int:
    """Shared memory a program from Mosaic GPU's resources dump."""
    m = re.search(r"smem_scratch_bytes=(\d+)", resources)
    if m is None:
        raise ValueError(f"no smem_scratch_bytes in {resources[:300]!r}")
    return int(m.group(1))


def stand_in_driver(cache: Path | None = None) -> Path:
    """Build (once) and return the stand-in ``libcuda.so.1``."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxwint2"
    lib = cache / "stand_in_cuda" / "libcuda.so.1"
    if not lib.exists():
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("pallas_kernels.offline needs a C compiler (cc or $CC)")
        lib.parent.mkdir(parents=True, exist_ok=True)
        src = lib.with_suffix(".c")
        src.write_text(_DRIVER_C)
        tmp = lib.with_suffix(".tmp")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(tmp),
                        str(src)], check=True)
        tmp.replace(lib)
    return lib


@functools.cache
def _compile_fn():
    """The CUDA plugin's ``MosaicGpuCompile`` (module bytes -> compiled kernel handle)."""
    try:
        import jax_plugins.xla_cuda12 as plugin
    except ImportError:
        try:
            import jax_plugins.xla_cuda13 as plugin
        except ImportError:
            raise RuntimeError("pallas_kernels.offline needs jax[cuda12] (or cuda13) installed: "
                               "Mosaic GPU's compiler lives in its CUDA plugin") from None
    fn = ctypes.CDLL(plugin._get_library_path()).MosaicGpuCompile
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_void_p
    return fn


def compile_resources(lower, dump: Path) -> tuple[Resources, Path]:
    """Lower (``lower()`` traces a jitted function for CUDA) and compile the one Mosaic GPU
    kernel it holds; its resources, and the new directory under ``dump`` that holds its PTX,
    ptxas report (and SASS, with ``MOSAIC_GPU_DUMP_SASS``)."""
    from jax.experimental.mosaic.gpu import core

    out = Path(tempfile.mkdtemp(prefix="kernel_", dir=dump))
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(out)
    core.KNOWN_KERNELS.clear()
    lower()
    if len(core.KNOWN_KERNELS) != 1:
        raise ValueError(f"expected one Mosaic GPU kernel, lowered {len(core.KNOWN_KERNELS)}")
    (module,) = core.KNOWN_KERNELS.values()
    _compile_fn()(module, len(module))  # fails at loading the cubin: no device, as expected

    def one(suffix: str) -> str:
        found = sorted(out.glob(f"*{suffix}"))
        if not found:
            raise RuntimeError(f"the compile left no *{suffix} in {out} (did it run?)")
        return found[-1].read_text()

    regs, spill = parse_ptxas(one(".ptxas"))
    return Resources(regs, spill, parse_smem(one(".resources.txt"))), out


def projection_lowering(shape_name: str, proj: str, tokens: int, overrides: dict):
    """``(lower, config)``: a shape's grouped projection at ``tokens`` tokens (``top_k`` rows
    each), with the config the tuned table picks for it updated by ``overrides``."""
    import jax
    import jax.numpy as jnp

    from . import kernel_mosaic, shapes

    s = shapes.SHAPES[shape_name]
    (k, n), act = (s.up_gate, "swiglu") if proj == "up_gate" else (s.down, None)
    m, e = tokens * s.top_k, s.experts
    config = kernel_mosaic.config_for(m, k, n // 2 if act else n, e, act)
    config = dataclasses.replace(config, **overrides)
    sd = jax.ShapeDtypeStruct
    # The runtime layout's leaves (as shapes.random_linear makes them), with the integer code
    # step's, which to_fragments adds by default
    w = jax.eval_shape(lambda key: shapes.random_linear(key, "wint2", k, n, e), jax.random.key(0))
    w |= {f: sd((e, n), jnp.int32) for f in kernel_mosaic.INTEGER_CODE_LEAVES}

    def f(x, w, gs):
        return kernel_mosaic.grouped_matmul_fragments(x, w, gs, activation=act, config=config)

    def lower():
        jax.jit(f).trace(sd((m, k), jnp.bfloat16), w, sd((e,), jnp.int32)).lower(
            lowering_platforms=("cuda",))

    return lower, config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="ernie45_300b")
    p.add_argument("--proj", choices=("up_gate", "down"), default="up_gate")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--device", default="nvidia_h100_80gb_hbm3",
                   help="whose tuned table picks the config (tuned/<device>.json)")
    p.add_argument("--config", default="{}", help="MosaicConfig fields (JSON) over the tuned one")
    p.add_argument("--dump", type=Path, default=None, help="keep PTX, ptxas report, SASS here")
    args = p.parse_args(argv)

    ctypes.CDLL(str(stand_in_driver()), mode=ctypes.RTLD_GLOBAL)  # before the plugin looks
    dump = args.dump or Path(tempfile.mkdtemp(prefix="jaxwint2_offline_"))
    dump.mkdir(parents=True, exist_ok=True)
    os.environ.update(JAX_PLATFORMS="cpu", MOSAIC_GPU_DUMP_PTXAS="1",
                      MOSAIC_GPU_DUMP_RESOURCES="1", MOSAIC_GPU_DUMP_PTX="1")
    from jax.experimental.mosaic.gpu import core  # noqa: F401  (sets MOSAIC_GPU_CUDA_ROOT)

    if nvdisasm := shutil.which("nvdisasm"):  # Mosaic GPU looks for it under its CUDA root
        os.environ["MOSAIC_GPU_CUDA_ROOT"] = str(Path(nvdisasm).resolve().parent.parent)
        if args.dump:
            os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"

    from . import config as config_lib
    from . import kernel_mosaic
    kernel_mosaic.available = lambda: True  # lowering for CUDA is host-independent
    config_lib.device_key = lambda: args.device
    lower, config = projection_lowering(args.shape, args.proj, args.tokens,
                                        json.loads(args.config))
    res, files = compile_resources(lower, dump)
    print(json.dumps({"shape": args.shape, "proj": args.proj, "tokens": args.tokens,
                      "device_table": args.device, "config": config.to_dict(),
                      **dataclasses.asdict(res), "per_sm": res.programs_per_sm(),
                      "ptxas": shutil.which("ptxas"),
                      "files": str(files) if args.dump else None}))
    if args.dump is None:
        shutil.rmtree(dump, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
