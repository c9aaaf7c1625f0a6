"""``pallas_kernels.offline``: the kernels' resources compiled on a host without a GPU.

The report parsing and the residency arithmetic are checked against what ncu reported for the
same kernels on an H100 (results/NOTES.md §73-74). The whole tool needs ``jax[cuda12]`` >= 0.11.2
(its CUDA plugin holds Mosaic GPU's compiler) and a C compiler; where they are, a subprocess
compiles the 1-token 300B kernels and must find ncu's register and shared-memory counts.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from pallas_kernels import kernel_mosaic, offline

# ptxas -v of the 1-token 300B up_gate (jax 0.11.2, ptxas 12.9)
PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'wint2_fragments_matmul_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for wint2_fragments_matmul_mosaic_gpu_kernel
    40 bytes stack frame, 40 bytes spill stores, 48 bytes spill loads
ptxas info    : Used 80 registers, used 2 barriers, 40 bytes cumulative stack size, 1 bytes smem
"""


def test_parse_ptxas_reads_registers_and_spills():
    assert offline.parse_ptxas(PTXAS_REPORT) == (80, 88)
    with pytest.raises(ValueError, match="no register"):
        offline.parse_ptxas("ptxas fatal   : Unsupported .version 9.0")


def test_parse_smem_reads_mosaic_resources():
    text = ("Resources(smem_scratch_bytes=52224, tmem_scratch_cols=0, barrier_counts="
            "Counter({Barrier(arrival_count=6, num_barriers=2): 1}))")
    assert offline.parse_smem(text) == 52224
    with pytest.raises(ValueError, match="smem_scratch_bytes"):
        offline.parse_smem("Resources()")


@pytest.mark.parametrize("regs, smem, by_regs, by_smem", [
    (128, 52224, 4, 4),  # 1-token up_gate: ncu's occupancy limits 4 and 4
    (95, 34816, 5, 6),  # 1-token down: ncu 5 by registers (96 allocated, 65536 / (96 * 128))
    (200, 68608, 2, 3),  # 64-token up_gate (16-row tiles)
    (18, 51200, 21, 4),  # the TMA skeleton alone (§74): 24 registers allocated
])
def test_programs_per_sm_follow_the_sm90_limits(regs, smem, by_regs, by_smem):
    per_sm = offline.Resources(regs, 0, smem).programs_per_sm()
    assert per_sm["registers"] == by_regs
    assert per_sm["shared_memory"] == by_smem
    assert per_sm["programs"] == min(by_regs, by_smem, 16)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="needs a C compiler")
def test_stand_in_driver_builds_a_libcuda(tmp_path):
    lib = offline.stand_in_driver(tmp_path)
    assert lib.name == "libcuda.so.1" and lib.stat().st_size > 0
    out = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout \
        if shutil.which("nm") else "cuDeviceGetAttribute cuCtxGetDevice"
    for fn in ("cuDeviceGetAttribute", "cuCtxGetDevice", "cuGetErrorString"):
        assert fn in out
    assert offline.stand_in_driver(tmp_path) == lib  # built once


def _has_cuda_plugin() -> bool:
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def _can_compile() -> bool:
    has_plugin = _has_cuda_plugin()
    return (has_plugin and tuple(map(int, jax.__version__.split(".")[:3])) >= kernel_mosaic.MIN_JAX
            and (shutil.which("cc") or shutil.which("gcc")) is not None
            and jax.default_backend() == "cpu")  # the stand-in driver would hide a real one


@pytest.mark.skipif(not _can_compile(), reason="needs jax[cuda12] >= 0.11.2, a C compiler and "
                    "no GPU")
@pytest.mark.parametrize("proj, registers, smem", [("up_gate", 128, 52224), ("down", 95, 34816)])
def test_offline_compile_matches_ncu(proj, registers, smem):
    out = subprocess.run([sys.executable, "-m", "pallas_kernels.offline", "--proj", proj],
                         capture_output=True, text=True, env={**os.environ}, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert (res["registers"], res["smem_bytes"], res["spill_bytes"]) == (registers, smem, 0)
