"""The packaged SmolLM2-135M-Instruct served over HTTP (kept small: one chat, 6 tokens): the
greedy answer through its real chat template equals offline generation."""

from __future__ import annotations

import torch
from http_setup import serve


def test_chat_with_the_packaged_smollm2():
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with serve("smollm2") as server:
        chat = server.client().chat.completions.create(
            model="smollm2", messages=messages, max_tokens=6, temperature=0
        )
    am, tok = server.state.engine.am, server.state.tokenizer  # the engine has stopped
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = am.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6)
    assert chat.choices[0].message.content == tok.decode(
        out[0, len(ids) :], skip_special_tokens=True
    )
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == 6
