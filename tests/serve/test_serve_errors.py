"""Every error class as an OpenAI error body; the server stays healthy after each."""

import asyncio
import threading

import httpx
import pytest

from serve.app import create_app
from serve.testing import ByteTokenizer, LoopbackServer


def assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err


def assert_healthy(url):
    assert httpx.get(url + "/health").status_code == 200
    ok = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


BAD_400 = [
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, "n"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 600}, "prompt"),               # > max_model_len
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, None),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, None),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}, "messages"),
]


@pytest.mark.parametrize("path,body,param", BAD_400, ids=[f"{p}-{b}"[:60] for p, b, _ in BAD_400])
def test_invalid_parameters_are_400(served, path, body, param):
    assert_error(httpx.post(served.url + path, json=body, timeout=30), 400, param)


def test_malformed_json_unknown_routes_and_methods(served):
    for raw in (b"{not json", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'):
        resp = httpx.post(served.url + "/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
        assert_error(resp, 400)
    assert_error(httpx.get(served.url + "/v1/nope"), 404)
    assert_error(httpx.get(served.url + "/v1/completions"), 405)
    resp = httpx.post(served.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert_error(resp, 404, "model")
    assert_healthy(served.url)


def test_api_key(make_mock_server):
    with make_mock_server(api_key="s3cret") as s:
        body = {"prompt": "x", "max_tokens": 2}
        assert_error(httpx.post(s.url + "/v1/completions", json=body), 401)
        assert_error(httpx.post(s.url + "/v1/completions", json=body,
                                headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(s.url + "/v1/models"), 401)
        ok = httpx.post(s.url + "/v1/completions", json=body,
                        headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200      # no key needed
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_full_queue_is_503_and_others_complete(make_mock_server):
    with make_mock_server(max_num_seqs=1, max_waiting=1, max_model_len=1024) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                body = {"prompt": "busy", "max_tokens": 400, "temperature": 0}
                return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                              for _ in range(6)))
        resps = asyncio.run(main())
        codes = sorted(r.status_code for r in resps)
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        for r in resps:
            if r.status_code == 503:
                assert_error(r, 503)
            else:
                assert r.json()["usage"]["completion_tokens"] == 400
        assert_healthy(s.url)


def test_health_is_503_until_the_loader_finishes():
    release = threading.Event()
    tok = ByteTokenizer()

    def loader():
        from serve.engine import Engine, EngineConfig
        from serve.testing import MockModel

        release.wait(30)
        return Engine(MockModel(), tok, EngineConfig(num_blocks=64, warmup="none")).start(), tok

    with LoopbackServer(create_app(loader=loader, model_name="mock")) as srv:
        assert_error(httpx.get(srv.url + "/health"), 503)
        assert_error(httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}), 503)
        release.set()
        for _ in range(300):
            if httpx.get(srv.url + "/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert_healthy(srv.url)
        srv.server.should_exit = True   # lifespan shuts the loaded engine down


def test_non_streaming_disconnect_aborts(make_mock_server):
    with make_mock_server(max_model_len=1024) as s:
        body = {"prompt": "long", "max_tokens": 1000, "temperature": 0}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.3)
        for _ in range(200):
            stats = s.engine.stats()
            if stats.num_running == 0 and stats.num_used_blocks == 0:
                break
            threading.Event().wait(0.02)
        assert stats.num_running == 0 and stats.num_used_blocks == 0
        # it was aborted, not run to its 1000 tokens
        text = httpx.get(s.url + "/metrics").text
        assert 'jaxwint2_request_success_total{finished_reason="abort"} 1.0' in text
        assert_healthy(s.url)
