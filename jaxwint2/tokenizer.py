"""ERNIE-4.5's SentencePiece tokenizer, its chat template and streaming detokenization.

Owns text <-> ids for a checkpoint directory: ``tokenizer.model`` (SentencePiece), plus the
special tokens declared in ``tokenizer_config.json`` / ``added_tokens.json`` when they are not
pieces of the SentencePiece model. Special-token strings in the input text
(``<|begin_of_sentence|>`` ...) are matched first and map to their single ids; the rest goes
through SentencePiece. Nothing is added automatically (no bos/eos), as
``ernie45-architecture.md`` says.

The chat template (ernie45-architecture.md): ``<|begin_of_sentence|>``, then per message --
system: ``content + "\\n"``; user: ``"User: " + content + "\\n"``; assistant:
``"Assistant: " + content + "<|end_of_sentence|>"`` -- and ``"Assistant: "`` to prompt a reply.
Generation stops on eos and on ``<|end_of_sentence|>``, both looked up, never hard-coded.

This module knows nothing about models or sampling.

Example:
  >>> tok = Tokenizer.from_dir(ckpt)
  >>> ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
  >>> detok = tok.detokenizer()
  >>> for t in stream: print(detok.add([t]), end="")
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

BEGIN_OF_SENTENCE = "<|begin_of_sentence|>"
END_OF_SENTENCE = "<|end_of_sentence|>"
ROLES = ("system", "user", "assistant")


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class Tokenizer:
    """SentencePiece tokenizer with ERNIE's special tokens and chat template.

    Args:
      model_file: path of ``tokenizer.model``.
      added_tokens: extra ``{text: id}`` special tokens (from ``tokenizer_config.json``).
    """

    def __init__(self, model_file: str | os.PathLike,
                 added_tokens: Mapping[str, int] | None = None):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        n = self.sp.get_piece_size()
        specials: dict[str, int] = {}
        for i in range(n):  # control pieces and <|...|> symbols: atomic, matched before SP
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or (piece.startswith("<|") and piece.endswith("|>")):
                specials[piece] = i
        specials.update({str(k): int(v) for k, v in (added_tokens or {}).items()})
        self.special_tokens = specials
        self._id_to_special = {v: k for k, v in specials.items()}
        self._vocab_size = max([n - 1, *specials.values()]) + 1
        pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True) if s)
        self._split = re.compile(f"({pattern})") if pattern else None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``path/tokenizer.model`` and the special tokens declared next to it."""
        path = pathlib.Path(path)
        model = path / "tokenizer.model"
        if not model.exists():
            raise FileNotFoundError(f"no tokenizer.model in {str(path)!r}")
        added: dict[str, int] = {}
        added.update({str(k): int(v) for k, v in _read_json(path / "added_tokens.json").items()})
        decoder = _read_json(path / "tokenizer_config.json").get("added_tokens_decoder", {})
        for i, tok in decoder.items():
            if isinstance(tok, Mapping) and "content" in tok:
                added[tok["content"]] = int(i)
        return cls(model, added)

    # ------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token or SentencePiece piece, ``None`` if unknown."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    @property
    def bos_token_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_token_id(self) -> int:
        return max(self.sp.pad_id(), 0) if self.sp.pad_id() >= 0 else self.sp.unk_id()

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos and ``<|end_of_sentence|>`` (when the vocabulary has it)."""
        ids = [self.eos_token_id]
        eos2 = self.token_to_id(END_OF_SENTENCE)
        if eos2 is not None and eos2 not in ids:
            ids.append(eos2)
        return tuple(i for i in ids if i >= 0)

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special-token strings become their single ids; nothing added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        chunks = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self.special_tokens:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text; special tokens dropped (spelled out with ``skip_special_tokens=False``)."""
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._id_to_special:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._id_to_special[i])
            elif 0 <= i < self.sp.get_piece_size():
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """ERNIE-4.5's chat template (see the module docstring) -> prompt text."""
        out = [BEGIN_OF_SENTENCE]
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
            role, content = m["role"], m["content"]
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]['content'] must be a string")
            if role == "system":
                out.append(content + "\n")
            elif role == "user":
                out.append("User: " + content + "\n")
            elif role == "assistant":
                out.append("Assistant: " + content + END_OF_SENTENCE)
            else:
                raise ValueError(f"messages[{i}]['role']={role!r} must be one of {ROLES}")
        if add_generation_prompt:
            out.append("Assistant: ")
        return "".join(out)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas for streaming.

    Decodes a short trailing window (vLLM's prefix/read offsets) so each call costs O(window),
    and holds text back while the window ends in an incomplete UTF-8 sequence (``\\ufffd``).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, ids: Iterable[int]) -> str:
        """Append ids; return the newly completed text (possibly empty)."""
        self.ids.extend(int(i) for i in ids)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
