"""An independent float64 NumPy forward pass of ERNIE-4.5 MoE, written from ernie45-architecture.md.

The oracle for the model tests (besides transformers): plain loops and dense float64 weights, no
shared code with ``jaxwint2`` beyond the config object it reads hyper-parameters from. Weights
come in as a dict of dense ``[in, out]`` arrays (already dequantized by the caller):

    embed [V, H], final_norm [H], lm_head [H, V] or None (tied),
    layers[i]: input_norm [H], post_attention_norm [H], qkv [H, (nh + 2 nkv) d], o [nh d, H],
      dense:  up_gate [H, 2I] ([gate | up]), down [I, H]
      MoE:    router [H, E], bias [E], experts_up_gate [E, H, 2Ie], experts_down [E, Ie, H],
              optional shared_up_gate [H, 2Is], shared_down [Is, H]
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, up_gate, down):
    y = x @ up_gate
    n = y.shape[-1] // 2
    return (silu(y[..., :n]) * y[..., n:]) @ down


def rope(x, positions, theta):
    """x [T, heads, d]; adjacent pairs (2j, 2j+1) rotate by pos * theta^(-2j/d)."""
    d = x.shape[-1]
    out = np.empty_like(x)
    for j in range(d // 2):
        ang = positions * theta ** (-2.0 * j / d)  # [T]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[:, :, 2 * j], x[:, :, 2 * j + 1]
        out[:, :, 2 * j] = a * c - b * s
        out[:, :, 2 * j + 1] = b * c + a * s
    return out


def attention(cfg, x, lw, positions):
    t = x.shape[0]
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = x @ lw["qkv"]
    q = qkv[:, : nh * d].reshape(t, nh, d)
    k = qkv[:, nh * d: (nh + nkv) * d].reshape(t, nkv, d)
    v = qkv[:, (nh + nkv) * d:].reshape(t, nkv, d)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    out = np.zeros((t, nh, d))
    for h in range(nh):
        kh = h // (nh // nkv)
        s = q[:, h] @ k[:, kh].T / np.sqrt(d)  # [T, T]
        s = np.where(positions[None, :] <= positions[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, h] = p @ v[:, kh]
    return out.reshape(t, nh * d) @ lw["o"]


def route(cfg, x, router, bias):
    """Per token: (expert ids, renormalised unbiased weights), ties to the lower id."""
    logits = x @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    choices = []
    for i in range(x.shape[0]):
        score = p[i] + bias
        ids = sorted(range(len(score)), key=lambda e: (-score[e], e))[: cfg.moe_k]
        w = p[i, ids] / max(p[i, ids].sum(), 1e-12)
        choices.append((ids, w))
    return choices


def moe(cfg, x, lw):
    out = np.zeros_like(x)
    for i, (ids, w) in enumerate(route(cfg, x, lw["router"], lw["bias"])):
        for e, we in zip(ids, w, strict=True):
            out[i] += we * swiglu(x[i], lw["experts_up_gate"][e], lw["experts_down"][e])
    if "shared_up_gate" in lw:
        out += swiglu(x, lw["shared_up_gate"], lw["shared_down"])
    return out


def forward(cfg, weights, ids) -> np.ndarray:
    """``ids`` int ``[T]`` (one sequence) -> float64 logits ``[T, V]``."""
    w = {k: v for k, v in weights.items()}
    x = np.asarray(w["embed"], np.float64)[np.asarray(ids)]
    positions = np.arange(len(ids), dtype=np.float64)
    for i, lw in enumerate(w["layers"]):
        lw = {k: np.asarray(v, np.float64) for k, v in lw.items()}
        h = x + attention(cfg, rms_norm(x, lw["input_norm"], cfg.rms_norm_eps), lw, positions)
        hn = rms_norm(h, lw["post_attention_norm"], cfg.rms_norm_eps)
        f = moe(cfg, hn, lw) if cfg.is_moe_layer(i) else swiglu(hn, lw["up_gate"], lw["down"])
        x = h + f
    x = rms_norm(x, np.asarray(w["final_norm"], np.float64), cfg.rms_norm_eps)
    head = w["lm_head"] if w.get("lm_head") is not None else np.asarray(w["embed"]).T
    return x @ np.asarray(head, np.float64)
