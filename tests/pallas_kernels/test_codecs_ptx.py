"""The hand-written WINT8 PTX decoder of ``pallas_kernels.codecs``, checked on a CPU.

The compiled kernel runs it on the GPU only (``TestKernels``). Here a small interpreter of the
few PTX instructions it uses, written from the PTX ISA's definitions (not from the codec), runs
the string over every byte and compares with the integers; a lowering test checks that the
compiled kernel carries it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import codecs, kernels, shapes
from pallas_kernels.config import TuningConfig


def _prmt(a, b, sel):
    """``prmt.b32`` default mode: byte i of d is byte ``sel_i & 7`` of {b, a}, sign-replicated
    if ``sel_i & 8``."""
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    sel = np.broadcast_to(sel, a.shape).astype(np.uint64)
    out = np.zeros(a.shape, np.uint64)
    for i in range(4):
        nib = (sel >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (src >> ((nib & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        byte = np.where(nib & np.uint64(8), np.where(byte & np.uint64(0x80), 0xFF, 0), byte)
        out |= byte.astype(np.uint64) << np.uint64(8 * i)
    return out.astype(np.uint32)


_OPS = {
    "xor.b32": np.bitwise_xor,
    "prmt.b32": _prmt,
    "sub.rn.f32": lambda a, b: (a.view(np.float32) - b.view(np.float32)).view(np.uint32),
}


def run_ptx(text: str, args: list[np.ndarray], n_out: int) -> list[np.ndarray]:
    """Execute an inline-asm body: ``$0..$(n_out-1)`` are outputs, then ``args``."""
    regs = {f"${n_out + i}": np.asarray(a, np.uint32) for i, a in enumerate(args)}
    shape = regs[f"${n_out}"].shape

    def value(tok):
        if tok in regs:
            return regs[tok]
        bits = int(tok[2:], 16) if tok.startswith("0f") else int(tok, 0)
        return np.full(shape, bits, np.uint32)

    for stmt in text.strip().strip("{}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        if op not in _OPS:
            raise NotImplementedError(f"PTX op {op!r} in: {stmt}")
        regs[dst] = np.asarray(_OPS[op](*map(value, srcs)), np.uint32)
    return [regs[f"${i}"] for i in range(n_out)]


def _decode(text: str, q: np.ndarray) -> np.ndarray:  # [n, 4] int8 -> [n, 4] fp32 values
    words = np.ascontiguousarray(q.astype(np.int8)).view(np.uint32)[:, 0]  # little-endian
    return np.stack([o.view(np.float32) for o in run_ptx(text, [words], 4)], axis=-1)


def test_int8_to_f32_decoder_covers_every_byte():
    q = np.arange(-128, 128, dtype=np.int64)
    q = np.stack([q, np.roll(q, 1), q[::-1], np.roll(q, 77)], axis=-1)  # [256, 4]
    np.testing.assert_array_equal(_decode(codecs._PTX_INT8_F32, q), q)


def test_interpreter_catches_a_wrong_selector():
    """The check above can fail: one wrong ``prmt`` selector breaks it."""
    q = np.arange(-128, 128, dtype=np.int64).reshape(64, 4)
    assert (_decode(codecs._PTX_INT8_F32.replace("0x7441", "0x7440"), q) != q).any()


def test_compiled_gemv_kernel_carries_the_ptx_decoder():
    """Lowered for CUDA (jax 0.10 needs no GPU for it), the one-row ``"fma"`` kernel holds the
    PTX and no int -> float cast of the weights; with ``INT_PTX_DECODE`` off it holds the cast."""
    w = shapes.random_linear(jax.random.key(0), "wint8", 256, 128)
    sd = jax.ShapeDtypeStruct
    cfg = TuningConfig(block_m=1, block_n=64, block_k=16, num_stages=1, split_k=4, mode="fma")

    def lower():
        f = jax.jit(lambda x, w: kernels.quant_matmul(x, w, interpret=False, fmt="wint8",
                                                      config=cfg))
        args = (sd((1, 256), jnp.bfloat16), jax.tree.map(lambda a: sd(a.shape, a.dtype), w))
        try:
            return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        except RuntimeError as err:
            if "No supported GPU" in str(err):
                pytest.skip("this jax's Triton lowering needs a GPU")
            raise

    text = lower()
    assert "0f4B000080" in text and "sitofp" not in text
    try:
        codecs.INT_PTX_DECODE = False
        jax.clear_caches()  # the kernel's trace is cached; the flag is read when tracing
        text = lower()
    finally:
        codecs.INT_PTX_DECODE = True
        jax.clear_caches()
    assert "0f4B000080" not in text and "sitofp" in text
