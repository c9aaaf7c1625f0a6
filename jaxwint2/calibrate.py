"""Calibration from text: input Hessians ``X^T X / n`` of the WINT2 expert linears.

Owns the capture of calibration activations. Text is tokenized with the source checkpoint's
tokenizer (:mod:`jaxwint2.tokenizer`) and cut into fixed-length sequences; the bf16 source
model is then run **one decoder layer at a time** from the model's own building blocks
(:class:`jaxwint2.decoder.DecoderLayer`, :func:`jaxwint2.moe.route`,
:class:`jaxwint2.moe.Dispatch`), so only one layer's weights and the hidden states
``[tokens, H]`` are ever in memory: the caller streams the parts
(:meth:`Calibrator.observe`) as it reads them and gets back the Hessians of that part's WINT2
linears before it quantizes them. For routed experts only the tokens routed to an expert count
towards its Hessians: ``up_gate`` sees the MoE input (post-attention RMSNorm), ``down`` sees
the SwiGLU output of those tokens.

An expert that saw few tokens would get a nearly singular Hessian, and error feedback fitted to
a handful of tokens does not generalise. Each expert's Hessian is therefore shrunk towards the
layer's all-token Hessian with a prior weight of ``prior_tokens`` tokens::

    H_e = (X_e^T X_e + prior_tokens * H_all) / (n_e + prior_tokens)

This module reads no files besides the tokenizer and the text (the converters' reader gives it
the parts) and knows nothing of the WINT2 encoder; :mod:`converters.quantizer` feeds the
Hessians to the GPTQ-style byte choice (:mod:`converters.encode_gptq`).

Example:
  >>> ids = tokenize_file("ERNIE-4.5-bf16", "calib.txt", max_tokens=8192)   # doctest: +SKIP
  >>> cal = Calibrator(cfg, ids)                                            # doctest: +SKIP
  >>> for part, sub in parts:                                               # doctest: +SKIP
  ...     hessians = cal.observe(part, sub)   # {"layers/7/mlp/experts/up_gate": [E, K, K]}
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ErnieConfig
from .decoder import DecoderLayer
from .formats import WeightFormat
from .layers import Embedding
from .moe import Dispatch, route
from .tokenizer import Tokenizer

Tree = dict[str, Any]
SEQ_LEN = 512
"""Tokens per calibration sequence (the text is cut into rows of this length)."""
PRIOR_TOKENS = 16.0
"""Weight, in tokens, of the layer's all-token Hessian in each expert's (see module doc)."""


# --------------------------------------------------------------------------------------------
# text -> token ids
# --------------------------------------------------------------------------------------------


def read_text(path: str | os.PathLike) -> list[str]:
    """Documents of a calibration file: ``.jsonl`` (the ``"text"`` field of each line) or plain
    text (blank-line separated paragraphs)."""
    path = pathlib.Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' string")
                docs.append(obj["text"])
        return docs
    return [p for p in raw.split("\n\n") if p.strip()]


def tokenize(tokenizer: Tokenizer, docs: list[str], *, max_tokens: int,
             seq_len: int = SEQ_LEN) -> np.ndarray:
    """Documents -> int32 ``[rows, seq_len]``: bos + ids of each document, concatenated, cut.

    At most ``max_tokens`` tokens are kept (rounded down to whole rows; a shorter text gives
    one shorter row). Raises ``ValueError`` if the text has no tokens.
    """
    ids: list[int] = []
    for doc in docs:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(doc))
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("calibration text has no tokens")
    seq_len = min(seq_len, len(ids))
    rows = len(ids) // seq_len
    return np.asarray(ids[: rows * seq_len], np.int32).reshape(rows, seq_len)


def tokenize_file(checkpoint_dir: str | os.PathLike, text_file: str | os.PathLike, *,
                  max_tokens: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """:func:`tokenize` ``text_file`` with the tokenizer of ``checkpoint_dir``."""
    return tokenize(Tokenizer.from_dir(checkpoint_dir), read_text(text_file),
                    max_tokens=max_tokens, seq_len=seq_len)


# --------------------------------------------------------------------------------------------
# layer-by-layer capture
# --------------------------------------------------------------------------------------------


def _expert_grams(x_sorted: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """``X_e^T X_e`` of each expert's contiguous block of sorted rows -> f64 ``[E, K, K]``."""
    x = np.asarray(x_sorted, np.float32)
    ends = np.cumsum(group_sizes)
    out = np.zeros((len(group_sizes), x.shape[1], x.shape[1]), np.float64)
    for e, (lo, hi) in enumerate(zip(ends - group_sizes, ends, strict=True)):
        if hi > lo:
            out[e] = x[lo:hi].T @ x[lo:hi]
    return out


