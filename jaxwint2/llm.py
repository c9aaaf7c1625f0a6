"""``LLM``: text in, text out, with the same shape of API as vLLM's and FastDeploy's ``LLM``.

Owns the offline front end: load a checkpoint (or the embedded demo model), tokenize prompts
or chat messages with the checkpoint's tokenizer and ERNIE chat template, run
:func:`jaxwint2.generate`, detokenize, apply stop strings and report a finish reason per
completion. Sampling defaults come from the checkpoint's ``generation_config.json``.

It holds no model math and no scheduling: requests of one call run as one static batch (grouped
by their stop-token sets); continuous batching is the serving engine's business.

Example:
  >>> llm = LLM()                                   # the embedded tiny demo model
  >>> out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=32))
  >>> print(out[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

from .generate import generate
from .sampling import SamplingParams
from .tokenizer import Tokenizer


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) or "length"


@dataclasses.dataclass
class RequestOutput:
    """All completions of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


Prompt = str | Sequence[int] | Mapping[str, Sequence[int]]


class LLM:
    """An ERNIE-4.5 MoE checkpoint with its tokenizer, ready to generate.

    Args:
      model: checkpoint directory (converted, Paddle or HF); ``None`` = the embedded demo model
        (:func:`jaxwint2.demo.ensure_demo_model`).
      tensor_parallel_size: devices to shard the model over (:mod:`jaxwint2.parallel`).
      kernels: ``"pallas"``, ``"reference"`` or ``"auto"``.
      dtype: compute dtype, ``"bfloat16"`` or ``"float32"``.
      tokenizer: directory with ``tokenizer.model`` (default: ``model``).

    Example:
      >>> llm = LLM("ERNIE-4.5-21B-A3B-Paddle")
      >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0))
    """

    def __init__(self, model: str | os.PathLike | None = None, *, tensor_parallel_size: int = 1,
                 kernels: str = "auto", dtype: str = "bfloat16",
                 tokenizer: str | os.PathLike | None = None):
        from .load import load

        if model is None:
            from .demo import ensure_demo_model

            model = ensure_demo_model()
        self.path = pathlib.Path(model)
        self.model = load(self.path, kernels=kernels, dtype=dtype,
                          tensor_parallel_size=tensor_parallel_size)
        self.tokenizer = Tokenizer.from_dir(tokenizer or self.path)
        self.default_sampling_params = SamplingParams.from_generation_config(self.path)

    def get_default_sampling_params(self) -> SamplingParams:
        return self.default_sampling_params

    # ------------------------------------------------------------------ generation

    def _prompt_ids(self, i: int, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return None, [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(f"prompts[{i}] must have 'prompt' or 'prompt_token_ids'")
        try:
            return None, [int(t) for t in prompt]
        except TypeError:
            raise ValueError(f"prompts[{i}] must be a string, a list of token ids or a dict, "
                             f"got {type(prompt).__name__}") from None

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or ``{"prompt_token_ids": ...}``)."""
        if isinstance(prompts, str | Mapping) or (
                isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.default_sampling_params
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                             f"{len(prompts)} prompts")
        encoded = [self._prompt_ids(i, p) for i, p in enumerate(prompts)]

        # One row per completion; seeds of the n samples of a request are seed, seed+1, ...
        rows = [(r, j) for r, sp in enumerate(sampling_params) for j in range(sp.n)]
        stop_sets = {r: tuple(sorted({*self.tokenizer.stop_token_ids, *sp.stop_token_ids}))
                     for r, sp in enumerate(sampling_params)}
        results: dict[tuple[int, int], list[int]] = {}
        for stops in sorted(set(stop_sets.values())):
            group = [(r, j) for r, j in rows if stop_sets[r] == stops]
            sps = [sampling_params[r] for r, _ in group]
            seeds = [None if sp.seed is None else sp.seed + j
                     for sp, (_, j) in zip(sps, group, strict=True)]
            if any(s is None for s in seeds):
                fresh = int.from_bytes(os.urandom(4), "little")
                seeds = [fresh + k if s is None else s for k, s in enumerate(seeds)]
            ids = generate(self.model, [encoded[r][1] for r, _ in group],
                           max_new_tokens=max(sp.max_tokens for sp in sps),
                           temperature=[sp.temperature for sp in sps],
                           top_p=[sp.top_p for sp in sps], top_k=[sp.top_k for sp in sps],
                           seed=seeds, stop_token_ids=stops)
            for key, sp, out in zip(group, sps, ids, strict=True):
                results[key] = out if len(out) <= sp.max_tokens else out[: sp.max_tokens]

        outputs = []
        for r, sp in enumerate(sampling_params):
            comps = [self._completion(j, results[(r, j)], sp) for j in range(sp.n)]
            outputs.append(RequestOutput(prompt=encoded[r][0], prompt_token_ids=encoded[r][1],
                                         outputs=comps))
        return outputs

    def _completion(self, index: int, ids: list[int], sp: SamplingParams) -> CompletionOutput:
        text = self.tokenizer.decode(ids)
        finish = "stop" if len(ids) < sp.max_tokens else "length"
        hits = [(text.find(s), s) for s in sp.stop if s and s in text]
        if hits:
            pos, _ = min(hits)
            text, finish = text[:pos], "stop"
            n = 0  # shortest prefix of ids whose text reaches the cut
            while n < len(ids) and len(self.tokenizer.decode(ids[:n])) < pos:
                n += 1
            ids = ids[:n]
        return CompletionOutput(index=index, text=text, token_ids=ids, finish_reason=finish)

    def chat(self, messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Chat completion(s): one conversation (list of messages) or a list of them."""
        if messages and isinstance(messages[0], Mapping):
            messages = [messages]
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt)
                   for m in messages]
        return self.generate(prompts, sampling_params)
