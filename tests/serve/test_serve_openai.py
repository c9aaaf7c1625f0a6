"""The OpenAI API through the official ``openai`` client against a real uvicorn server."""

import httpx
import openai
import pytest

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi!"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)


def chat_prompt_len(served, messages=CHAT):
    tok = served.tokenizer
    return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["mock"]
    assert httpx.get(served.url + "/health").status_code == 200


def test_chat_full_and_streamed_agree_with_usage(served, client):
    full = client.chat.completions.create(model="mock", messages=CHAT, max_tokens=12,
                                          temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert len(choice.message.content) == 12          # byte tokens, printable ASCII
    assert full.usage.prompt_tokens == chat_prompt_len(served)
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(
        model="mock", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_text_ids_batch_and_n(served, client):
    tok = served.tokenizer
    a = client.completions.create(model="mock", prompt="Once upon a time", max_tokens=8,
                                  temperature=0)
    assert a.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert a.usage.completion_tokens == 8 and a.choices[0].finish_reason == "length"
    by_ids = client.completions.create(model="mock", prompt=tok.encode("Once upon a time"),
                                       max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == a.choices[0].text
    batch = client.completions.create(model="mock", prompt=["Once upon a time", "Hi"],
                                      max_tokens=8, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == a.choices[0].text   # greedy
    assert batch.usage.prompt_tokens == a.usage.prompt_tokens + 2
    assert batch.usage.completion_tokens == 32
    streamed = list(client.completions.create(model="mock", prompt="Once upon a time",
                                              max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == a.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_stop_token_ids(served, client):
    base = client.completions.create(model="mock", prompt="stop here", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = base[8:10]
    cut = base[:base.index(stop)]
    got = client.completions.create(model="mock", prompt="stop here", max_tokens=24,
                                    temperature=0, stop=[stop, "never-there"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(cut) + len(stop)
    streamed = list(client.completions.create(model="mock", prompt="stop here", max_tokens=24,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    stop_id = served.tokenizer.encode(base[5])[0]
    by_id = client.completions.create(model="mock", prompt="stop here", max_tokens=24,
                                      temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert by_id.choices[0].finish_reason == "stop"
    assert by_id.choices[0].text == base[:base.index(base[5])]


def test_seeded_sampling_and_n_choices(client):
    kw = dict(model="mock", prompt="random", max_tokens=16, temperature=1.0, top_p=0.95,
              extra_body={"top_k": 40})
    one = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == one
    many = client.completions.create(seed=7, n=3, **kw).choices
    assert many[0].text == one
    assert len({c.text for c in many}) == 3           # choice j uses seed + j
