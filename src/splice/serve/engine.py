"""`BatchingEngine`: continuous (iteration-level) batching of generation requests over one
`AdapterModel`, each request with its own adapter.

    engine = BatchingEngine(am, tokenizer, max_batch=16)
    engine.start()                                   # the decode loop, on a daemon thread
    handle = engine.submit(GenerationRequest("r1", prompt_ids, adapter="sst"))
    for event in handle: ...                         # TokenEvents (see splice.serve.requests)
    engine.run_between_steps(lambda: am.add_adapter(...)).result()
    engine.stop(drain=True)

Scheduling. One loop on one thread owns the model. Each iteration:

1. runs the functions queued by `run_between_steps` (adapters are added or deleted there,
   never during a forward);
2. ends the running requests that were cancelled ("abort") or whose adapter is gone
   ("error");
3. admits waiting requests first come, first served while fewer than ``max_batch`` run: each
   is prefilled alone (one forward over its prompt, with its adapter, batch of one; the same
   computation as ``am.generate`` for that prompt), its first token is sampled from the
   prefill's last logits, and its KV cache joins the running batch;
4. runs ONE decoding step for all running requests together: a mixed-adapter forward
   (``adapter_names`` = each row's adapter, `splice.adapters.mixed_batch`) of one token per
   row over the batch's KV cache, then samples each row's next token (`splice.serve.sampling`).

Requests that finish leave the batch after the step that finished them, and new ones join
at the next iteration: a long request never holds up a short one, and a new request waits at
most one step plus the prefills ahead of it. Waiting requests are served in submission order
(no priorities, no preemption: a running request keeps its row until it finishes).

KV cache (`splice.serve.kv_batch`). The running rows share one left-padded `DynamicCache`
(rows × heads × T × head dim per layer, T = the longest row; shorter rows padded on the left
and masked out by the attention mask; each row keeps its own position ids). Costs, per layer:
a join copies the batch's cache once (to add the new rows), a leave copies the kept rows once
(and trims columns no row uses), and every step concatenates one column, which copies the
layer's cache (as every Hugging Face decoding loop does). Padding costs attention compute:
rows × (longest row) instead of the sum of the rows' lengths; it shrinks when the longest
row leaves. No paged memory: the cache grows with the batch.

A request ends with "stop" at an EOS id (the tokenizer's, the model config's and generation
config's) or at a stop string (its text ends before the stop string); "length" at
``max_tokens`` or when prompt + completion reach the model's max positions; "abort" when
cancelled or on ``stop(drain=False)``; "error" when its prefill, its step or its sampling
raised: the message is in the event, and the engine goes on serving the other requests (a
failed decoding step ends every row of that step, as the batch's cache is then unknown).

Text is streamed per token (`splice.serve.detokenize`): incomplete UTF-8 characters and text
that may be the start of a stop string are held back (`splice.serve.stop_strings`).

Everything runs under ``torch.inference_mode`` except the ``run_between_steps`` functions
(so adapters added there have ordinary, trainable parameters). The model is put in eval mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from splice.adapters.layer import AdapterStateError
from splice.adapters.mixed_batch import BASE_NAME, plan_rows
from splice.adapters.model import AdapterModel
from splice.serve.detokenize import IncrementalDetokenizer
from splice.serve.kv_batch import KVBatch, check_supported
from splice.serve.requests import EngineError, GenerationRequest, RequestHandle, TokenEvent
from splice.serve.sampling import next_tokens, request_generator
from splice.serve.stop_strings import StopStringFilter


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests in the decoding batch
    waiting: int  # submitted, not yet admitted
    steps: int  # decoding steps run
    tokens_generated: int  # tokens sampled (prefill first tokens included)
    requests_finished: int


class _Sequence:
    """A running request: its handle, sampling state and text state."""

    def __init__(self, handle: RequestHandle, tokenizer: Any, device: torch.device) -> None:
        request = handle.request
        self.handle = handle
        self.request = request
        self.params = request.params
        self.row_adapter = BASE_NAME if request.adapter in (None, BASE_NAME) else request.adapter
        self.generator = request_generator(request.params, device)
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.stops = StopStringFilter(request.params.stop)
        self.generated = 0
        self.last_token = -1  # the token the next step feeds

    def event(self, token: int | None, text: str, finish: str | None = None, error=None) -> None:
        self.handle.push(TokenEvent(self.request.request_id, token, text, finish, error))


def _eos_ids(am: AdapterModel, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    sources = [
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(am, "config", None), "eos_token_id", None),
        getattr(getattr(am, "generation_config", None), "eos_token_id", None),
    ]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class BatchingEngine:
    """Continuous batching over ``am`` (module docstring). ``max_prompt_tokens`` defaults to
    the model's ``max_position_embeddings``."""

    def __init__(
        self,
        am: AdapterModel,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise EngineError(
                f"max_batch must be >= 1, max_queue >= 0 (got {max_batch}, {max_queue})"
            )
        config = am.model.config
        reason = check_supported(DynamicCache(config=config))
        if reason:
            raise EngineError(f"the engine cannot batch this model: {reason}")
        self.am = am.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.max_prompt_tokens = max_prompt_tokens or self.max_positions
        self.vocab_size: int = int(am.model.get_input_embeddings().weight.shape[0])
        self.device = next(am.parameters()).device
        self.eos_ids = _eos_ids(am, tokenizer)

        self._lock = threading.Condition()  # guards the queues and flags below
        self._adapters_lock = threading.RLock()  # adapter changes vs. submit's adapter check
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[_Sequence] = []
        self._batch = KVBatch()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._aborting = False
        self._stopped = False
        self._steps = self._tokens = self._finished = 0

    # -- public API -----------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                len(self._running), len(self._waiting), self._steps, self._tokens, self._finished
            )

    def start(self) -> None:
        with self._lock:
            if self._stopped or self._draining:
                raise EngineError("the engine is stopped: make a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="splice-engine", daemon=True)
            self._thread.start()

    def step(self) -> None:
        """Run one loop iteration on the calling thread (queued calls, admissions, one
        decoding step): for tests and for callers that drive the engine themselves. Refused
        once `start` has started the loop's thread."""
        if self._thread is not None:
            raise EngineError("the engine's thread is running: step() would race it")
        self._run_calls()
        self._safe_iteration()

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        """Queue ``request``; its events arrive on the returned handle (thread-safe).
        Raises `EngineError` before any compute when the request cannot be taken."""
        self._check_request(request)
        handle = RequestHandle(request, loop)
        with self._lock:
            if self._stopped or self._draining:
                raise EngineError("the engine is stopped or shutting down: no new requests")
            if len(self._waiting) >= self.max_queue:
                raise EngineError(
                    f"the queue is full ({self.max_queue} requests waiting): retry later"
                )
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def run_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the engine's thread between two decoding steps (no forward runs
        meanwhile); the future holds its result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                raise EngineError("the engine is stopped")
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Refuse new requests; with ``drain`` finish the running and waiting ones first,
        without it end them all with "abort". Returns whether the loop has ended (within
        ``timeout`` seconds). An engine never started aborts its waiting requests."""
        with self._lock:
            self._draining = True
            self._aborting = self._aborting or not drain
            thread = self._thread
            self._lock.notify_all()
        if thread is None:
            self._shutdown()
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- checks -----------------------------------------------------------------------------

    def _check_request(self, request: GenerationRequest) -> None:
        if not isinstance(request, GenerationRequest):
            raise EngineError(f"expected a GenerationRequest, got {type(request).__name__}")
        ids = request.prompt_ids
        if not ids:
            raise EngineError(f"request {request.request_id!r}: the prompt is empty")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise EngineError(
                f"request {request.request_id!r}: the prompt has {len(ids)} tokens; "
                f"this server takes at most {self.max_prompt_tokens}"
            )
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
        bad = bad or [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(
                f"request {request.request_id!r}: token id {bad[0]!r} is not in the vocabulary "
                f"(0 … {self.vocab_size - 1})"
            )
        self._check_adapter(request.adapter, request.request_id)

    def _check_adapter(self, adapter: str | None, request_id: str) -> None:
        if adapter is None or adapter == BASE_NAME:
            return
        if not isinstance(adapter, str):
            raise EngineError(f"request {request_id!r}: adapter must be a name or None")
        with self._adapters_lock:
            try:
                plan_rows(self.am, [adapter], 1)
            except AdapterStateError as e:
                message = str(e).removeprefix("adapter_names row 0: ")
                raise EngineError(f"request {request_id!r}: {message}") from None

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._run_calls()
            with self._lock:
                if self._aborting:
                    break
                if not self._running and not self._waiting and not self._calls:
                    if self._draining:
                        break
                    self._lock.wait()
                    continue
            self._safe_iteration()
        self._shutdown()

    def _safe_iteration(self) -> None:
        try:
            with torch.inference_mode():
                self._iteration()
        except Exception as e:  # a bug in the bookkeeping: fail the batch, keep serving
            self._fail_running(e)

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with self._adapters_lock:
                    result = fn()
            except BaseException as e:  # handed to the caller
                future.set_exception(e)
            else:
                future.set_result(result)

    def _iteration(self) -> None:
        self._drop_ended()
        self._admit()
        if self._running:
            self._decode_step()

    def _drop_ended(self) -> None:
        """End cancelled rows ("abort") and rows whose adapter was deleted ("error")."""
        keep = []
        for row, seq in enumerate(self._running):
            if seq.handle.cancelled:
                self._finish(seq, None, "", "abort")
            elif seq.row_adapter != BASE_NAME and seq.row_adapter not in self.am.configs:
                self._finish(seq, None, "", "error", f"adapter {seq.row_adapter!r} was deleted")
            else:
                keep.append(row)
        self._keep(keep)

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            seq = _Sequence(handle, self.tokenizer, self.device)
            if handle.cancelled:
                self._finish(seq, None, "", "abort")
                continue
            try:
                batch, token = self._prefill(seq)
            except Exception as e:
                self._finish(seq, None, "", "error", _message(e))
                continue
            if not self._emit(seq, token):
                self._running.append(seq)
                self._batch.join(batch)

    def _prefill(self, seq: _Sequence) -> tuple[KVBatch, int]:
        """Forward the prompt alone; (its cache as a batch of one, its first token)."""
        self._check_adapter(seq.request.adapter, seq.request.request_id)
        ids = torch.tensor([seq.request.prompt_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.am.model.config)
        out = self.am(
            input_ids=ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            adapter_names=[seq.row_adapter],
        )
        (token,) = next_tokens(out.logits[:, -1, :].float(), [seq.params], [seq.generator])
        return KVBatch.of_prefill(cache, torch.ones_like(ids)), token

    def _decode_step(self) -> None:
        running = self._running
        batch = self._batch
        assert batch.cache is not None
        mask, positions = batch.step_inputs()
        ids = torch.tensor([[s.last_token] for s in running], dtype=torch.long, device=self.device)
        try:
            out = self.am(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=batch.cache,
                use_cache=True,
                adapter_names=[s.row_adapter for s in running],
            )
            batch.advance()
            logits = out.logits[:, -1, :].float()
            tokens = next_tokens(
                logits, [s.params for s in running], [s.generator for s in running]
            )
        except Exception as e:
            self._fail_running(e)
            return
        with self._lock:
            self._steps += 1
        keep = []
        for row, (seq, token) in enumerate(zip(running, tokens, strict=True)):
            try:
                finished = self._emit(seq, token)
            except Exception as e:
                self._finish(seq, None, "", "error", _message(e))
                finished = True
            if not finished:
                keep.append(row)
        self._keep(keep)

    def _emit(self, seq: _Sequence, token: int) -> bool:
        """Send ``token``'s event; True when it finished the request."""
        seq.generated += 1
        seq.last_token = token
        with self._lock:
            self._tokens += 1
        if token in self.eos_ids:
            self._finish(seq, token, *self._final_text(seq, "stop"))
            return True
        text = seq.stops.push(seq.detokenizer.add(token))
        if seq.stops.stopped:
            self._finish(seq, token, text, "stop")
            return True
        total = len(seq.request.prompt_ids) + seq.generated
        if seq.generated >= seq.params.max_tokens or (
            self.max_positions is not None and total >= self.max_positions
        ):
            final, reason = self._final_text(seq, "length")
            self._finish(seq, token, text + final, reason)
            return True
        seq.event(token, text)
        return False

    @staticmethod
    def _final_text(seq: _Sequence, reason: str) -> tuple[str, str]:
        """The held text at the end (incomplete characters, a partial stop string) and the
        finish reason ("stop" if the held text completes a stop string)."""
        text = seq.stops.push(seq.detokenizer.flush())
        if seq.stops.stopped:
            return text, "stop"
        return text + seq.stops.flush(), reason

    def _finish(
        self, seq: _Sequence, token: int | None, text: str, reason: str, error: str | None = None
    ) -> None:
        seq.event(token, text, reason, error)
        with self._lock:
            self._finished += 1

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[r] for r in rows]
        self._batch.keep(rows)

    def _fail_running(self, e: Exception) -> None:
        for seq in self._running:
            self._finish(seq, None, "", "error", _message(e))
        self._running = []
        self._batch = KVBatch()

    def _shutdown(self) -> None:
        """End everything still here with "abort" and mark the engine stopped."""
        with self._lock:
            self._stopped = True
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls), deque()
        for seq in self._running:
            self._finish(seq, None, "", "abort")
        self._running, self._batch = [], KVBatch()
        for handle in waiting:
            handle.push(TokenEvent(handle.request.request_id, None, "", "abort"))
            with self._lock:
                self._finished += 1
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineError("the engine stopped before running this"))


def _message(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, EngineError) else f"{type(e).__name__}: {text}"
