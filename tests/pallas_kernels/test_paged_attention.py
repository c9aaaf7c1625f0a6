"""The paged decode-attention kernel (interpret mode) against its jnp reference and numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import paged_attention


def _numpy_attention(q, k_cache, v_cache, tables, lengths):
    """Independent fp64 reference: walk each row's blocks, plain softmax over visible keys."""
    b, nh, d = q.shape
    _, bs, nkv, _ = k_cache.shape
    g = nh // nkv
    out = np.zeros((b, nh, d))
    for r in range(b):
        n = int(lengths[r])
        if n == 0:
            continue
        keys = np.concatenate([k_cache[t] for t in tables[r]])[:n]  # [n, nkv, d]
        vals = np.concatenate([v_cache[t] for t in tables[r]])[:n]
        for j in range(nh):
            s = keys[:, j // g] @ q[r, j] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[r, j] = (p / p.sum()) @ vals[:, j // g]
    return out


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    layers, nb, bs, nkv, d, nh, b, p = 2, 20, 16, 2, 32, 10, 4, 6  # g = 5 heads per kv head
    k = rng.standard_normal((layers, nb, bs, nkv, d)).astype(np.float32)
    v = rng.standard_normal((layers, nb, bs, nkv, d)).astype(np.float32)
    q = rng.standard_normal((b, nh, d)).astype(np.float32)
    tables = np.stack([rng.permutation(nb)[:p] for _ in range(b)]).astype(np.int32)
    lengths = np.array([1, 37, 0, p * bs], np.int32)  # one key, partial block, none, all
    return q, k, v, tables, lengths


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layer", [0, 1])
def test_kernel_matches_numpy(case, splits, layer):
    q, k, v, tables, lengths = case
    got = paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(tables),
                          jnp.asarray(lengths), layer=layer, splits=splits,
                          implementation="pallas")
    want = _numpy_attention(q, k[layer], v[layer], tables, lengths)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(got)[2] == 0)  # no visible key -> zeros


def test_reference_matches_numpy_and_kernel_in_bf16(case):
    q, k, v, tables, lengths = case
    args = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    ref = paged_attention(*args, jnp.asarray(tables), jnp.asarray(lengths), layer=1,
                          implementation="xla")
    want = _numpy_attention(*(np.asarray(a, np.float64) for a in (args[0], args[1][1],
                                                                   args[2][1])),
                            tables, lengths)
    np.testing.assert_allclose(np.asarray(ref, np.float32), want, atol=3e-2, rtol=3e-2)
    got = paged_attention(*args, jnp.asarray(tables), jnp.asarray(lengths), layer=1, splits=2,
                          implementation="pallas")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2, rtol=3e-2)


def test_unsupported_shapes_say_why():
    q = jnp.zeros((1, 34, 32))  # 17 query heads per kv head
    kc = jnp.zeros((4, 16, 2, 32))
    with pytest.raises(NotImplementedError, match="n_heads/n_kv"):
        paged_attention(q, kc, kc, jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32),
                        implementation="pallas")
    with pytest.raises(ValueError, match="layer="):
        paged_attention(q[:, :4], kc[None], kc[None], jnp.zeros((1, 2), jnp.int32),
                        jnp.ones((1,), jnp.int32))
