"""The embedded default model: a tiny ERNIE-4.5 MoE checkpoint in FastDeploy's w4w2 Paddle format.

:func:`ensure_demo_model` builds it once, deterministically and in a few seconds, into
``$JAXWINT2_CACHE`` (default ``~/.cache/jaxwint2``) and returns its directory:

* a SentencePiece tokenizer (BPE with byte fallback) trained in-process on
  ``demo_corpus.txt``, shipped with the package, with ERNIE's conventions: unk = pad = 0,
  bos ``<s>`` = 1, eos ``</s>`` = 2, user-defined ``<|begin_of_sentence|>`` /
  ``<|end_of_sentence|>``;
* ``ErnieConfig.tiny`` with the tokenizer's vocabulary: a dense layer, one WINT4 MoE layer and
  WINT2 MoE layers, WINT8 attention and shared experts (the 300B release's mix in miniature);
* random weights with realistic statistics (:func:`jaxwint2.testing.random_params`) written by
  :func:`converters.write_paddle_checkpoint`, plus ``generation_config.json`` and
  ``tokenizer_config.json``.

The weights are random: the model talks gibberish. It exists so that ``python -m jaxwint2`` and
the server run end to end with no download. The build is atomic (temporary directory, then one
rename), so concurrent first runs are safe.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
import shutil
import tempfile

from .config import ErnieConfig, QuantConfig
from .tokenizer import BEGIN_OF_SENTENCE, END_OF_SENTENCE

DEMO_VERSION = 1
DEMO_NAME = f"ernie45-tiny-w4w2-demo-v{DEMO_VERSION}"
VOCAB_SIZE = 1024
SEED = 0


def cache_root() -> pathlib.Path:
    """``$JAXWINT2_CACHE`` or ``~/.cache/jaxwint2``."""
    return pathlib.Path(os.environ.get("JAXWINT2_CACHE")
                        or pathlib.Path.home() / ".cache" / "jaxwint2")


def demo_config(vocab_size: int = VOCAB_SIZE) -> ErnieConfig:
    """The demo's config: ``ErnieConfig.tiny`` (dense 0, WINT4 MoE 1, WINT2 MoE 2-3)."""
    return ErnieConfig.tiny(QuantConfig(dense="wint8", moe="wint2", w4_end_layer=1),
                            vocab_size=vocab_size)


def train_tokenizer(dst: pathlib.Path) -> pathlib.Path:
    """Train the demo SentencePiece model on the packaged corpus -> ``dst/tokenizer.model``.

    Trained in memory (``model_writer``): the file then records no path, so every build of it
    is byte-identical.
    """
    import io

    import sentencepiece as spm

    corpus = importlib.resources.files("jaxwint2").joinpath("demo_corpus.txt").read_text()
    lines = [line for line in corpus.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type="bpe", vocab_size=VOCAB_SIZE, character_coverage=1.0, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # pad shares unk's id 0 (set in the configs)
        user_defined_symbols=[BEGIN_OF_SENTENCE, END_OF_SENTENCE],
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_by_whitespace=True, num_threads=1,
        minloglevel=2)
    (dst / "tokenizer.model").write_bytes(model.getvalue())
    return dst / "tokenizer.model"


def build_demo_model(dst: str | os.PathLike) -> pathlib.Path:
    """Write the demo checkpoint into the (new or empty) directory ``dst``."""
    import converters

    from .testing import random_params
    from .tokenizer import Tokenizer

    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    train_tokenizer(dst)
    tok = Tokenizer.from_dir(dst)
    cfg = demo_config(tok.vocab_size)
    converters.write_paddle_checkpoint(cfg, random_params(cfg, seed=SEED), dst, num_shards=1)
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True,
         "temperature": 0.8, "top_p": 0.8, "max_new_tokens": 64}, indent=2) + "\n")
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Ernie4_5_Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 4096,
         "added_tokens_decoder": {
             str(tok.token_to_id(t)): {"content": t, "special": True}
             for t in (BEGIN_OF_SENTENCE, END_OF_SENTENCE)}}, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
         "additional_special_tokens": [BEGIN_OF_SENTENCE, END_OF_SENTENCE]}, indent=2) + "\n")
    (dst / "README.txt").write_text(
        "jaxwint2 demo model: a tiny ERNIE-4.5 MoE in FastDeploy's w4w2 Paddle format with\n"
        "RANDOM weights (it outputs gibberish) and a SentencePiece tokenizer trained on\n"
        "jaxwint2/demo_corpus.txt. Built by jaxwint2.demo.build_demo_model.\n")
    return dst


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The demo checkpoint's directory, built on first use (atomic, deterministic)."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    dst = root / DEMO_NAME
    if (dst / "config.json").exists() and (dst / "tokenizer.model").exists():
        return dst
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root))
    try:
        build_demo_model(tmp)
        try:
            os.replace(tmp, dst)  # atomic; fails if another process won the race
        except OSError:
            if not (dst / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
