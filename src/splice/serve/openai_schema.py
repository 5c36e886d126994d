"""The request bodies the server accepts, with OpenAI's (and vLLM's, for adapters) names.

Strict: an unknown field is a 400 naming it (a client asking for ``logprobs`` or ``tools``
learns at once that they are not served, rather than getting an answer without them), and
numbers must be finite. Sampling fields and their defaults are OpenAI's; ``n`` must be 1.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from splice.numbers import FINITE


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", **FINITE)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``prompt``: a string, a list of token ids, or a list of either (one choice each)."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class LoadLoraRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(_Body):
    """vLLM's ``/v1/unload_lora_adapter`` body (``lora_int_id`` accepted, unused)."""

    lora_name: str
    lora_int_id: int | None = None
