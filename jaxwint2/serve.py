"""``python -m jaxwint2.serve``: the OpenAI-compatible server's command line.

Only parses arguments and calls :func:`serve.app.run`; everything else lives in ``serve``.

Example:
  python -m jaxwint2.serve --port 8180 --max-num-seqs 32      # the embedded demo model
  python -m jaxwint2.serve --model /ckpt/ernie-21b-wint2 --api-key secret
"""

from __future__ import annotations

import argparse
import functools
import logging
import pathlib


def _size(text: str) -> int:
    """``1073741824``, ``512MiB``, ``2GiB`` or ``2GB`` -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxwint2.serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="converted checkpoint directory (default: the embedded demo model)")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8180, help="0 picks a free port")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kernels", choices=("auto", "pallas", "reference"), default="auto")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--kv-cache-memory", type=_size, default="1GiB",
                   help="KV-cache budget (the block count is derived from it)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step (decodes + prefill chunks)")
    p.add_argument("--max-prefill-chunk", type=int, default=256,
                   help="prompt tokens of one request per step (chunked prefill)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests beyond which new ones get 503")
    p.add_argument("--warmup", choices=("auto", "none", "minimal", "all"), default="auto",
                   help="shapes compiled before /health turns ready (auto: all on an "
                        "accelerator, minimal on CPU, where each compilation is slow)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import jax

    from serve.app import run
    from serve.engine import EngineConfig, load_engine

    warmup = args.warmup
    if warmup == "auto":
        warmup = "minimal" if jax.default_backend() == "cpu" else "all"

    config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        block_size=args.block_size, kv_cache_bytes=args.kv_cache_memory,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_prefill_chunk=min(args.max_prefill_chunk, args.max_num_batched_tokens),
        max_waiting=args.max_waiting, enable_prefix_caching=args.enable_prefix_caching,
        warmup=warmup)
    name = args.served_model_name or (pathlib.Path(args.model).name if args.model
                                      else "ernie-4.5-demo")
    loader = functools.partial(load_engine, args.model, kernels=args.kernels,
                               tensor_parallel_size=args.tensor_parallel_size, config=config)
    run(loader=loader, host=args.host, port=args.port, model_name=name, api_key=args.api_key,
        log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