class Calibrator:
    """Runs the bf16 model on calibration tokens part by part and returns Hessians.

    Args:
      cfg: the *source* model config (bf16 or not: the parts are run in fp32 from their bf16
        runtime leaves).
      token_ids: int ``[B, T]`` calibration tokens.
      wanted: ``wanted(layer_index) -> bool``: the MoE layers whose experts need Hessians
        (default: every MoE layer).
      prior_tokens: shrinkage of each expert's Hessian towards the layer's (module doc).
      batch_rows: sequences per forward call (bounds the activation memory).
    """

    def __init__(self, cfg: ErnieConfig, token_ids, *, wanted: Callable[[int], bool] | None = None,
                 prior_tokens: float = PRIOR_TOKENS, batch_rows: int = 8):
        self.cfg = cfg
        self.tokens = np.asarray(token_ids, np.int32)
        if self.tokens.ndim != 2:
            raise ValueError(f"token_ids must be [B, T], got shape {self.tokens.shape}")
        self.wanted = wanted or cfg.is_moe_layer
        self.prior_tokens = float(prior_tokens)
        self.batch_rows = int(batch_rows)
        self.hidden: np.ndarray | None = None  # [B, T, H] fp32, after the last observed layer
        self.fmt = WeightFormat("bf16", "reference")
        self.expert_tokens: dict[int, np.ndarray] = {}  # routed tokens per expert, per layer

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def observe(self, part: str, sub: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Consume one bf16 runtime part (in :func:`jaxwint2.checkpoint.part_names` order).

        Returns ``{"layers/<i>/mlp/experts/up_gate": [E, K, K], ".../down": [E, I, I]}``
        (f32, ``X^T X / n``) for a wanted MoE layer, else ``{}``; advances the hidden states.
        """
        if part == "embed":
            emb = Embedding(sub["weight"])
            self.hidden = np.asarray(emb(jnp.asarray(self.tokens), jnp.float32))
            return {}
        if not part.startswith("layers/"):
            return {}
        if self.hidden is None:
            raise ValueError(f"part {part!r} observed before 'embed'")
        i = int(part.split("/", 1)[1])
        moe = self.cfg.is_moe_layer(i)
        layer = DecoderLayer(self.cfg, _as_f32(sub), moe=moe, dense_fmt=self.fmt,
                             expert_fmt=self.fmt if moe else None)
        capture = moe and self.wanted(i)
        grams = None
        outs = []
        for r0 in range(0, self.tokens.shape[0], self.batch_rows):
            x = jnp.asarray(self.hidden[r0:r0 + self.batch_rows])
            y, g = _layer_step(layer, x, capture)
            outs.append(np.asarray(y))
            if capture:
                grams = g if grams is None else {k: grams[k] + g[k] for k in g}
        self.hidden = np.concatenate(outs)
        if not capture:
            return {}
        return self._finish(i, grams)

    def _finish(self, i: int, grams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = grams["counts"]  # [E]
        self.expert_tokens[i] = counts
        n_all = float(self.num_tokens)
        out = {}
        for name in ("up_gate", "down"):
            per = grams[name]  # [E, K, K]
            prior = per.sum(0) / max(1.0, counts.sum())
            if name == "up_gate":  # every token reaches the MoE input: the layer's Hessian
                prior = grams["all"] / n_all
            p = self.prior_tokens
            h = (per + p * prior[None]) / (counts[:, None, None] + p)
            out[f"layers/{i}/mlp/experts/{name}"] = h.astype(np.float32)
        return out


def _as_f32(tree: Mapping[str, Any]) -> Tree:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(tree))


def _layer_step(layer: DecoderLayer, x: jax.Array, capture: bool):
    """One layer on ``x [b, T, H]`` (fp32): ``(output, grams or None)``.

    When capturing, the layer runs block by block (attention once, then the MoE on its own
    input, as :meth:`DecoderLayer.__call__` composes them) so the grams see exactly what the
    experts see; otherwise the layer itself runs.
    """
    b, t, h = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if not capture:
        return layer(x, positions)[0], None
    attn_out, _ = layer.attn(layer.input_norm(x), positions)
    moe_in = layer.post_attention_norm(x + attn_out)
    y = x + attn_out + layer.mlp(moe_in)
    tokens = moe_in.reshape(b * t, h)
    moe = layer.mlp
    _, experts = route(tokens, moe.router_weight[...], moe.router_bias[...], moe.k)
    dispatch = Dispatch(experts, moe.num_experts)
    x_sorted = dispatch.sort(tokens)  # [N*k, H], rows grouped by expert
    hidden = moe.up_gate.grouped(x_sorted, dispatch.group_sizes, activation="swiglu")
    sizes = np.asarray(dispatch.group_sizes)
    t32 = np.asarray(tokens, np.float32)
    return y, {"up_gate": _expert_grams(np.asarray(x_sorted), sizes),
               "down": _expert_grams(np.asarray(hidden), sizes),
               "all": (t32.T @ t32).astype(np.float64),
               "counts": sizes.astype(np.float64)}
