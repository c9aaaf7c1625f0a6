"""Test doubles for the serving stack: an integer-exact ``MockModel`` and a ``ByteTokenizer``.

``MockModel`` has the real model's paged step API (``init_cache``, ``step_jit`` with
``tokens/positions/block_tables/cache/logits_at``, ``cfg``) and really uses its cache: each token
writes a value derived from (token, position) into its slot, and the logits of a row are a hash of
every cached value at positions ``<=`` the queried one, read back through the block table. So
wrong block tables, a bad prefix-cache hit or a lost chunk change the output, while the integer
arithmetic makes results exactly independent of batch shape (batch invariance is testable
exactly). ``ByteTokenizer`` maps UTF-8 bytes to ids and knows ERNIE's chat template.

Knows nothing about the engine; it only imitates the model and tokenizer contracts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxwint2.config import ErnieConfig

# ---- tokenizer ----

BYTE_OFFSET = 8
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|begin_of_sentence|>": 3,
            "<|end_of_sentence|>": 4}


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 8) plus ERNIE's special tokens.

    Example:
      >>> tok = ByteTokenizer()
      >>> tok.decode(tok.encode("héllo"))
      'héllo'
    """

    vocab_size = 256 + BYTE_OFFSET
    bos_token_id = SPECIALS["<s>"]
    eos_token_id = SPECIALS["</s>"]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (SPECIALS["</s>"], SPECIALS["<|end_of_sentence|>"])

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in SPECIALS if s.startswith("<|") and s in rest]
            if not hits:
                ids += [b + BYTE_OFFSET for b in rest.encode()]
                break
            i, s = min(hits)
            ids += [b + BYTE_OFFSET for b in rest[:i].encode()] + [SPECIALS[s]]
            rest = rest[i + len(s):]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", "replace")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True
                            ) -> str:
        out = "<|begin_of_sentence|>"
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                out += content + "\n"
            elif role == "user":
                out += "User: " + content + "\n"
            elif role == "assistant":
                out += "Assistant: " + content + "<|end_of_sentence|>"
            else:
                raise ValueError(f"unknown role {role!r}")
        return out + ("Assistant: " if add_generation_prompt else "")


# ---- model ----

@dataclasses.dataclass(frozen=True)
class MockCache:
    k: jax.Array  # int32 [1, num_blocks, block_size, 1, 1]
    v: jax.Array  # int32 [1, num_blocks, block_size, 1, 1]


jax.tree_util.register_dataclass(MockCache, data_fields=["k", "v"], meta_fields=[])


class SyntheticTokenizer(ByteTokenizer):
    """Any id decodes to one byte: a model with random weights emits ids of its whole vocabulary
    (``python -m serve.bench --synthetic``)."""

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", "replace")


def _mix(x: jax.Array) -> jax.Array:
    """An int32 hash (wrapping arithmetic: exact and order-free under addition)."""
    x = x * jnp.int32(-1640531535)
    x = x ^ (x >> 15)
    x = x * jnp.int32(0x2C1B3C6D)
    return x ^ (x >> 13)


class MockModel:
    """Deterministic stand-in for ``jaxwint2``'s model with the same paged step API.

    Args:
      vocab_size: logits width (the tokenizer's vocabulary).
      allowed: token ids the model may emit (default: printable ASCII of :class:`ByteTokenizer`).
      eos_id: the end-of-sequence id, emitted when the queried position reaches ``eos_at``.
      eos_at: position at which the model emits ``eos_id`` (``None``: never).

    Example:
      >>> model = MockModel()
      >>> cache = model.init_cache(num_blocks=8, block_size=4)
      >>> logits, cache = model.step_jit(tokens, positions, block_tables, cache,
      ...                                logits_at=idx)
    """

    cache_dtype_bytes = 4

    def __init__(self, vocab_size: int = ByteTokenizer.vocab_size,
                 allowed: Sequence[int] | None = None, eos_id: int = SPECIALS["</s>"],
                 eos_at: int | None = None):
        self.cfg = ErnieConfig.tiny(vocab_size=vocab_size, num_hidden_layers=1,
                                    num_key_value_heads=1, head_dim=1)
        ids = np.arange(vocab_size)
        allowed = np.asarray(allowed if allowed is not None
                             else ids[(ids >= 32 + BYTE_OFFSET) & (ids < 127 + BYTE_OFFSET)])
        self._allowed = jnp.zeros((vocab_size,), bool).at[allowed].set(True)
        self.eos_id = eos_id
        self.eos_at = eos_at

    def init_cache(self, num_blocks: int, block_size: int) -> MockCache:
        shape = (1, num_blocks, block_size, 1, 1)
        return MockCache(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))

    def step_jit(self, tokens, positions, block_tables, cache: MockCache, *, logits_at=None):
        if logits_at is None:
            logits_at = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
        return _mock_step(tokens, positions, block_tables, cache, logits_at, self._allowed,
                          eos_id=self.eos_id, eos_at=self.eos_at)


