"""``python -m converters.bench_quantize``: end-to-end quality of a quantized tiny model vs bf16.

Owns the model-level quality report of the quantizer: a bf16 checkpoint (by default a tiny random
``transformers`` ERNIE-4.5 MoE saved with ``save_pretrained``) is quantized part by part
(:func:`converters.quantizer.quantize_part`) into several expert formats, every variant
is run with ``jaxwint2``'s model (reference kernels, fp32 activations), and the logits are
compared with the bf16 model's on text the bf16 model itself sampled (so perplexity means
something even for random weights). One JSON line per variant:

* ``rel_logit_error``  ``||logits_q - logits_bf16|| / ||logits_bf16||``
* ``kl``               mean ``KL(p_bf16 || p_q)`` per token (nats)
* ``top1_agreement``   fraction of positions where the arg-max token agrees
* ``ppl`` / ``ppl_bf16`` perplexity of the variant / of the bf16 model on the sampled text

Dense linears are WINT8 in every variant; the variants differ in the routed experts. It knows
no file formats (the converters' reader does) and no model math (the model does).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxwint2.config import QuantConfig
from jaxwint2.model import ErnieForCausalLM

from .loader import load_checkpoint
from .quantizer import quantize_part


def variants(first_moe: int) -> dict[str, QuantConfig]:
    """Expert formats to compare (dense linears WINT8 throughout)."""
    return {
        "wint8": QuantConfig(dense="wint8", moe="wint8"),
        "wint4": QuantConfig(dense="wint8", moe="wint4"),
        "w4w2": QuantConfig(dense="wint8", moe="wint2", w4_end_layer=first_moe),
        "wint2": QuantConfig(dense="wint8", moe="wint2", w4_end_layer=-1),
    }


def sample_text(model, vocab: int, batch: int, length: int, seed: int) -> np.ndarray:
    """Token ids ``[batch, length]`` sampled (temperature 1) from ``model`` after a random token."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length), np.int32)
    tokens[:, 0] = rng.integers(3, vocab, batch)
    for t in range(1, length):  # causal: the padded tail does not change positions < t
        logits = np.asarray(model(jnp.asarray(tokens)), np.float64)[:, t - 1]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        tokens[:, t] = [rng.choice(vocab, p=pi) for pi in p]
    return tokens


def compare(ref_logits: np.ndarray, logits: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Metrics of ``logits`` against ``ref_logits`` (both ``[B, T, V]``) on ``tokens``."""
    lp_ref = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    nxt = jnp.asarray(tokens[:, 1:])[..., None]

    def ppl(lps):
        return float(jnp.exp(-jnp.take_along_axis(lps[:, :-1], nxt, -1).mean()))

    return {
        "rel_logit_error": float(np.linalg.norm(logits - ref_logits)
                                 / np.linalg.norm(ref_logits)),
        "kl": float((jnp.exp(lp_ref) * (lp_ref - lp)).sum(-1).mean()),
        "top1_agreement": float((ref_logits.argmax(-1) == logits.argmax(-1)).mean()),
        "ppl": ppl(lp), "ppl_bf16": ppl(lp_ref),
    }


def run(src: str | None = None, *, batch: int = 8, length: int = 32, seed: int = 0,
        effort: str = "default") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if src is None:
            from jaxwint2.testing import write_hf_checkpoint

            src = str(pathlib.Path(tmp) / "tiny-hf")
            write_hf_checkpoint(src, seed=seed)
        cfg, params, _ = load_checkpoint(src)
    ref = ErnieForCausalLM.from_params(cfg, params, kernels="reference", dtype="float32")
    tokens = sample_text(ref, cfg.vocab_size, batch, length, seed)
    ref_logits = np.asarray(ref(jnp.asarray(tokens)))
    rows = []
    parts = {"embed": params["embed"], "final_norm": params["final_norm"],
             **({} if cfg.tie_word_embeddings else {"lm_head": params["lm_head"]})}
    for name, quant in variants(cfg.moe_layers[0]).items():
        qcfg = cfg.replace(quant=quant)
        qparams = {**parts, "layers": [quantize_part(qcfg, f"layers/{i}", layer, effort=effort)
                                       for i, layer in enumerate(params["layers"])]}
        model = ErnieForCausalLM.from_params(qcfg, qparams, kernels="reference", dtype="float32")
        rows.append({"bench": "model", "variant": name, "quantization_config": quant.to_dict(),
                     "tokens": int(tokens.size), "effort": effort,
                     **compare(ref_logits, np.asarray(model(jnp.asarray(tokens))), tokens)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="quantized vs bf16 model quality (JSON lines)")
    p.add_argument("--src", default=None, help="bf16 checkpoint (default: a tiny random HF one)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--effort", choices=("fast", "default", "best"), default="default")
    a = p.parse_args(argv)
    for row in run(a.src, batch=a.batch, length=a.length, effort=a.effort):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
