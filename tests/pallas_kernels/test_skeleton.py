"""``pallas_kernels.skeleton``: the Mosaic kernel's TMA pipeline with an empty body.

On a CPU it lowers for CUDA (Mosaic GPU's block-spec, tiling and swizzle checks run here); the
timing (``python -m pallas_kernels.skeleton``) needs the GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import skeleton


@pytest.mark.parametrize("kw", [dict(k_unroll=2, split_k=2, halves=2),
                                dict(k_unroll=1, stages=4, with_x=False),
                                dict(k_unroll=2, with_scales=False)])
def test_skeleton_lowers_for_cuda_on_any_host(kw):
    e, k, n, tiles = 4, 1024, 256, 3
    sd = jax.ShapeDtypeStruct
    args = (sd((8 * tiles, k), jnp.bfloat16), sd((e, n // 64, k // 256, 16, 256), jnp.uint8),
            sd((e, n // 64, k // 256, 128), jnp.uint8))
    f = functools.partial(skeleton.stream, tiles=tiles, **kw)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_skeleton_refuses_steps_that_do_not_divide():
    sd = jax.ShapeDtypeStruct
    args = (sd((8, 768), jnp.bfloat16), sd((2, 1, 3, 16, 256), jnp.uint8),
            sd((2, 1, 3, 128), jnp.uint8))
    with pytest.raises(ValueError, match="must divide"):
        jax.jit(functools.partial(skeleton.stream, tiles=1, k_unroll=2)).trace(*args)
