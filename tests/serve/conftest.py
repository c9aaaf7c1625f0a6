"""Shared fixtures of the serving tests: engines over the MockModel behind a loopback server."""

import contextlib
import dataclasses

import pytest

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
