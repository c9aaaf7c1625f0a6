"""``python -m serve.bench``: the engine's latency and throughput under load, in-process.

Drives :class:`~serve.engine.Engine` directly (no HTTP, so it runs where FastAPI is absent, e.g.
the GPU machine) with closed-loop clients: at concurrency ``c``, ``c`` workers each send a request,
wait for its last token, and send the next. Prompts are random token ids of a fixed length and
``ignore_eos`` is set, so every request produces exactly ``--max-tokens`` tokens. Each level runs
once untimed (same traffic shape: it compiles every shape the level meets) and then timed; the
timed run reports how many new compilations it saw (0 in steady state).

Reports per level: TTFT (median / p90 / p99), inter-token latency (median / p90 / p99), output
tokens/s, total tokens/s and requests/s, as a table on stdout and one JSON line per level
(``--json FILE`` appends them there too).

Example:
  python -m serve.bench                                   # the embedded demo model
  python -m serve.bench --model /ckpt/ernie-21b-wint2 --concurrency 1,4,16,64 --json bench.jsonl
  python -m serve.bench --mock --concurrency 1,4 --num-prompts 8   # CPU smoke run
  python -m serve.bench --synthetic 21b                   # full-size random weights (GPU)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time

import numpy as np

from .engine import Engine, EngineConfig, load_engine
from .request import SamplingParams


@dataclasses.dataclass
class RequestTiming:
    ttft: float
    itls: list[float]
    num_output_tokens: int
    latency: float


async def _one(engine: Engine, prompt: list[int], params: SamplingParams,
               request_id: str) -> RequestTiming:
    start = time.perf_counter()
    last, first, itls, n = start, None, [], 0
    async for out in engine.submit(prompt, params, request_id):
        if not out.token_ids:
            continue
        now = time.perf_counter()
        if first is None:
            first = now - start
        else:
            itls.append(now - last)
        last = now
        n += len(out.token_ids)
    return RequestTiming(first or 0.0, itls, n, time.perf_counter() - start)


async def run_level(engine: Engine, prompts: list[list[int]], concurrency: int,
                    params: SamplingParams, tag: str) -> tuple[list[RequestTiming], float]:
    """All ``prompts`` through ``concurrency`` closed-loop workers; returns timings and wall."""
    queue = list(enumerate(prompts))[::-1]
    timings: list[RequestTiming] = []

    async def worker():
        while queue:
            i, prompt = queue.pop()
            timings.append(await _one(engine, prompt, params, f"{tag}-{i}"))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


def summarize(timings: list[RequestTiming], wall: float, concurrency: int,
              prompt_len: int) -> dict:
    ttft = np.array([t.ttft for t in timings]) * 1e3
    itl = np.array([x for t in timings for x in t.itls] or [0.0]) * 1e3
    out_tokens = sum(t.num_output_tokens for t in timings)
    # µs resolution: a client that wakes once for several steps' tokens sees gaps of a few µs,
    # which 10 µs rounding reported as 0.0
    pct = lambda a, q: round(float(np.percentile(a, q)), 3)  # noqa: E731
    return {
        "concurrency": concurrency, "requests": len(timings), "prompt_len": prompt_len,
        "output_tokens": out_tokens, "wall_s": round(wall, 3),
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p90": pct(ttft, 90), "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50), "itl_ms_p90": pct(itl, 90), "itl_ms_p99": pct(itl, 99),
        "output_tok_s": round(out_tokens / wall, 1),
        "total_tok_s": round((out_tokens + prompt_len * len(timings)) / wall, 1),
        "req_s": round(len(timings) / wall, 2),
    }


COLUMNS = [("concurrency", "conc"), ("requests", "reqs"), ("ttft_ms_p50", "TTFT p50 ms"),
           ("ttft_ms_p90", "TTFT p90 ms"), ("itl_ms_p50", "ITL p50 ms"),
           ("itl_ms_p90", "ITL p90 ms"), ("itl_ms_p99", "ITL p99 ms"),
           ("output_tok_s", "out tok/s"), ("total_tok_s", "total tok/s"), ("req_s", "req/s"),
           ("new_compilations", "new compiles")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="converted checkpoint (default: demo model)")
    src.add_argument("--mock", action="store_true", help="serve.testing.MockModel (CPU smoke)")
    src.add_argument("--synthetic", choices=("tiny", "21b", "300b"), default=None,
                     help="a full-size model with synthetic weights built on the device "
                          "(jaxwint2.bench), detokenized byte-wise: no checkpoint needed")
    p.add_argument("--kernels", choices=("auto", "pallas", "reference"), default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--concurrency", default="1,4,16,64",
                   help="comma-separated concurrency levels")
    p.add_argument("--num-prompts", type=int, default=0,
                   help="requests per level (default: max(8, 4 x concurrency))")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-mib", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-prefill-chunk", type=int, default=256)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append one JSON line per level to this file")
    return p


def build_engine(args) -> Engine:
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        block_size=args.block_size, kv_cache_bytes=args.kv_cache_memory_mib << 20,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_prefill_chunk=min(args.max_prefill_chunk, args.max_num_batched_tokens),
        enable_prefix_caching=not args.no_prefix_caching, max_waiting=1 << 20, warmup="none")
    if args.mock:
        from .testing import ByteTokenizer, MockModel

        return Engine(MockModel(), ByteTokenizer(), config).start()
    if args.synthetic:
        from jaxwint2.bench import PRESETS, synthetic_params
        from jaxwint2.model import ErnieForCausalLM

        from .testing import SyntheticTokenizer

        cfg = PRESETS[args.synthetic]()
        model = ErnieForCausalLM(cfg, synthetic_params(cfg), kernels=args.kernels,
                                 dtype="bfloat16", donate_stacks=True)
        return Engine(model, SyntheticTokenizer(), config).start()
    engine, _ = load_engine(args.model, kernels=args.kernels,
                            tensor_parallel_size=args.tensor_parallel_size, config=config)
    return engine


async def sweep(engine: Engine, args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        n = args.num_prompts or max(8, 4 * c)

        def prompts(k):
            return [rng.integers(16, vocab, args.prompt_len).tolist() for _ in range(k)]

        # an untimed pass of the same traffic compiles every shape this level meets
        await run_level(engine, prompts(n), c, params, f"warm{c}")
        before = engine.stats().num_compilations
        timings, wall = await run_level(engine, prompts(n), c, params, f"c{c}")
        row = summarize(timings, wall, c, args.prompt_len)
        row["new_compilations"] = engine.stats().num_compilations - before
        row["model"] = ("mock" if args.mock else f"synthetic-{args.synthetic}"
                        if args.synthetic else (args.model or "demo"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    engine = build_engine(args)
    print(f"# engine ready in {time.perf_counter() - t0:.1f} s: {engine.num_blocks} KV blocks "
          f"of {args.block_size} tokens", file=sys.stderr, flush=True)
    try:
        rows = asyncio.run(sweep(engine, args))
    finally:
        engine.shutdown()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
