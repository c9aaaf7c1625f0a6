"""The model against transformers' ``Ernie4_5_MoeForCausalLM`` on tiny random checkpoints.

Each checkpoint is loaded by ``jaxwint2.load`` from its ``save_pretrained`` files (HF ``-PT``
layout) and from a Paddle-layout copy of the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import converters
import jaxwint2
from jaxwint2.testing import write_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {"untied-shared": dict(tie_word_embeddings=False, shared_experts=1),
         "tied-no-shared": dict(tie_word_embeddings=True, shared_experts=0)}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = root / "hf"
    cfg = write_hf_checkpoint(hf_dir, seed=3, **CASES[request.param])
    _, params, _ = converters.load_checkpoint(hf_dir)
    paddle_dir = root / "paddle"
    converters.write_paddle_checkpoint(cfg, params, paddle_dir, num_shards=1)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32))
    return hf_dir, paddle_dir, ids


def _hf_logits(path, ids, dtype):
    model = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def test_float32_matches_transformers(checkpoint):
    hf_dir, paddle_dir, ids = checkpoint
    want = _hf_logits(hf_dir, ids, torch.float32)
    for path in (hf_dir, paddle_dir):
        model = jaxwint2.load(path, kernels="reference", dtype="float32")
        got = np.asarray(model(ids))
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, f"{path.name}: max rel error {rel:.2e}"


def test_bfloat16_matches_transformers(checkpoint):
    """bf16 against transformers in bf16 (and, tighter, in fp32: we accumulate the MoE combine
    in fp32 where transformers rounds each expert's output to bf16)."""
    hf_dir, _, ids = checkpoint
    got = np.asarray(jaxwint2.load(hf_dir, kernels="reference")(ids))
    for dtype, tol in ((torch.bfloat16, 2.5e-2), (torch.float32, 1.5e-2)):
        want = _hf_logits(hf_dir, ids, dtype)
        rel_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel_l2 <= tol, f"vs transformers {dtype}: rel L2 {rel_l2:.2e}"
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.98
