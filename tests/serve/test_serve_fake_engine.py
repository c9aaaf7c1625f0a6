"""The serving layer over a FakeEngine: canned outputs, engine failures and their status codes."""

import json

import httpx
import pytest

from serve.app import create_app
from serve.engine import EngineError, QueueFullError
from serve.testing import ByteTokenizer, FakeEngine, LoopbackServer


@pytest.fixture
def serve_fake():
    def start(engine):
        return LoopbackServer(create_app(engine, ByteTokenizer(), model_name="fake"))
    return start


def sse_events(resp):
    return [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]


def test_canned_output_n_and_seeds(serve_fake):
    engine = FakeEngine("abcdef")
    with serve_fake(engine) as srv:
        r = httpx.post(srv.url + "/v1/completions",
                       json={"prompt": "xy", "max_tokens": 4, "n": 2, "seed": 5}).json()
    assert [c["text"] for c in r["choices"]] == ["abcd", "abcd"]
    assert [c["finish_reason"] for c in r["choices"]] == ["length", "length"]
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}
    assert [p.seed for _, p, _ in engine.submitted] == [5, 6]      # choice j: seed + j
    assert [rid.rsplit("-", 1)[1] for _, _, rid in engine.submitted] == ["0", "1"]


@pytest.mark.parametrize("failure,status", [(QueueFullError("full"), 503),
                                            (EngineError("dead"), 503),
                                            (ValueError("bad prompt"), 400)])
def test_submit_failures_map_to_status(serve_fake, failure, status):
    with serve_fake(FakeEngine(fail_after=-1, failure=failure)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == status and r.json()["error"]["code"] == status


def test_failure_mid_stream_is_an_error_event_then_done(serve_fake):
    engine = FakeEngine("abcdef", fail_after=3)
    with serve_fake(engine) as srv:
        r = httpx.post(srv.url + "/v1/completions",
                       json={"prompt": "x", "max_tokens": 6, "stream": True})
        full = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 6})
    events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:3]) == "abc"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert full.status_code == 500 and full.json()["error"]["type"] == "server_error"
