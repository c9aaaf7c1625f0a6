"""Incremental detokenization: multi-byte characters, stop strings, hold-back."""

from serve.detokenizer import IncrementalDetokenizer
from serve.testing import ByteTokenizer

TOK = ByteTokenizer()


def feed(d, text):
    out, stopped = [], False
    for t in TOK.encode(text):
        stopped = d.add(t)
        out.append(d.delta())
        if stopped:
            break
    return out, stopped


def test_multibyte_characters_are_never_split():
    d = IncrementalDetokenizer(TOK, TOK.encode("x"))
    deltas, _ = feed(d, "aé€😀")
    assert "".join(deltas) == "aé€😀"
    assert all("\ufffd" not in s for s in deltas)
    assert deltas[1] == "" and deltas[2] == "é"       # é is 2 bytes: held for one token


def test_stop_string_across_tokens_is_cut_and_held_back():
    d = IncrementalDetokenizer(TOK, [], stop=("END", "\n\n"))
    deltas, stopped = feed(d, "abcENxENDzzz")
    assert stopped and d.text == "abcENx"
    assert "".join(deltas) == "abcENx"
    # "EN" was held back until "x" proved it was not a stop string
    assert deltas[3:6] == ["", "", "ENx"]


def test_final_delta_flushes_held_back_text():
    d = IncrementalDetokenizer(TOK, [], stop=("STOP",))
    feed(d, "abST")
    assert d.text == "abST"
    assert d.delta(final=True) == "ST"


def test_skip_ids_are_not_rendered():
    d = IncrementalDetokenizer(TOK, [], skip_ids=frozenset({2}))
    d.add(TOK.encode("a")[0]), d.add(2)
    assert d.delta() == "a"
