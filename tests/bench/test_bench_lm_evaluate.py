"""The LM pool's scoring (`splice.bench.lm_evaluate`) on hand-computable values."""

from __future__ import annotations

import math

import pytest
import torch

from splice.bench.config import DataSizes
from splice.bench.lm_evaluate import (
    LMEvaluator,
    answer_of,
    exact_match,
    generate_greedy,
    normalized_exact_match,
    normalized_loss,
    prompt_ids,
)
from splice.bench.lm_tasks import LMTaskData, load_examples, split_examples
from splice.train.data import LMExample
from tiny_hf import tiny_llama, tiny_tokenizer


def _model(seed: int = 0):
    return tiny_llama(seed, eos_token_id=2, pad_token_id=0, bos_token_id=1).eval()


def _task(name, kind, examples):
    return LMTaskData(
        name, name, kind, {"train": examples, "validation": examples, "test": examples}
    )


def test_normalized_loss_is_the_share_of_the_experts_gain():
    assert normalized_loss(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert normalized_loss(3.0, 2.0, 2.0) == pytest.approx(1.0)
    assert normalized_loss(3.0, 3.5, 2.0) == pytest.approx(-0.5)  # worse than pretrained
    assert normalized_loss(3.0, 2.5, 3.0) is None  # the expert gained nothing
    assert normalized_loss(3.0, 2.5, 3.2) is None
    assert normalized_exact_match(0.3, 0.6) == pytest.approx(0.5)
    assert normalized_exact_match(0.3, 0.0) is None


def test_exact_match_cuts_at_the_newline_and_strips():
    assert answer_of(" animal\nWord: cat") == "animal"
    gen = [" animal\nWord: x", " food ", "plant", "act"]
    ref = [" animal", "food", " plants", " act"]
    assert exact_match(gen, ref) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_loss_of_a_uniform_model_is_log_vocab():
    """lm_head zeroed: every next-token distribution is uniform over 64 ids, so the loss is
    ln 64 and the perplexity 64; BOS + text + EOS predicts len(text) + 1 tokens."""
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tok = tiny_tokenizer()
    task = _task("t", "lm", [LMExample("", "ab"), LMExample("", "abcd")])
    ev = LMEvaluator(model, tok, [task], max_length=32, batch_size=2, max_new_tokens=4)
    m = ev.score_task("t", "test")
    assert m["loss"] == pytest.approx(math.log(64), abs=1e-5)
    assert m["perplexity"] == pytest.approx(64.0, rel=1e-4)


def test_loss_is_token_weighted_as_transformers_per_example_loss():
    model, tok = _model(1), tiny_tokenizer()
    texts = ["hello there", "ab", "a longer text, with more tokens."]
    task = _task("t", "lm", [LMExample("", t) for t in texts])
    ev = LMEvaluator(model, tok, [task], max_length=64, batch_size=2, max_new_tokens=4)
    total, tokens = 0.0, 0
    for t in texts:
        ids = torch.tensor([[*prompt_ids(tok, t), tok.eos_token_id]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len - 1 tokens
        total += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert ev.score_task("t", "test")["loss"] == pytest.approx(total / tokens, rel=1e-5)


def _argmax_loop(model, tok, prompt, n):
    ids = torch.tensor([prompt_ids(tok, prompt)])
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tok.decode(new, skip_special_tokens=True)


def test_batched_greedy_generation_matches_an_unbatched_argmax_loop():
    model, tok = _model(2), tiny_tokenizer()
    prompts = ["word: dog\ncategory:", "a", "some longer prompt here:"]
    got = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert got == [_argmax_loop(model, tok, p, 6) for p in prompts]


def test_exact_match_task_scores_the_greedy_answers():
    model, tok = _model(3), tiny_tokenizer()
    prompts = ["word: dog\ncategory:", "word: oak\ncategory:"]
    gen = generate_greedy(model, tok, prompts, max_new_tokens=5)
    right = LMExample(prompts[0], " " + answer_of(gen[0]))
    wrong = LMExample(prompts[1], " " + answer_of(gen[1]) + "zz")
    task = _task("em", "exact_match", [right, wrong])
    ev = LMEvaluator(model, tok, [task], max_length=32, batch_size=2, max_new_tokens=5)
    assert ev.score_task("em", "test") == {"exact_match": pytest.approx(0.5)}


def test_user_files_give_the_kind_and_a_seeded_capped_split(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(f"line {i}" for i in range(30)) + "\n")
    kind, ex = load_examples(str(txt))
    assert kind == "lm" and len(ex) == 30
    jl = tmp_path / "q.jsonl"
    jl.write_text('{"prompt": "p", "completion": " a"}\n' * 5)
    assert load_examples(str(jl))[0] == "exact_match"
    parts = split_examples(ex, DataSizes(split_seed=1, train_max=10))
    assert [len(parts[n]) for n in ("train", "validation", "test")] == [10, 3, 3]
    again = split_examples(ex, DataSizes(split_seed=1, train_max=10))
    assert parts == again
    seen = [e.completion for p in parts.values() for e in p]
    assert len(set(seen)) == len(seen)  # disjoint parts
