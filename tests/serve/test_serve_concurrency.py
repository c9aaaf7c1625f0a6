"""64 simultaneous streams, a quarter of them disconnecting mid-stream.

Every other request completes with exactly the greedy output it has when run alone, aborted
requests free their KV blocks, and ``/metrics`` returns to the idle baseline.
"""

import asyncio
import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

NUM_REQUESTS = 64
MAX_TOKENS = 12
LONG_TOKENS = 300


def metrics(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"[{v}]" for v in s.labels.values())
            out[key] = s.value
    return out


def body(i, model, max_tokens):
    prompt = f"request {i}: " + "lorem ipsum " * (i % 5)
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}


async def stream(client, i, model, disconnect_after=None):
    # a disconnecting request asks for many tokens, so it can only end early by an abort
    max_tokens = LONG_TOKENS if disconnect_after else MAX_TOKENS + i % 4
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions",
                             json=body(i, model, max_tokens)) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"]
            chunks += 1
            if disconnect_after is not None and chunks == disconnect_after:
                return None          # leaving the block closes the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


def run_concurrency(served):
    async def main():
        limits = httpx.Limits(max_connections=NUM_REQUESTS + 8)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            alone = [await stream(client, i, served.model_name) for i in range(NUM_REQUESTS) if i % 4 != 0]
            before = metrics(served.url)
            together = await asyncio.gather(*(
                stream(client, i, served.model_name, disconnect_after=2 if i % 4 == 0 else None)
                for i in range(NUM_REQUESTS)))
        return alone, before, together

    alone, before, together = asyncio.run(main())
    kept = [t for i, t in enumerate(together) if i % 4 != 0]
    assert all(t is None for i, t in enumerate(together) if i % 4 == 0)
    assert kept == alone
    assert all(len(t) >= MAX_TOKENS for t in alone)

    deadline = time.monotonic() + 30
    while True:
        m = metrics(served.url)
        idle = (m["jaxwint2_kv_cache_blocks_used"] == 0 and m["jaxwint2_num_requests_running"] == 0
                and m["jaxwint2_num_requests_waiting"] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, m
    aborted = (m.get("jaxwint2_request_success_total[abort]", 0)
               - before.get("jaxwint2_request_success_total[abort]", 0))
    assert aborted == NUM_REQUESTS // 4
    assert m["jaxwint2_kv_cache_usage_ratio"] == 0.0
    assert m["jaxwint2_http_requests_total[/v1/completions][200]"] >= NUM_REQUESTS * 7 // 4


def test_64_streams_with_disconnects_mock(make_mock_server):
    with make_mock_server(max_num_seqs=64, max_num_batched_tokens=256) as served:
        run_concurrency(served)
