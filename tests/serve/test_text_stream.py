"""The engine's text stream: incremental detokenization (multi-token UTF-8 characters held
back until complete) and stop strings (text cut before the stop, partial matches held)."""

from __future__ import annotations

import pytest

from splice.serve.detokenize import IncrementalDetokenizer
from splice.serve.stop_strings import StopStringFilter
from tiny_hf import tiny_tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from splice.train.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


def test_multi_token_characters_are_emitted_whole(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    completion = "héllo 日本語 🙂 ok naïve café"
    prompt = tok("Say:").input_ids
    ids = tok(completion, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # "日" is three tokens
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == completion
    assert all("\ufffd" not in d for d in deltas)
    first_of_ri = [tok.decode([i]) for i in ids].index(" \ufffd")
    assert deltas[first_of_ri] == "" and deltas[first_of_ri + 2] == " 日"


def test_leading_spaces_kept_in_context(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    prompt = tok("Once upon a").input_ids
    ids = tok(" time there was", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.add(i) for i in ids] == [" time", " there", " was"]


def test_special_tokens_add_no_text() -> None:
    tok = tiny_tokenizer()
    detok = IncrementalDetokenizer(tok, tok("ab").input_ids)
    assert [detok.add(i) for i in tok("cd").input_ids] == ["c", "d"]
    assert detok.add(tok.eos_token_id) == ""
    assert detok.flush() == ""


def feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool, str]:
    f = StopStringFilter(stops)
    out = []
    for p in pieces:
        out.append(f.push(p))
        if f.stopped:
            break
    return out, f.stopped, f.flush()


def test_stop_string_cut_and_hold_back() -> None:
    # "END" arrives over three pieces: "E" and "EN" are held, nothing after the cut leaks
    assert feed(("END",), ["ab", "cE", "N", "Dxyz"]) == (["ab", "c", "", ""], True, "")
    # a held partial match that turns out not to be one is released with the next piece
    assert feed(("END",), ["abE", "Nx"]) == (["ab", "ENx"], False, "")
    # several stop strings: the earliest match wins
    assert feed(("xyz", "b"), ["axyzb"]) == (["a"], True, "")
    # a match across two pieces, with text after it
    assert feed(("\n\n",), ["one\n", "\ntwo"]) == (["one", ""], True, "")
    # generation ends elsewhere: the held tail is flushed as text
    assert feed(("END",), ["abEN"]) == (["ab"], False, "EN")


def test_no_stop_strings_pass_through() -> None:
    assert feed((), ["a", "END", ""]) == (["a", "END", ""], False, "")
