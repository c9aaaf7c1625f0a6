"""What the engine knows about one request: its sampling parameters, its state, and its outputs.

Owns the plain-Python records that travel between the HTTP layer, the engine front end and the
engine core: :class:`SamplingParams` (what the client asked for, already validated), the core's
mutable :class:`Request` (tokens so far, how many of them are in the KV cache, its blocks) and the
:class:`RequestOutput` deltas the engine streams back. Knows nothing about HTTP, pydantic, JAX or
the model.
"""

from __future__ import annotations

import dataclasses
import enum
import time


class FinishReason(enum.StrEnum):
    """Why a request stopped (OpenAI's ``finish_reason`` values, plus ``abort``)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request generation settings, validated once at construction.

    Args:
      max_tokens: generate at most this many tokens.
      temperature: 0 means greedy.
      top_p: nucleus mass in (0, 1]; 1.0 disables it.
      top_k: keep the k most likely tokens; 0 disables it.
      seed: makes sampling reproducible and independent of batch mates; ``None`` draws one.
      stop: strings that end the output (excluded from the returned text).
      stop_token_ids: token ids that end the output, on top of the model's end-of-sequence ids.
      ignore_eos: keep going past end-of-sequence tokens (benchmarks).

    Example:
      >>> SamplingParams(max_tokens=16, temperature=0.0, stop=("\\n",)).greedy
      True
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed} must fit in 64 bits")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        # Lists from callers become tuples so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One streamed delta of a request.

    ``token_ids`` and ``text`` are new since the previous delta; ``text`` may lag the tokens when a
    possible stop-string prefix is held back. ``finish_reason`` is set on the last delta only.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclasses.dataclass(eq=False)
class Request:
    """The engine core's view of a request: tokens, cache progress and blocks.

    ``token_ids`` is prompt + generated tokens. The first ``num_computed_tokens`` of them have K/V
    in the cache; a step feeds the next chunk, and when the chunk reaches the end of ``token_ids``
    the step samples one more token. Decode is simply the one-token case, and a preempted request
    resumes by recomputing everything it had (prompt and output alike).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    token_ids: list[int] = dataclasses.field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_tokens_to_compute(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
