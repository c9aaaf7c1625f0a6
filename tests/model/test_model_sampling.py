"""Sampling statistics: greedy, top-k and top-p support and mass, temperature, seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxwint2 import SamplingParams
from jaxwint2.sampling import sample, step_keys

V = 16
N = 4000  # draws per row


@pytest.fixture(scope="module")
def logits():
    # Row 0: a skewed distribution with a known shape; row 1: a tie at the top.
    p = np.array([0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.03] + [0.0] * 8)
    row0 = np.log(np.where(p > 0, p, 1e-12))
    row1 = np.zeros(V)
    row1[[3, 7]] = 5.0
    return jnp.asarray(np.stack([row0, row1]), jnp.float32)


_draw = jax.jit(jax.vmap(sample, in_axes=(None, 0, None, None, None)))


def _draws(logits, temperature, top_p, top_k, seed=0):
    """``N`` draws for each row: ``[N, B]`` token ids."""
    b = logits.shape[0]
    keys = jax.vmap(lambda n: step_keys(jnp.full(b, seed), jnp.full(b, n)))(jnp.arange(N))
    full = lambda v, dt: jnp.full(b, v, dt)  # noqa: E731
    return np.asarray(_draw(logits, keys, full(temperature, jnp.float32),
                            full(top_p, jnp.float32), full(top_k, jnp.int32)))


def test_greedy_is_argmax_with_ties_to_lower_id(logits):
    out = _draws(logits, 0.0, 1.0, 0)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 3).all()


def test_top_k_support_and_renormalised_mass(logits):
    out = _draws(logits, 1.0, 1.0, 3)[:, 0]
    assert set(np.unique(out)) == {0, 1, 2}
    freq = np.bincount(out, minlength=V)[:3] / N
    np.testing.assert_allclose(freq, np.array([0.4, 0.2, 0.15]) / 0.75, atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p(logits):
    # Cumulative mass 0.4, 0.6, 0.75, 0.85: top_p=0.7 keeps tokens {0, 1, 2}.
    out = _draws(logits, 1.0, 0.7, 0)[:, 0]
    assert set(np.unique(out)) == {0, 1, 2}
    freq = np.bincount(out, minlength=V)[:3] / N
    np.testing.assert_allclose(freq, np.array([0.4, 0.2, 0.15]) / 0.75, atol=0.03)
    # top_p tiny: only the most likely token survives.
    assert (_draws(logits, 1.0, 1e-6, 0)[:, 0] == 0).all()


def test_unfiltered_sampling_follows_the_distribution(logits):
    out = _draws(logits, 1.0, 1.0, 0)[:, 0]
    freq = np.bincount(out, minlength=V) / N
    np.testing.assert_allclose(freq[:8], [0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.03],
                               atol=0.03)
    assert freq[8:].sum() == 0
    hot = np.bincount(_draws(logits, 3.0, 1.0, 0)[:, 0], minlength=V) / N
    assert hot[0] < freq[0] - 0.1  # higher temperature flattens


def test_seed_reproducibility_and_row_independence(logits):
    a = _draws(logits, 1.0, 1.0, 0, seed=7)
    b = _draws(logits, 1.0, 1.0, 0, seed=7)
    c = _draws(logits, 1.0, 1.0, 0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] != c[:, 0]).mean() > 0.3
    # A row's draw depends only on its own (seed, step), not on its batch mates.
    alone = _draws(logits[:1], 1.0, 1.0, 0, seed=7)
    np.testing.assert_array_equal(alone[:, 0], a[:, 0])


def test_sampling_params_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(stop="x").stop == ("x",)
    (tmp_path / "generation_config.json").write_text(
        '{"top_p": 0.8, "temperature": 0.7, "max_new_tokens": 9}')
    sp = SamplingParams.from_generation_config(tmp_path, seed=3)
    assert (sp.top_p, sp.temperature, sp.max_tokens, sp.seed) == (0.8, 0.7, 9, 3)
