"""The embedded demo checkpoint, its tokenizer, and the ``LLM`` front end on it."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

import jaxwint2
from jaxwint2 import LLM, SamplingParams, Tokenizer
from jaxwint2.demo import DEMO_NAME, ensure_demo_model
from jaxwint2.tokenizer import BEGIN_OF_SENTENCE, END_OF_SENTENCE


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(demo_dir):
    return Tokenizer.from_dir(demo_dir)


@pytest.fixture(scope="module")
def llm(demo_dir):
    return LLM(demo_dir, kernels="reference")


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.iterdir()) if f.is_file()}


def test_demo_build_is_deterministic_and_cached(demo_dir, tmp_path):
    again = ensure_demo_model(tmp_path)
    assert again.name == DEMO_NAME and _digest(again) == _digest(demo_dir)
    assert ensure_demo_model(tmp_path) == again  # second call: cached, nothing rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    cfg = jaxwint2.ErnieConfig.from_hf_config(
        __import__("json").loads((demo_dir / "config.json").read_text()))
    assert [cfg.expert_format(i) for i in cfg.moe_layers] == ["wint4", "wint2", "wint2"]
    assert cfg.dense_format == "wint8"


def test_tokenizer_conventions_and_round_trip(tok):
    assert (tok.sp.unk_id(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    eos2 = tok.token_to_id(END_OF_SENTENCE)
    assert tok.stop_token_ids == (2, eos2)
    text = "Rivers run to the sea.\n  Naïve café, 3 × 4 = 12 😀"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(f"{BEGIN_OF_SENTENCE}User: hi\n{END_OF_SENTENCE}")
    assert ids[0] == tok.token_to_id(BEGIN_OF_SENTENCE) and ids[-1] == eos2
    assert tok.decode(ids) == "User: hi\n"
    assert tok.decode(ids, skip_special_tokens=False).startswith(BEGIN_OF_SENTENCE)


def test_chat_template_is_ernie_s(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Why?"}]
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello.<|end_of_sentence|>"
        "User: Why?\nAssistant: ")
    assert not tok.apply_chat_template(messages[:2], add_generation_prompt=False).endswith(": ")
    with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_incremental_detokenizer_matches_full_decode(tok):
    text = "The river 😀 runs — naïvely — to the sea."
    ids = tok.encode(text)
    detok = tok.detokenizer()
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)


# Every generation below runs 2 rows with prompts under 16 tokens: one compiled prefill and one
# compiled decode step serve the whole module.


def test_llm_chat_greedy_is_reproducible_and_respects_max_tokens(llm):
    chats = [[{"role": "user", "content": "What is a river?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    a = llm.chat(chats, sp)
    b = llm.chat(chats, sp)
    assert [r.outputs[0].token_ids for r in a] == [r.outputs[0].token_ids for r in b]
    assert a[0].prompt_token_ids == llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(chats[0]))
    out = a[0].outputs[0]
    assert len(out.token_ids) <= 6 and out.text == llm.tokenizer.decode(out.token_ids)
    assert out.finish_reason == ("length" if len(out.token_ids) == 6 else "stop")
    # The same requests through generate() with token ids.
    c = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in a], sp)
    assert [r.outputs[0].token_ids for r in c] == [r.outputs[0].token_ids for r in a]


def test_llm_seeds_n_and_stop_strings(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=11, n=2)
    a, b = (llm.generate("The river", sp)[0] for _ in range(2))
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len(a.outputs) == 2 and a.outputs[0].token_ids != a.outputs[1].token_ids
    text = a.outputs[0].text
    if len(text) >= 3:  # cut at a stop string taken from the middle of the output
        stop = text[1:3]
        cut = llm.generate("The river", sp.replace(stop=(stop,)))[0].outputs[0]
        assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [sp])


def test_load_rejects_tensor_parallel_and_bad_args(demo_dir):
    with pytest.raises((NotImplementedError, ValueError), match="tensor_parallel_size"):
        jaxwint2.load(demo_dir, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="dtype"):
        jaxwint2.load(demo_dir, dtype="int8")
    with pytest.raises(ValueError, match="kernels"):
        jaxwint2.load(demo_dir, kernels="cuda")


def test_main_command_runs_on_the_demo(demo_dir):
    env = {"JAXWINT2_CACHE": str(demo_dir.parent), "PATH": "/usr/bin:/bin",
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "jaxwint2", "--max-tokens", "4", "--kernels",
                        "reference"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Assistant:" in r.stdout and "tokens/s" in r.stdout and "random weights" in r.stdout
    assert np.isfinite(float(r.stdout.split("tokens/s")[0].split("=")[-1]))


def test_converted_checkpoint_loads_like_its_paddle_source(demo_dir, tmp_path):
    converters = pytest.importorskip("converters")
    converters.convert_checkpoint(demo_dir, tmp_path / "converted", progress=False)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    a = np.asarray(jaxwint2.load(demo_dir, kernels="reference")(ids))
    b = np.asarray(jaxwint2.load(tmp_path / "converted", kernels="reference")(ids))
    np.testing.assert_array_equal(a, b)
    assert Tokenizer.from_dir(tmp_path / "converted").encode("river") == \
        Tokenizer.from_dir(demo_dir).encode("river")