@functools.partial(jax.jit, donate_argnums=(3,), static_argnames=("eos_id", "eos_at"))
def _mock_step(tokens, positions, block_tables, cache: MockCache, logits_at, allowed, *,
               eos_id: int, eos_at: int | None):
    """The mock's step, jitted once per process (shared by every MockModel)."""
    _, nb, bs, _, _ = cache.k.shape
    b, _ = tokens.shape
    p = block_tables.shape[1]
    vocab = allowed.shape[0]
    # write: one value per (token, position) into its slot; padding (-1) goes nowhere
    valid = positions >= 0
    safe = jnp.where(valid, positions, 0)
    block = jnp.take_along_axis(block_tables, jnp.minimum(safe // bs, p - 1), axis=1)
    slots = jnp.where(valid, block * bs + safe % bs, nb * bs)             # [B, T]
    values = _mix(tokens * 7919 + positions * 104729 + 1)                  # [B, T]
    k = cache.k.reshape(nb * bs).at[slots.reshape(-1)].set(values.reshape(-1), mode="drop")
    # read: every cached value at positions <= the queried token's position
    q_pos = jnp.take_along_axis(positions, logits_at[:, None], axis=1)     # [B, 1]
    key_pos = jnp.arange(p * bs)[None, :]                                  # [1, P*bs]
    key_slots = (block_tables[:, :, None] * bs + jnp.arange(bs)).reshape(b, p * bs)
    seen = jnp.where(key_pos <= q_pos, _mix(k[key_slots] + key_pos), 0)
    h = _mix(jnp.sum(seen, axis=1))                                        # [B]
    scores = _mix(h[:, None] + jnp.arange(vocab)[None, :] * 31)
    logits = (scores & 0xFFFF).astype(jnp.float32) / 4096.0                # [B, V]
    logits = jnp.where(allowed[None, :], logits, -1e9)
    if eos_at is not None:
        at_end = (q_pos[:, 0] >= eos_at - 1)[:, None]
        logits = jnp.where(at_end & (jnp.arange(vocab) == eos_id), 1e9, logits)
    return logits, MockCache(k.reshape(cache.k.shape), cache.v)


# ---- a real server on loopback ----

class LoopbackServer:
    """Run an ASGI app under uvicorn on ``127.0.0.1`` and a free port, in a thread.

    Example:
      >>> with LoopbackServer(create_app(engine, tok)) as srv:
      ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    """

    def __init__(self, app, *, startup_timeout: float = 30.0):
        import threading

        import uvicorn

        from .app import bind_socket

        self._sock = bind_socket("127.0.0.1", 0)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)
        self._timeout = startup_timeout

    def __enter__(self) -> LoopbackServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


# ---- an engine without a model ----

class FakeEngine:
    """An :class:`~serve.engine.EngineClient` that streams canned outputs (serving-layer tests).

    Args:
      text: the completion every request gets, one character per token.
      fail_after: raise ``failure`` after this many deltas (``None``: never).
      failure: the exception raised mid-stream, or at ``submit`` when ``fail_after == -1``.

    Example:
      >>> app = create_app(FakeEngine("hello"), ByteTokenizer())
    """

    def __init__(self, text: str = "canned", *, fail_after: int | None = None,
                 failure: BaseException | None = None, max_model_len: int = 256):
        from .engine import EngineError

        self.text = text
        self.fail_after = fail_after
        self.failure = failure or EngineError("fake engine failure")
        self._max_model_len = max_model_len
        self.submitted: list[tuple[list[int], object, str]] = []
        self.aborted: list[str] = []

    @property
    def ready(self) -> bool:
        return True

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def submit(self, prompt_ids, params, request_id):
        if self.fail_after == -1:
            raise self.failure
        self.submitted.append((list(prompt_ids), params, request_id))
        return self._stream(len(prompt_ids), params, request_id)

    async def _stream(self, n_prompt, params, request_id):
        from .request import FinishReason, RequestOutput

        text = self.text[:params.max_tokens]
        for i, ch in enumerate(text):
            if self.fail_after is not None and i == self.fail_after:
                raise self.failure
            last = i == len(text) - 1
            reason = (FinishReason.LENGTH if len(text) == params.max_tokens else
                      FinishReason.STOP) if last else None
            yield RequestOutput(request_id, (ord(ch),), ch, n_prompt, i + 1, reason)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self):
        from .engine import EngineStats

        return EngineStats(0, 0, 1, 0, 0, 0.0, 0, 0, 0, 0, 0)
