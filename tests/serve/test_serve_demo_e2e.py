"""End to end with the real tiny demo model (jaxwint2.demo): uvicorn on loopback, the official
``openai`` client, and the 64-stream disconnect check.

One module-scoped server with one decode and one prefill shape keeps compilation to a minimum:
``/health`` turns ready only after both are compiled, and nothing compiles afterwards.
"""

import httpx
import openai
import pytest

from serve.app import create_app
from serve.engine import EngineConfig, load_engine
from serve.testing import LoopbackServer

CONFIG = EngineConfig(max_num_seqs=64, max_model_len=160, block_size=16, num_blocks=256,
                      max_num_batched_tokens=128, max_prefill_chunk=32, max_prefill_seqs=4,
                      decode_buckets=(64,), prefill_batch_buckets=(4,), prefill_len_buckets=(32,),
                      block_buckets=(10,), warmup="all")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."}]


class DemoServed:
    def __init__(self, url, engine, tokenizer):
        self.url, self.engine, self.tokenizer = url, engine, tokenizer
        self.model_name = "ernie-demo"
        self.base_url = url + "/v1"


@pytest.fixture(scope="module")
def demo():
    engine, tok = load_engine(None, config=CONFIG)
    try:
        with LoopbackServer(create_app(engine, tok, model_name="ernie-demo")) as srv:
            yield DemoServed(srv.url, engine, tok)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(demo):
    return openai.OpenAI(base_url=demo.base_url, api_key="none", max_retries=0, timeout=300)


def test_ready_and_compiled_once(demo, client):
    assert httpx.get(demo.url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == ["ernie-demo"]
    assert demo.engine.stats().num_compilations == 4      # 2 step shapes + 2 sampler sizes


def test_chat_usage_matches_the_tokenizer(demo, client):
    tok = demo.tokenizer
    prompt_len = len(tok.encode(tok.apply_chat_template(CHAT)))
    full = client.chat.completions.create(model="ernie-demo", messages=CHAT, max_tokens=10,
                                          temperature=0)
    c = full.choices[0]
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.total_tokens == prompt_len + full.usage.completion_tokens
    if c.finish_reason == "length":
        assert full.usage.completion_tokens == 10
    else:                                         # eos / <|end_of_sentence|> came first
        assert c.finish_reason == "stop" and 1 <= full.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(
        model="ernie-demo", messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert chunks[-1].usage == full.usage
    assert demo.engine.stats().num_compilations == 4


def test_completions_stop_strings_and_seeds(demo, client):
    tok = demo.tokenizer
    prompt = "The quick brown fox"
    base = client.completions.create(model="ernie-demo", prompt=prompt, max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert base.usage.prompt_tokens == len(tok.encode(prompt))
    assert base.usage.completion_tokens == 24 and base.choices[0].finish_reason == "length"
    assert text == tok.decode(tok.encode(text)) and len(text) > 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model="ernie-demo", prompt=prompt, max_tokens=24,
                                    temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="ernie-demo", prompt=prompt, max_tokens=24,
                                              temperature=0, stop=[stop], stream=True,
                                              extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text
    kw = dict(model="ernie-demo", prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9,
              seed=11, extra_body={"ignore_eos": True})
    assert (client.completions.create(**kw).choices[0].text
            == client.completions.create(**kw).choices[0].text)


def test_64_streams_with_disconnects_demo(demo, concurrency_check):
    concurrency_check(demo, long_tokens=100, max_tokens=6)
    assert demo.engine.stats().num_compilations == 4       # steady state: nothing new
