"""Incremental detokenization of a request's output and stop-string matching on the text.

Owns turning a growing list of token ids into text deltas that are safe to send: a token whose
bytes end mid-character (``\\ufffd``) is held until the character completes, SentencePiece's
leading-space handling is kept right by decoding a short window that starts a few tokens back
(including the prompt's last tokens), and when stop strings are set the longest text suffix that
could still grow into one is held back. A matched stop string ends the text just before it.

Knows nothing about the engine, scheduling or HTTP; it needs only ``tokenizer.decode(ids)``.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_CONTEXT = 4   # prompt tokens decoded with the first output tokens (SentencePiece spaces)


class IncrementalDetokenizer:
    """Per-request text state.

    Example:
      >>> d = IncrementalDetokenizer(tok, prompt_ids=[...], stop=("\\n\\n",))
      >>> stopped = d.add(token_id); d.delta()
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], *, stop: Sequence[str] = (),
                 skip_ids: frozenset[int] = frozenset()):
        self._decode = tokenizer.decode
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._skip = skip_ids
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""          # output text so far (ends before a matched stop string)
        self._sent = 0          # characters of ``text`` already returned by ``delta``
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append one generated token; returns True when a stop string has just matched."""
        if self.stopped or token_id in self._skip:
            return self.stopped
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False        # an incomplete character: wait for more bytes
        start = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._stop:
            self._match_stop(start)
        return self.stopped

    def _match_stop(self, new_from: int) -> None:
        lo = max(0, new_from - self._max_stop + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, lo)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def delta(self, final: bool = False) -> str:
        """Text not returned before; holds back a possible stop-string start unless ``final``."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        end = max(end, self._sent)
        out = self.text[self._sent:end]
        self._sent = end
        return out
