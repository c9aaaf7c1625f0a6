"""The paged-KV-cache step against the cache-free full forward, and greedy generate."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_params

from jaxwint2 import ErnieConfig, ErnieForCausalLM, QuantConfig, generate

# The cache logic does not depend on the layer kind: two layers (dense, WINT2 MoE) keep the
# compile time of the many step shapes below small.
SMALL = ErnieConfig.tiny(QuantConfig(dense="wint8", moe="wint2"), num_hidden_layers=2,
                         moe_layer_end_index=1)


@pytest.fixture(scope="module")
def model():
    return ErnieForCausalLM.from_params(SMALL, make_params(SMALL, seed=1), kernels="reference",
                                        dtype="float32")


@pytest.fixture(scope="module")
def tiny_cfg():
    return SMALL


@pytest.fixture(scope="module")
def ids(tiny_cfg):
    return np.random.default_rng(5).integers(0, tiny_cfg.vocab_size, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def full(model, ids):
    return np.asarray(model(ids))


# Rows own scattered, non-contiguous blocks: block_size 4, 3 blocks cover 12 positions.
BLOCK_TABLES = np.array([[5, 2, 7, 0], [1, 3, 4, 6]], np.int32)


def _positions(start, stop, rows=2):
    return np.broadcast_to(np.arange(start, stop, dtype=np.int32), (rows, stop - start)).copy()


def test_chunked_prefill_then_decode_matches_full_forward(model, ids, full):
    cache = model.init_cache(num_blocks=8, block_size=4)
    got, pos = [], 0
    for chunk in (4, 4, 1, 1, 1, 1):  # prefill chunks across block boundaries, then decode steps
        logits, cache = model.step_jit(ids[:, pos:pos + chunk], _positions(pos, pos + chunk),
                                       BLOCK_TABLES, cache)
        got.append(np.asarray(logits))
        pos += chunk
    got = np.concatenate(got, axis=1)
    assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()


def test_padding_is_not_written_and_logits_at_picks_rows(model, ids, full):
    """Ragged rows right-padded with position -1; logits only at each row's last token."""
    tokens = np.zeros((2, 16), np.int32)
    positions = np.full((2, 16), -1, np.int32)
    tokens[0, :12], positions[0, :12] = ids[0], np.arange(12)
    tokens[1, :7], positions[1, :7] = ids[1, :7], np.arange(7)
    cache = model.init_cache(num_blocks=8, block_size=4)
    k_before = np.asarray(cache.k)
    last, cache = model.step_jit(tokens, positions, BLOCK_TABLES, cache,
                                 logits_at=np.array([11, 6], np.int32))
    assert last.shape == (2, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(last), full[[0, 1], [11, 6]], rtol=0, atol=1e-4)

    # Slots written: row 0 positions 0..11, row 1 positions 0..6; nothing else.
    k = np.asarray(cache.k)
    written = np.zeros(k.shape[1:3], bool)  # [num_blocks, block_size]
    for row, n in ((0, 12), (1, 7)):
        for p in range(n):
            written[BLOCK_TABLES[row, p // 4], p % 4] = True
    changed = np.any(k != k_before, axis=(0, 3, 4))
    np.testing.assert_array_equal(changed, written)

    # Row 1 continues decoding from position 7 on top of that cache.
    nxt, _ = model.step_jit(ids[:, 7:8] * np.array([[0], [1]], np.int32),
                            np.array([[-1], [7]], np.int32), BLOCK_TABLES, cache,
                            logits_at=np.zeros(2, np.int32))
    np.testing.assert_allclose(np.asarray(nxt)[1], full[1, 7], rtol=0, atol=1e-4)


def test_step_rejects_bad_shapes(model, ids):
    cache = model.init_cache(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="positions"):
        model.step(ids, _positions(0, 11), BLOCK_TABLES, cache)
    with pytest.raises(ValueError, match="block_tables"):
        model.step(ids, _positions(0, 12), BLOCK_TABLES[:1], cache)
    with pytest.raises(ValueError, match="logits_at"):
        model.step(ids, _positions(0, 12), BLOCK_TABLES, cache, logits_at=np.zeros(3, np.int32))


def test_greedy_generate_equals_repeated_full_forwards(model, tiny_cfg):
    """Cache decoding picks, at every step, the argmax of a cache-free forward of the sequence.

    One forward of each final sequence checks every step at once (causality: the logits at
    position t only see tokens <= t, exactly what the t-th full forward would have seen).
    """
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, tiny_cfg.vocab_size, 5).tolist(),
               rng.integers(0, tiny_cfg.vocab_size, 3).tolist()]
    out = generate(model, prompts, max_new_tokens=7, temperature=0.0, stop_token_ids=[],
                   block_size=4)
    assert [len(o) for o in out] == [7, 7]
    seqs = np.zeros((2, 12), np.int32)
    for r, (p, o) in enumerate(zip(prompts, out, strict=True)):
        seqs[r, : len(p) + len(o)] = p + o
    logits = np.asarray(model(seqs))
    for r, (p, o) in enumerate(zip(prompts, out, strict=True)):
        want = logits[r, len(p) - 1: len(p) + len(o) - 1].argmax(-1)
        assert want.tolist() == o, f"row {r}"


def test_generate_stops_on_stop_tokens(model, tiny_cfg):
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]  # same buckets as above: nothing recompiles
    first = generate(model, prompts, max_new_tokens=7, temperature=0.0, stop_token_ids=[],
                     block_size=4)
    stop = first[0][2]
    cut = generate(model, prompts, max_new_tokens=7, temperature=0.0, stop_token_ids=[stop],
                   block_size=4)
    for f, c in zip(first, cut, strict=True):
        assert c == (f[: f.index(stop)] if stop in f else f)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        generate(model, [[tiny_cfg.vocab_size]], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, max_new_tokens=0)


def test_bf16_cache_on_cpu_is_updated_without_whole_cache_temporaries():
    """On XLA:CPU a bf16 cache is kept as uint16 bit patterns: XLA:CPU widens a bf16 gather or
    scatter's whole operand to f32, which made a decode step cost ~0.5 s at 128 MB of cache."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxwint2 import kv_cache as kvc
    from jaxwint2.model import _step_jit

    if jax.default_backend() != "cpu":
        pytest.skip("the bit-pattern storage is XLA:CPU's")
    m = ErnieForCausalLM.from_params(SMALL, make_params(SMALL, seed=1), kernels="reference")
    cache = m.init_cache(num_blocks=2048, block_size=16)
    assert cache.k.dtype == jnp.uint16 and cache.dtype == jnp.bfloat16
    graphdef, state = nnx.split(m)
    tok, pos = jnp.zeros((2, 1), jnp.int32), jnp.full((2, 1), 20, jnp.int32)
    tables = jnp.arange(4, dtype=jnp.int32).reshape(2, 2)
    compiled = _step_jit(graphdef).lower(state, tok, pos, tables, cache, None).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < cache.k.nbytes, (temp, cache.k.nbytes)  # was 4x (k and v widened to f32)
    logits, cache = m.step_jit(tok, pos, tables, cache)
    k, _ = kvc.values(cache)
    assert k.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits)).all()
    assert np.asarray(k[:, tables[0, 1], 20 % 16].astype(jnp.float32)).any()  # slot written
