"""Shared fixtures of the serving tests: engines over the MockModel behind a loopback server."""

import asyncio
import contextlib
import dataclasses
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.app import create_app
from serve.engine import Engine, EngineConfig
from serve.testing import ByteTokenizer, LoopbackServer, MockModel

MOCK_CONFIG = dict(max_num_seqs=16, max_model_len=512, block_size=8, num_blocks=512,
                   max_num_batched_tokens=128, max_prefill_chunk=64, max_prefill_seqs=4,
                   warmup="none")


@dataclasses.dataclass
class Served:
    url: str
    engine: Engine
    tokenizer: object
    model_name: str

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def mock_server(*, api_key=None, model=None, **engine_kw):
    tok = ByteTokenizer()
    eng = Engine(model or MockModel(), tok, EngineConfig(**{**MOCK_CONFIG, **engine_kw})).start()
    try:
        with LoopbackServer(create_app(eng, tok, model_name="mock", api_key=api_key)) as srv:
            yield Served(srv.url, eng, tok, "mock")
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def served():
    with mock_server() as s:
        yield s


@pytest.fixture(scope="session")
def make_mock_server():
    """``with make_mock_server(api_key=..., **engine_config) as served: ...``"""
    return mock_server


# ---- 64 concurrent streams with disconnects (shared by the mock and demo-model tests) ----

NUM_STREAMS = 64
PERIOD = 16          # request i is request i % PERIOD again (same prompt and max_tokens)


def scrape(url) -> dict[str, float]:
    """``/metrics`` as ``{name[label]...: value}``."""
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + "".join(f"[{v}]" for v in s.labels.values())] = s.value
    return out


async def _stream(client, model, i, *, max_tokens, disconnect_after=None):
    """Stream one completion; returns its text, or None after disconnecting on purpose."""
    key = i % PERIOD
    body = {"model": model, "prompt": f"request {key}: " + "lorem " * (key % 5),
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": disconnect_after is not None}
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text
            text += json.loads(line[6:])["choices"][0]["text"]
            chunks += 1
            if disconnect_after is not None and chunks == disconnect_after:
                return None       # leaving the block closes the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


def _check(served, *, long_tokens, max_tokens=8):
    """Requests ``i % 4 == 0`` ask for ``long_tokens`` (eos ignored), so only an abort can end
    them early; they disconnect after two chunks. The others must match their solo runs."""
    def tokens(i):
        return max_tokens + i % 4

    async def main():
        limits = httpx.Limits(max_connections=NUM_STREAMS + 8)
        async with httpx.AsyncClient(base_url=served.url, timeout=300, limits=limits) as client:
            alone = {i: await _stream(client, served.model_name, i, max_tokens=tokens(i))
                     for i in range(1, PERIOD) if i % 4}
            before = scrape(served.url)
            together = await asyncio.gather(*(
                _stream(client, served.model_name, i, max_tokens=long_tokens,
                        disconnect_after=2) if i % 4 == 0 else
                _stream(client, served.model_name, i, max_tokens=tokens(i))
                for i in range(NUM_STREAMS)))
        return alone, before, together

    alone, before, together = asyncio.run(main())
    for i, text in enumerate(together):
        if i % 4 == 0:
            assert text is None
        else:   # same prompt and max_tokens as its solo run: the greedy output must match
            assert text == alone[i % PERIOD], i

    deadline = time.monotonic() + 60
    while True:
        m = scrape(served.url)
        idle = (m["jaxwint2_kv_cache_blocks_used"] == 0
                and m["jaxwint2_num_requests_running"] == 0
                and m["jaxwint2_num_requests_waiting"] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, m
    assert m["jaxwint2_kv_cache_usage_ratio"] == 0.0
    aborted = (m.get("jaxwint2_request_success_total[abort]", 0)
               - before.get("jaxwint2_request_success_total[abort]", 0))
    assert aborted == NUM_STREAMS // 4
    done = m["jaxwint2_http_requests_total[/v1/completions][200]"]
    assert done >= NUM_STREAMS + len(alone)
    ttfts = (m["jaxwint2_time_to_first_token_seconds_count"]
             - before["jaxwint2_time_to_first_token_seconds_count"])
    assert ttfts == NUM_STREAMS              # the aborted ones got their first token too
    assert m["jaxwint2_inter_token_latency_seconds_count"] > before[
        "jaxwint2_inter_token_latency_seconds_count"]
    assert m["jaxwint2_generation_tokens_total"] > before["jaxwint2_generation_tokens_total"]


@pytest.fixture(scope="session")
def concurrency_check():
    return _check
