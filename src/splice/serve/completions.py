"""``/v1/completions`` and ``/v1/chat/completions``: prompts in, OpenAI's bodies out.

Prompts: a completion prompt is text (tokenized with the tokenizer's special tokens, as
vLLM does) or token ids; a chat is rendered by the tokenizer's chat template with the
generation prompt, then tokenized without adding special tokens (the template has them).

Limits (HTTP 400): one choice per prompt (``n`` = 1), at most ``max_prompts`` prompts,
``max_tokens`` at most the server's cap, a prompt of at most ``max_prompt_tokens`` tokens,
and prompt + ``max_tokens`` within the model's context length. ``max_tokens`` defaults to 16
for completions (OpenAI's default) and to the rest of the context, capped, for chats.

Answers: the whole body, or with ``stream: true`` server-sent events, one ``data: {chunk}``
per token event in OpenAI's chunk shapes (``text_completion`` / ``chat.completion.chunk``,
the chat's first chunk carrying ``role``), a usage-only chunk when
``stream_options.include_usage``, and ``data: [DONE]``. An error after the stream started
is sent as a ``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from splice.serve.api_errors import ApiError
from splice.serve.generation import Generation, event_error
from splice.serve.openai_schema import ChatCompletionRequest, CompletionRequest, _Sampling
from splice.serve.requests import EngineError, SamplingParams
from splice.serve.state import ServerState

COMPLETION_DEFAULT_MAX_TOKENS = 16


def _tokenize(state: ServerState, text: str, special: bool) -> list[int]:
    return list(state.tokenizer(text, add_special_tokens=special)["input_ids"])


def completion_prompts(state: ServerState, body: CompletionRequest) -> list[list[int]]:
    prompts = body.prompts()
    if not prompts:
        raise ApiError(400, "prompt is empty", param="prompt")
    if len(prompts) > state.limits.max_prompts:
        raise ApiError(
            400,
            f"{len(prompts)} prompts in one request; this server takes at most "
            f"{state.limits.max_prompts}",
            param="prompt",
        )
    return [_tokenize(state, p, True) if isinstance(p, str) else p for p in prompts]


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    if getattr(state.tokenizer, "chat_template", None) is None:
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = state.tokenizer.apply_chat_template(
            body.template_messages(), tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # a template may refuse a conversation (roles out of order)
        raise ApiError(
            400, f"the chat template refused these messages: {e}", param="messages"
        ) from None
    return _tokenize(state, text, False)


def sampling_params(
    state: ServerState, body: _Sampling, prompts: list[list[int]], default_max: int | None
) -> SamplingParams:
    """The engine's parameters, after the request limits."""
    limits = state.limits
    if body.n != 1:
        raise ApiError(400, "n must be 1 (one choice per prompt)", param="n")
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    longest = max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise ApiError(400, "a prompt has no tokens", param="prompt")
    if limits.max_prompt_tokens is not None and longest > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {longest} tokens; this server takes at most "
            f"{limits.max_prompt_tokens}",
            param="prompt",
            code="prompt_too_long",
        )
    room = None if limits.context_length is None else limits.context_length - longest
    if room is not None and room < 1:
        raise ApiError(
            400,
            f"the prompt has {longest} tokens, the model's context length is "
            f"{limits.context_length}: no room to generate",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = default_max or limits.max_tokens
        max_tokens = min(max_tokens, limits.max_tokens, room if room is not None else max_tokens)
    if max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
            param="max_tokens",
        )
    if room is not None and max_tokens > room:
        raise ApiError(
            400,
            f"this model's maximum context length is {limits.context_length} tokens; "
            f"{longest} in the prompt + {max_tokens} to generate exceed it",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_strings(),
            seed=body.seed,
        )
    except EngineError as e:
        raise ApiError(400, str(e)) from None


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class Completion:
    """Shapes one request's answer (``chat`` picks the chat shapes)."""

    def __init__(self, generation: Generation, chat: bool, include_usage: bool) -> None:
        self.generation = generation
        self.chat = chat
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if self.chat
            else "text_completion"
        )
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.generation.model,
            "choices": choices,
        }

    async def body(self) -> dict[str, Any]:
        """The whole answer (non-streaming)."""
        n = len(self.generation.prompts)
        texts = [""] * n
        reasons: list[str | None] = [None] * n
        async for index, event in self.generation.events():
            texts[index] += event.text
            if event.finished:
                if event.finish_reason == "error":
                    raise event_error(event)
                reasons[index] = event.finish_reason
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None,
                    "finish_reason": reasons[i],
                }
                for i in range(n)
            ]
        else:
            choices = [
                {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                for i in range(n)
            ]
        return {**self._envelope(choices, False), "usage": self.generation.usage.body()}

    async def stream(self) -> AsyncIterator[bytes]:
        """The answer as server-sent events."""
        try:
            if self.chat:
                for i in range(len(self.generation.prompts)):
                    delta = {"role": "assistant", "content": ""}
                    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield _sse(self._envelope([choice], True))
            async for index, event in self.generation.events():
                if event.finish_reason == "error":
                    yield _sse(event_error(event).body())
                    continue
                if not event.text and not event.finished:
                    continue
                if self.chat:
                    delta = {"content": event.text} if event.text else {}
                    choice = {"index": index, "delta": delta}
                else:
                    choice = {"index": index, "text": event.text}
                choice["logprobs"] = None
                choice["finish_reason"] = event.finish_reason
                chunk = self._envelope([choice], True)
                if self.include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            if self.include_usage:
                usage = {**self._envelope([], True), "usage": self.generation.usage.body()}
                yield _sse(usage)
            yield _sse("[DONE]")
        finally:
            await self.generation.close()
