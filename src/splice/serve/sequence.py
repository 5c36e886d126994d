"""A running request's state in the engine: its sampling generator, its text stream and the
rule that ends it.

Each generated token goes through `RunningRequest.add`, which returns the text the token adds
and, when the token ends the request, the finish reason:

- an EOS id: "stop"; the token is reported but adds no text (held text is released);
- a stop string completed by the token's text: "stop"; the text ends before the stop string;
- ``max_tokens`` tokens, or prompt + completion reaching the model's positions: "length"
  (held text is released: incomplete characters as U+FFFD, a partial stop string as text).
"""

from __future__ import annotations

from typing import Any

import torch

from splice.adapters.mixed_batch import BASE_NAME
from splice.serve.detokenize import IncrementalDetokenizer
from splice.serve.requests import RequestHandle, TokenEvent
from splice.serve.sampling import request_generator
from splice.serve.stop_strings import StopStringFilter


class RunningRequest:
    def __init__(
        self,
        handle: RequestHandle,
        tokenizer: Any,
        device: torch.device,
        eos_ids: frozenset[int],
        max_positions: int | None,
    ) -> None:
        self.handle = handle
        self.request = request = handle.request
        self.params = request.params
        self.row_adapter = BASE_NAME if request.adapter in (None, BASE_NAME) else request.adapter
        self.generator = request_generator(request.params, device)
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.stops = StopStringFilter(request.params.stop)
        self.eos_ids = eos_ids
        self.max_positions = max_positions
        self.generated = 0
        self.last_token = -1  # the token the next decoding step feeds

    def add(self, token: int) -> tuple[str, str | None]:
        """Record ``token``: (the text it adds, the finish reason or None)."""
        self.generated += 1
        self.last_token = token
        if token in self.eos_ids:
            return self._final_text("", "stop")
        text = self.stops.push(self.detokenizer.add(token))
        if self.stops.stopped:
            return text, "stop"
        total = len(self.request.prompt_ids) + self.generated
        if self.generated >= self.params.max_tokens or (
            self.max_positions is not None and total >= self.max_positions
        ):
            return self._final_text(text, "length")
        return text, None

    def _final_text(self, text: str, reason: str) -> tuple[str, str]:
        """``text`` and the held text at the end, and the finish reason ("stop" if the held
        text completes a stop string)."""
        text += self.stops.push(self.detokenizer.flush())
        if self.stops.stopped:
            return text, "stop"
        return text + self.stops.flush(), reason

    def send(
        self, token: int | None, text: str, finish: str | None = None, error: str | None = None
    ) -> None:
        self.handle.push(TokenEvent(self.request.request_id, token, text, finish, error))
