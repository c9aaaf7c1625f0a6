"""``python -m jaxwint2``: chat once with a model (the embedded demo model by default).

Thin CLI: parse arguments, build :class:`jaxwint2.LLM`, run one chat turn, print the reply and
the decode speed. Everything else lives in the library.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import LLM, SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxwint2", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (converted, Paddle or HF); default: the embedded "
                         "tiny demo model, built on first use")
    ap.add_argument("--prompt", default="Why do towns grow near rivers?")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", choices=("auto", "pallas", "reference"), default="auto")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = ap.parse_args(argv)

    import jax

    from .demo import cache_root

    # Compiled steps persist across runs: the second `python -m jaxwint2` starts in seconds.
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    t0 = time.perf_counter()
    llm = LLM(args.model, kernels=args.kernels, dtype=args.dtype)
    print(f"model: {llm.path} (loaded in {time.perf_counter() - t0:.1f} s)")
    messages = [{"role": "user", "content": args.prompt}]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)

    t0 = time.perf_counter()
    llm.chat(messages, params)  # compiles prefill + decode for these shapes
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = llm.chat(messages, params)[0].outputs[0]
    dt = time.perf_counter() - t0

    print(f"User: {args.prompt}")
    print(f"Assistant: {out.text}")
    print(f"[{len(out.token_ids)} tokens in {dt:.2f} s = {len(out.token_ids) / dt:.1f} tokens/s "
          f"after a {warmup:.1f} s compile/warm-up run; finish_reason={out.finish_reason}]")
    if args.model is None:
        print("[the demo model has random weights: gibberish is the expected output]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
