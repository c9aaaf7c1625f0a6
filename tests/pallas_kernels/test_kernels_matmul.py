"""Pallas weight-only matmul kernels against the reference (``pallas_kernels.checks``).

``TestKernels`` runs the real kernel on an sm90 GPU (``gpu`` marker); ``TestKernelsInterpret``
runs the same kernel logic in Pallas interpret mode on the CPU, on tiny shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import checks
from pallas_kernels.config import TuningConfig

CPU_CASES = [
    *(dict(fmt=f, grouped=True, activation="swiglu", row_scale=True) for f in checks.FORMATS),
    dict(fmt="wint2", grouped=False),
    dict(fmt="wint2", grouped=True, k_order="shuffled", activation="swiglu"),
    dict(fmt="wint2", grouped=True, x_dtype=jnp.float32, row_scale=True),
    dict(fmt="wint2", grouped=True, activation="swiglu", row_scale=True,
         config=TuningConfig(block_m=2, block_n=32, block_k=128, mode="fma")),
    dict(fmt="wint2", grouped=True, row_scale=True, k_order="shuffled",
         config=TuningConfig(block_m=16, block_n=32, block_k=256, mode="mma_gs")),
    dict(fmt="wint4", grouped=False, x_dtype=jnp.float32, padding=0,
         config=TuningConfig(block_m=16, block_n=32, block_k=64, mode="mma_merged")),
    # split-K: partial sums of K halves added outside, then swiglu / row scale / column scale
    dict(fmt="wint8", grouped=True, activation="swiglu", row_scale=True,
         config=TuningConfig(block_m=16, block_n=32, block_k=64, split_k=2)),
    dict(fmt="wint2", grouped=True, row_scale=True,
         config=TuningConfig(block_m=16, block_n=32, block_k=128, mode="mma_gs", split_k=2)),
    # GEMV-style CUDA-core FMAs with a K split (the dense WINT8 linears at one row)
    dict(fmt="wint8", grouped=False, m=3,
         config=TuningConfig(block_m=2, block_n=32, block_k=32, mode="fma", split_k=4)),
    dict(fmt="wint8", grouped=True, activation="swiglu", row_scale=True,
         config=TuningConfig(block_m=1, block_n=32, block_k=32, mode="fma", split_k=2)),
    dict(fmt="wint4", grouped=True, activation="swiglu", m=6, padding=1,  # 300B's 1-token pick
         config=TuningConfig(block_m=1, block_n=32, block_k=32, mode="fma", split_k=4)),
]
GS = TuningConfig(block_m=16, block_n=32, block_k=128, mode="mma_gs")


def _id(kw):
    return "-".join(f"{k}={getattr(v, 'mode', getattr(v, '__name__', v))}" for k, v in kw.items())


class _KernelTests:
    INTERPRET: bool

    @pytest.mark.parametrize("kw", CPU_CASES, ids=_id)
    def test_matches_reference(self, kw):
        s = checks.check_matmul(interpret=self.INTERPRET, **kw)
        assert s.finite and s.rel_l2 < 1e-2

    @pytest.mark.parametrize("k_order,config", [("natural", None), ("shuffled", GS)],
                             ids=["natural-mma", "shuffled-mma_gs"])
    def test_wint2_decode_bit_exact_one_hot(self, k_order, config):
        exposed = checks.check_wint2_decode_exact(interpret=self.INTERPRET, k_order=k_order,
                                                  config=config)
        assert exposed > 0  # the random code_scale/code_zp do exercise the fused multiply-add

    def test_under_jit_with_traced_group_sizes(self):
        from pallas_kernels import kernels, reference, shapes

        w = shapes.random_linear(jax.random.key(5), "wint2", 128, 64, 3)
        x = jax.random.normal(jax.random.key(6), (24, 128), jnp.bfloat16)
        f = jax.jit(lambda x, gs: kernels.quant_grouped_matmul(
            x, w, gs, interpret=self.INTERPRET, fmt="wint2"))
        for gs in ([24, 0, 0], [0, 5, 17], [1, 1, 1]):  # one compile, several routings
            gs = jnp.asarray(gs, jnp.int32)
            want = reference.quant_grouped_matmul_reference(x, w, gs, fmt="wint2")
            checks.assert_close(f(x, gs), want, context=str(gs))

    def test_under_shard_map(self):
        from jax.sharding import Mesh
        from jax.sharding import PartitionSpec as P

        from pallas_kernels import kernels, reference, shapes

        mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        w = shapes.random_linear(jax.random.key(7), "wint4", 128, 64)
        x = jax.random.normal(jax.random.key(8), (32, 128), jnp.bfloat16)
        f = jax.shard_map(lambda x: kernels.quant_matmul(x, w, interpret=self.INTERPRET,
                                                         fmt="wint4"),
                          mesh=mesh, in_specs=P("x"), out_specs=P("x"))
        checks.assert_close(jax.jit(f)(x), reference.quant_matmul_reference(x, w, fmt="wint4"))


@pytest.mark.gpu
class TestKernelsGpuLarge:
    """Realistic shapes and configs: only where the real kernel runs."""

    @pytest.mark.parametrize("kw", [kw for kw in checks.matrix(interpret=False) if "m" in kw],
                             ids=_id)
    def test_matches_reference(self, kw):
        checks.check_matmul(interpret=False, **kw)


@pytest.mark.gpu
class TestKernels(_KernelTests):
    INTERPRET = False


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="interpret mode is the CPU's stand-in; a GPU runs TestKernels")
class TestKernelsInterpret(_KernelTests):
    INTERPRET = True
