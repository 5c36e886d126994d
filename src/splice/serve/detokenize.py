"""Incremental detokenization: the text each new token adds to a completion.

Decoding tokens one by one is wrong for byte-level and SentencePiece vocabularies: a UTF-8
character may span several tokens (its first tokens decode to U+FFFD), and a token's leading
space depends on what comes before it. So each step decodes a short window of recent ids
twice, ``ids[prefix:read]`` (already emitted) and ``ids[prefix:]`` (with the new tokens), and
emits the difference; while the new text ends in U+FFFD (an incomplete character) nothing is
emitted and the window grows until the character is complete. The window starts with the
last few prompt tokens, so the first generated token is decoded in context. Each step
decodes O(window) tokens, not the whole completion.

Special tokens (EOS, chat markers) decode to nothing (``skip_special_tokens``).
"""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens kept in front of the first generated one
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) <= len(done) or full.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done) :]

    def flush(self) -> str:
        """At the end: whatever the held tokens decode to (possibly with U+FFFD)."""
        done = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return full[len(done) :] if len(full) > len(done) else ""
