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
3. admits waiting requests first come, first served while fewer than ``max_batch`` run, and
   prefills them: one forward over their prompts, left-padded to the longest (each row with
   its adapter and its own positions 0 … n−1; groups are split so that rows × longest prompt
   stays within ``prefill_tokens``); each first token is sampled from its row's last logits,
   and the prefilled caches join the running batch. Prompt tuning and prefix tuning rows get
   their virtual tokens / prefix key-values here (`splice.adapters.mixed_prompts.prefill_call`:
   each row numbered as alone); their cache columns stay in the batch's cache, so later steps
   run them as base rows;
4. runs ONE decoding step for all running requests together: a mixed-adapter forward
   (``adapter_names`` = each row's adapter, `splice.adapters.mixed_batch`) of one token per
   row over the batch's KV cache, then samples each row's next token (`splice.serve.sampling`).

Requests that finish leave the batch after the step that finished them, and new ones join
at the next iteration: a long request never holds up a short one, and a new request waits at
most one step plus the prefills ahead of it. Waiting requests are served in submission order
(no priorities, no preemption: a running request keeps its row until it finishes).

KV cache (`splice.serve.kv_batch`). The running rows share one left-padded cache (per layer
rows × kv heads × T × head dim, T = the longest row; shorter rows padded on the left and
masked out by the attention mask; each row keeps its own position ids). Costs, per layer: a
join copies the batch's cache and the new rows once, a leave copies the kept rows once (and
trims the columns no row uses), and a step writes its one new column in place (the layers
keep spare columns, growing by half when full: no per-step copy of the cache, unlike a
plain `DynamicCache`). Padding costs attention compute and memory: rows × (longest row)
instead of the sum of the rows' lengths; it shrinks when the longest row leaves. No paged
memory: the cache grows with the batch.

A request ends (`splice.serve.sequence`) with "stop" at an EOS id (the tokenizer's, the
model config's and generation config's) or at a stop string (its text ends before the stop
string); "length" at ``max_tokens`` or when prompt + completion reach the model's max
positions; "abort" when cancelled or on ``stop(drain=False)``; "error" when its prefill, its
step or its sampling raised: the message is in the event, and the engine goes on serving
the other requests (a failed decoding step ends every row of that step, as the batch's cache
is then unknown).

Text is streamed per token (`splice.serve.detokenize`): incomplete UTF-8 characters and text
that may be the start of a stop string are held back (`splice.serve.stop_strings`).

While the loop runs, it alone runs the model: anything else that touches the model (adding
or deleting an adapter, a forward of one's own) goes through `run_between_steps` (a mixed
forward started from another thread meanwhile is refused, and fails a step).

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
from splice.adapters.mixed_batch import (
    BASE_NAME,
    MixedBatchPlan,
    Segment,
    mixed_forward,
    plan_rows,
)
from splice.adapters.mixed_prompts import prefill_call
from splice.adapters.model import AdapterModel
from splice.serve.kv_batch import KVBatch, check_supported
from splice.serve.requests import EngineError, GenerationRequest, RequestHandle, TokenEvent
from splice.serve.sampling import next_tokens
from splice.serve.sequence import RunningRequest

STOPPED = "the engine is stopped or shutting down: no new requests"


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests in the decoding batch
    waiting: int  # submitted, not yet admitted
    steps: int  # decoding steps run
    tokens_generated: int  # tokens sampled (prefill first tokens included)
    requests_finished: int


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
        prefill_tokens: int = 4096,
    ) -> None:
        config = am.model.config
        max_positions = getattr(config, "max_position_embeddings", None)
        limits = {"max_batch": max_batch, "max_queue": max_queue, "prefill_tokens": prefill_tokens}
        for name, value in [*limits.items(), ("max_prompt_tokens", max_prompt_tokens)]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EngineError(f"{name} must be a positive integer, got {value!r}")
        if max_prompt_tokens and max_positions and max_prompt_tokens > max_positions:
            raise EngineError(
                f"max_prompt_tokens {max_prompt_tokens} exceeds the model's {max_positions} "
                "positions"
            )
        reason = check_supported(DynamicCache(config=config))
        if reason:
            raise EngineError(f"the engine cannot batch this model: {reason}")
        self.am = am.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.max_positions: int | None = max_positions
        self.max_prompt_tokens = max_prompt_tokens or self.max_positions
        self.vocab_size: int = int(am.model.get_input_embeddings().weight.shape[0])
        self.device = next(am.parameters()).device
        self.eos_ids = _eos_ids(am, tokenizer)
        # named compositions: a request's adapter name -> the weighted set its row runs with
        self.compositions: dict[str, tuple[tuple[str, float], ...]] = {}

        self._lock = threading.Condition()  # guards the queues and flags below
        self._adapters_lock = threading.RLock()  # adapter changes vs. submit's adapter check
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[RunningRequest] = []
        self._usable: set[str] = set()  # adapters checked usable since the last call
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

    @property
    def accepting(self) -> bool:
        """Whether `submit` takes requests now (not stopped, not shutting down)."""
        with self._lock:
            return not (self._stopped or self._draining)

    def start(self) -> None:
        with self._lock:
            if self._stopped or self._draining:
                raise EngineError("the engine is stopped: make a new one", "stopped")
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
        if not self.accepting:
            raise EngineError(STOPPED, "stopped")
        self._check_request(request)
        handle = RequestHandle(request, loop)
        with self._lock:
            if self._stopped or self._draining:
                raise EngineError(STOPPED, "stopped")
            if len(self._waiting) >= self.max_queue:
                raise EngineError(
                    f"the queue is full ({self.max_queue} requests waiting): retry later",
                    "queue_full",
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
                raise EngineError("the engine is stopped", "stopped")
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Refuse new requests; with ``drain`` finish the running and waiting ones first,
        without it end them all with "abort". Returns whether the loop has ended (within
        ``timeout`` seconds; False at once when called on the engine's own thread, which
        ends after the current call). An engine never started aborts its waiting requests."""
        with self._lock:
            self._draining = True
            self._aborting = self._aborting or not drain
            thread = self._thread
            self._lock.notify_all()
        if thread is None:
            self._shutdown()
            return True
        if thread is threading.current_thread():  # called from run_between_steps
            return False
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
            raise EngineError(
                f"request {request_id!r}: adapter must be a name or None", "unknown_adapter"
            )
        with self._adapters_lock:
            try:
                plan_rows(self.am, [self._row_entry(adapter)], 1)
            except AdapterStateError as e:
                message = str(e).removeprefix("adapter_names row 0: ")
                raise EngineError(f"request {request_id!r}: {message}", "unknown_adapter") from None

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
                    self._usable.clear()  # fn may change adapters: check them again
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
        """End cancelled requests, running or waiting ("abort"), and rows whose adapter is
        gone or no longer usable in a mixed batch ("error"; checked once per adapter after
        each `run_between_steps` call)."""
        keep = []
        for row, seq in enumerate(self._running):
            if seq.handle.cancelled:
                self._finish(seq, None, "", "abort")
                continue
            problem = self._adapter_problem(seq.row_adapter)
            if problem:
                self._finish(seq, None, "", "error", problem)
            else:
                keep.append(row)
        self._keep(keep)
        with self._lock:  # cancelled while waiting: end now, free their places in the queue
            cancelled = [h for h in self._waiting if h.cancelled]
            if cancelled:
                self._waiting = deque(h for h in self._waiting if not h.cancelled)
        for handle in cancelled:
            self._abort_waiting(handle)

    def _abort_waiting(self, handle: RequestHandle) -> None:
        handle.push(TokenEvent(handle.request.request_id, None, "", "abort"))
        with self._lock:
            self._finished += 1

    def _adapter_problem(self, name: str) -> str | None:
        if name == BASE_NAME or name in self._usable:
            return None
        gone = [
            a for a, _ in self.compositions.get(name, ((name, 1.0),)) if a not in self.am.configs
        ]
        if gone:
            return f"adapter {gone[0]!r} was deleted"
        try:
            plan_rows(self.am, [self._row_entry(name)], 1)
        except AdapterStateError as e:
            return str(e).removeprefix("adapter_names row 0: ")
        self._usable.add(name)
        return None

    def _admit(self) -> None:
        """Take waiting requests (FIFO) into the free rows; prefill them in groups."""
        admitted: list[RunningRequest] = []
        while len(self._running) + len(admitted) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            if handle.cancelled:
                self._abort_waiting(handle)
                continue
            seq = RunningRequest(
                handle, self.tokenizer, self.device, self.eos_ids, self.max_positions
            )
            problem = self._adapter_problem(seq.row_adapter)  # changed since submit?
            if problem:
                self._finish(seq, None, "", "error", problem)
                continue
            admitted.append(seq)
        for group in _prefill_groups(admitted, self.prefill_tokens):
            self._prefill_group(group)

    def _prefill_group(self, group: list[RunningRequest]) -> None:
        """Prefill ``group``, emit each first token, add the unfinished rows to the batch. A
        failed group is retried one request at a time, so an error ends only its request."""
        try:
            batch, tokens = self._prefill(group)
        except Exception as e:
            if len(group) > 1:
                for seq in group:
                    self._prefill_group([seq])
            else:
                self._finish(group[0], None, "", "error", _message(e))
            return
        keep = self._emit_rows(group, tokens)
        self._running.extend(group[row] for row in keep)
        batch.keep(keep)
        self._batch.join(batch)

    def _prefill(self, group: list[RunningRequest]) -> tuple[KVBatch, list[int]]:
        """One forward over the group's prompts, left-padded to the longest (each row with
        its own adapter and positions 0 … n−1); (their caches as a batch, first tokens)."""
        prompts = [s.request.prompt_ids for s in group]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
        }
        cache = DynamicCache(config=self.am.model.config)
        plan = self._plan(group, model_level=True)
        if any(s.row_adapter in self.am.model_adapters for s in group):
            # prompt / prefix tuning rows: their virtual tokens and prefixes enter here
            inputs = prefill_call(self.am, plan, ids, mask)
            prefix = inputs.pop("past_key_values", None)
            cache = cache if prefix is None else prefix
            mask = inputs["attention_mask"]
        with mixed_forward(self.am, plan):
            out = self.am.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        tokens = next_tokens(logits, [s.params for s in group], [s.generator for s in group])
        return KVBatch.of_prefill(cache, mask), tokens

    def _plan(self, rows: list[RunningRequest], model_level: bool) -> MixedBatchPlan:
        """Each row's adapter as a mixed-batch plan, built here from adapters already checked
        (`_adapter_problem`), which saves the per-row checks of `plan_rows` at every step.
        Without ``model_level``, prompt / prefix tuning rows are base rows (they act through
        the prefill only)."""
        segments: dict[tuple[tuple[str, float], ...], list[int]] = {}
        for row, seq in enumerate(rows):
            name = seq.row_adapter
            if name == BASE_NAME or (not model_level and name in self.am.model_adapters):
                continue
            weights = self.compositions.get(name, ((name, 1.0),))
            segments.setdefault(weights, []).append(row)
        return MixedBatchPlan(len(rows), [Segment(w, r) for w, r in segments.items()])

    def _row_entry(self, name: str) -> str | dict[str, float]:
        """``name``'s ``adapter_names`` entry: the name, or a composition's weighted set."""
        weights = self.compositions.get(name)
        return name if weights is None else dict(weights)

    def _forward(self, rows: list[RunningRequest], **inputs: Any) -> Any:
        """A decoding step's forward with each row's adapter (``am(..., adapter_names=...)``
        with the plan of `_plan`)."""
        with mixed_forward(self.am, self._plan(rows, model_level=False)):
            return self.am.model(**inputs)

    def _decode_step(self) -> None:
        running = self._running
        batch = self._batch
        assert batch.cache is not None
        mask, positions = batch.step_inputs()
        ids = torch.tensor([[s.last_token] for s in running], dtype=torch.long, device=self.device)
        try:
            out = self._forward(
                running,
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=batch.cache,
                use_cache=True,
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
        self._keep(self._emit_rows(running, tokens))

    def _emit_rows(self, seqs: list[RunningRequest], tokens: list[int]) -> list[int]:
        """Emit each row's new token; the rows (indices) that go on. A row whose emit fails
        ends with "error" alone."""
        keep = []
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            try:
                finished = self._emit(seq, token)
            except Exception as e:
                self._finish(seq, None, "", "error", _message(e))
                finished = True
            if not finished:
                keep.append(row)
        return keep

    def _emit(self, seq: RunningRequest, token: int) -> bool:
        """Send ``token``'s event; True when it finished the request."""
        text, reason = seq.add(token)
        with self._lock:
            self._tokens += 1
        if reason is not None:
            self._finish(seq, token, text, reason)
            return True
        seq.send(token, text)
        return False

    def _finish(
        self,
        seq: RunningRequest,
        token: int | None,
        text: str,
        reason: str,
        error: str | None = None,
    ) -> None:
        seq.send(token, text, reason, error)
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
            self._abort_waiting(handle)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(
                    EngineError("the engine stopped before running this", "stopped")
                )


def _prefill_groups(seqs: list[RunningRequest], budget: int) -> list[list[RunningRequest]]:
    """Consecutive groups whose padded prompt block (rows × longest prompt) stays within
    ``budget`` tokens (a longer prompt is a group of its own)."""
    groups: list[list[RunningRequest]] = []
    longest = 0
    for seq in seqs:
        n = len(seq.request.prompt_ids)
        if groups and max(longest, n) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(seq)
            longest = max(longest, n)
        else:
            groups.append([seq])
            longest = n
    return groups


def _message(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, EngineError) else f"{type(e).__name__}: {text}"
