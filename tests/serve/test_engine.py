"""`BatchingEngine`: requests with different adapters, prompt lengths and arrival times decode
together, each exactly as ``am.generate`` alone; sampling, stop strings, EOS, max_tokens,
cancel, errors, adapters added between steps, shutdown.

Most tests drive the engine with ``step()`` (one loop iteration on the test's thread), so
which requests share which step is fixed; the threaded loop has its own tests."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_setup import (
    add_adapter,
    drain_events,
    generate_alone,
    model_with_adapters,
    prompt,
    randomize,
    request,
    text,
    tokens,
)

from splice.adapters import make_config
from splice.serve.engine import BatchingEngine
from splice.serve.requests import EngineError
from tiny_hf import tiny_tokenizer


def run_steps(engine: BatchingEngine, handles: dict, events: dict, limit: int = 200) -> None:
    """Step until every handle has its final event; events[rid] collects them."""
    for _ in range(limit):
        for rid, h in handles.items():
            events.setdefault(rid, []).extend(drain_events(h))
        if all(events[rid] and events[rid][-1].finished for rid in handles):
            return
        engine.step()
    raise AssertionError("requests did not finish")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_batch_equals_each_request_alone(arch: str) -> None:
    """Five requests (LoRA, DoRA, IA3, base; prompt lengths 3-11), at most 3 at a time, two
    arriving while the others are mid-decode: each gets the tokens of generate() alone."""
    am = model_with_adapters(arch)
    specs = {  # rid -> (prompt, adapter, max_tokens)
        "r0": (prompt(7, 0), "lora", 12),
        "r1": (prompt(3, 1), None, 9),
        "r2": (prompt(11, 2), "ia3", 10),
        "r3": (prompt(5, 3), "dora", 8),
        "r4": (prompt(9, 4), "__base__", 11),
    }
    want = {rid: generate_alone(am, ids, a, n) for rid, (ids, a, n) in specs.items()}
    # the adapters change what is generated (else this test could not see a wrong adapter)
    for rid in ("r0", "r2", "r3"):
        ids, _, n = specs[rid]
        assert want[rid] != generate_alone(am, ids, None, n), rid

    engine = BatchingEngine(am, tiny_tokenizer(), max_batch=3)
    handles = {rid: engine.submit(request(rid, *specs[rid][:2], max_tokens=specs[rid][2]))
               for rid in ("r0", "r1", "r2")}  # fmt: skip
    events: dict = {}
    for _ in range(3):  # three decoding steps with r0, r1, r2
        engine.step()
    assert engine.stats.steps == 3 and engine.stats.running == 3
    for rid in ("r3", "r4"):  # wait for a free row
        handles[rid] = engine.submit(request(rid, *specs[rid][:2], max_tokens=specs[rid][2]))
    assert engine.stats.waiting == 2
    run_steps(engine, handles, events)
    for rid, evs in events.items():
        assert tokens(evs) == want[rid], rid
        ends_at_eos = want[rid][-1] == 2
        assert evs[-1].finish_reason == ("stop" if ends_at_eos else "length"), rid
        assert text(evs) == tiny_tokenizer().decode(want[rid], skip_special_tokens=True)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.requests_finished) == (0, 0, 5)
    assert stats.tokens_generated == sum(len(w) for w in want.values())


def test_seeded_sampling_is_the_same_alone_and_batched() -> None:
    am = model_with_adapters()
    tok = tiny_tokenizer()
    sampled = {"temperature": 1.3, "top_p": 0.9, "max_tokens": 12, "seed": 7}

    def run(rids_params: dict) -> dict:
        engine = BatchingEngine(am, tok, max_batch=8)
        handles = {rid: engine.submit(request(rid, ids, a, **p))
                   for rid, (ids, a, p) in rids_params.items()}  # fmt: skip
        events: dict = {}
        run_steps(engine, handles, events)
        return {rid: tokens(evs) for rid, evs in events.items()}

    target = (prompt(6, 5), "lora", sampled)
    alone = run({"t": target})["t"]
    others = {f"o{i}": (prompt(4 + i, 10 + i), a, {"temperature": 1.0, "max_tokens": 12})
              for i, a in enumerate(["dora", None, "ia3"])}  # fmt: skip
    batched = run({**others, "t": target})["t"]
    assert batched == alone
    assert run({"t": (target[0], "lora", sampled | {"seed": 8})})["t"] != alone
    assert alone != generate_alone(am, target[0], "lora", 12)  # it did sample


def test_stop_string_cuts_the_text_before_it() -> None:
    am = model_with_adapters()
    tok = tiny_tokenizer()
    ids = prompt(6, 3)
    free = tok.decode(generate_alone(am, ids, "dora", 10), skip_special_tokens=True)
    stop = free[4:6]  # two characters: the match completes across two tokens
    cut = free.index(stop)
    engine = BatchingEngine(am, tok)
    handles = {"s": engine.submit(request("s", ids, "dora", max_tokens=10, stop=("zz", stop)))}
    events: dict = {}
    run_steps(engine, handles, events)
    evs = events["s"]
    assert text(evs) == free[:cut]
    assert evs[-1].finish_reason == "stop"
    assert len(tokens(evs)) == cut + len(stop)  # one character per token


def test_max_tokens_and_eos() -> None:
    am = model_with_adapters()
    tok = tiny_tokenizer()
    ids = prompt(5, 6)
    free = generate_alone(am, ids, "ia3", 10)
    assert 2 not in free[:4]
    engine = BatchingEngine(am, tok)
    handles = {"n": engine.submit(request("n", ids, "ia3", max_tokens=3))}
    events: dict = {}
    run_steps(engine, handles, events)
    assert tokens(events["n"]) == free[:3]
    assert events["n"][-1].finish_reason == "length"

    am.generation_config.eos_token_id = [2, free[2]]  # the third token is now an EOS
    engine = BatchingEngine(am, tok)
    handles = {"e": engine.submit(request("e", ids, "ia3", max_tokens=10))}
    events = {}
    run_steps(engine, handles, events)
    assert tokens(events["e"]) == free[:3]  # the EOS token is reported ...
    assert text(events["e"]) == tok.decode(free[:2])  # ... but adds no text
    assert events["e"][-1].finish_reason == "stop"


def test_cancel_ends_the_request_at_the_next_step() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer())
    keep = engine.submit(request("keep", prompt(4, 1), "lora", max_tokens=6))
    gone = engine.submit(request("gone", prompt(4, 2), "lora", max_tokens=30))
    queued = engine.submit(request("queued", prompt(4, 3), max_tokens=30))
    queued.cancel()  # before admission
    engine.step()
    engine.step()
    gone.cancel()
    engine.step()
    evs = drain_events(gone)
    assert evs[-1].finish_reason == "abort" and evs[-1].token_id is None
    assert len(tokens(evs)) == 3  # the prefill's token and two steps
    assert drain_events(queued)[-1].finish_reason == "abort"
    assert engine.stats.running == 1
    events = {"keep": drain_events(keep)}
    run_steps(engine, {"keep": keep}, events)
    assert events["keep"][-1].finish_reason == "length"


def test_requests_refused_with_clear_messages() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer(), max_queue=1, max_prompt_tokens=8)

    def refused(req, match: str, reason: str) -> None:
        with pytest.raises(EngineError, match=match) as e:
            engine.submit(req)
        assert e.value.reason == reason

    refused(
        request("a", prompt(3, 0), "lorra"),
        r"request 'a': no adapter named 'lorra'.*did you mean 'lora'",
        "unknown_adapter",
    )
    refused(
        request("b", prompt(9, 0)), "prompt has 9 tokens; this server takes at most 8", "invalid"
    )
    refused(request("c", []), "the prompt is empty", "invalid")
    refused(request("d", [5, 64]), "token id 64 is not in the vocabulary", "invalid")
    engine.submit(request("e", prompt(3, 0)))
    refused(request("f", prompt(3, 0)), "queue is full", "queue_full")
    assert engine.accepting
    assert engine.stop()
    assert not engine.accepting
    refused(request("g", prompt(3, 0), "lorra"), "stopped", "stopped")
    assert engine.stats.requests_finished == 1  # "e", aborted: the engine never ran


def test_engine_settings_are_checked() -> None:
    am = model_with_adapters()
    with pytest.raises(EngineError, match="max_batch must be a positive integer, got 0"):
        BatchingEngine(am, tiny_tokenizer(), max_batch=0)
    with pytest.raises(EngineError, match="max_prompt_tokens 65 exceeds the model's 64"):
        BatchingEngine(am, tiny_tokenizer(), max_prompt_tokens=65)


def test_default_prompt_limit_is_the_models_positions() -> None:
    am = model_with_adapters()  # max_position_embeddings 64
    engine = BatchingEngine(am, tiny_tokenizer())
    with pytest.raises(EngineError, match="prompt has 65 tokens; this server takes at most 64"):
        engine.submit(request("a", prompt(65, 0)))
    # a prompt of 62 tokens gets 2 tokens: prompt + completion stay within 64 positions
    handles = {"b": engine.submit(request("b", prompt(62, 0), max_tokens=10))}
    events: dict = {}
    run_steps(engine, handles, events)
    assert len(tokens(events["b"])) == 2 or events["b"][-1].finish_reason == "stop"
    assert events["b"][-1].finish_reason in ("length", "stop")


def test_an_error_in_a_step_ends_its_requests_and_the_engine_goes_on() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer())
    model = am.model
    real_forward = model.forward

    def broken(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 13:  # the prefill of a 13-token prompt
            raise RuntimeError("prefill broke")
        return real_forward(*args, **kwargs)

    model.forward = broken
    ok = engine.submit(request("ok", prompt(5, 0), "lora", max_tokens=4))
    bad = engine.submit(request("bad", prompt(13, 0), "lora", max_tokens=4))
    engine.step()
    assert drain_events(bad)[-1].error == "RuntimeError: prefill broke"
    assert engine.stats.running == 1

    def broken_step(*args, **kwargs):
        raise RuntimeError("step broke")

    model.forward = broken_step
    engine.step()
    last = drain_events(ok)[-1]
    assert (last.finish_reason, last.error) == ("error", "RuntimeError: step broke")
    model.forward = real_forward
    handles = {"after": engine.submit(request("after", prompt(5, 0), "lora", max_tokens=4))}
    events: dict = {}
    run_steps(engine, handles, events)
    assert tokens(events["after"]) == generate_alone(am, prompt(5, 0), "lora", 4)


def test_adapter_added_between_steps_while_requests_run() -> None:
    am = model_with_adapters()
    tok = tiny_tokenizer()
    engine = BatchingEngine(am, tok, max_batch=4)
    engine.start()
    try:
        first = engine.submit(request("first", prompt(5, 1), "lora", max_tokens=20))
        future = engine.run_between_steps(lambda: add_adapter(am, "late", "dora", seed=99))
        assert future.result(timeout=30) is None
        late = engine.submit(request("late", prompt(6, 2), "late", max_tokens=8))
        failing = engine.run_between_steps(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=30)
        got_first, got_late = list(first), list(late)
    finally:
        assert engine.stop(timeout=30)
    assert tokens(got_late) == generate_alone(am, prompt(6, 2), "late", 8)
    assert tokens(got_late) != generate_alone(am, prompt(6, 2), None, 8)
    assert tokens(got_first) == generate_alone(am, prompt(5, 1), "lora", 20)


def test_deleted_adapter_ends_its_running_and_waiting_requests() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer(), max_batch=2)
    doomed = engine.submit(request("d", prompt(5, 1), "ia3", max_tokens=20))
    other = engine.submit(request("o", prompt(5, 2), "lora", max_tokens=5))
    waiting = engine.submit(request("w", prompt(5, 3), "ia3", max_tokens=5))
    engine.step()
    engine.run_between_steps(lambda: am.delete_adapter("ia3"))
    engine.step()
    for handle in (doomed, waiting):
        last = drain_events(handle)[-1]
        assert (last.finish_reason, last.error) == ("error", "adapter 'ia3' was deleted")
    events = {"o": drain_events(other)}
    run_steps(engine, {"o": other}, events)
    assert tokens(events["o"]) == generate_alone(am, prompt(5, 2), "lora", 5)
    with pytest.raises(EngineError, match="no adapter named 'ia3'"):
        engine.submit(request("late", prompt(5, 3), "ia3"))


def test_folded_adapter_is_refused_in_the_batch() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer())
    running = engine.submit(request("r", prompt(5, 1), "lora", max_tokens=20))
    engine.step()
    engine.run_between_steps(lambda: am.fold("lora"))
    engine.step()
    last = drain_events(running)[-1]
    assert last.finish_reason == "error" and "folded" in last.error
    with pytest.raises(EngineError, match="adapter 'lora' is folded"):
        engine.submit(request("late", prompt(5, 3), "lora"))


def test_stop_drain_finishes_in_flight_requests_and_refuses_new_ones() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer(), max_batch=2)
    handles = [engine.submit(request(f"r{i}", prompt(4 + i, i), "lora", max_tokens=6))
               for i in range(3)]  # fmt: skip
    engine.start()
    assert engine.stop(drain=True, timeout=30)
    for h in handles:
        assert list(h)[-1].finish_reason in ("length", "stop")
    with pytest.raises(EngineError, match="stopped"):
        engine.submit(request("late", prompt(4, 0)))
    with pytest.raises(EngineError, match="stopped"):
        engine.start()


def test_stop_without_drain_aborts() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer(), max_batch=1)
    handles = [engine.submit(request(f"r{i}", prompt(4, i), max_tokens=50)) for i in range(3)]
    engine.step()  # r0 runs, r1 and r2 wait
    engine.start()
    assert engine.stop(drain=False, timeout=30)
    assert [list(h)[-1].finish_reason for h in handles][1:] == ["abort", "abort"]


def test_async_handles() -> None:
    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer())
    engine.start()
    ids = [prompt(4 + i, i) for i in range(3)]

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        handles = [engine.submit(request(f"a{i}", p, "lora", max_tokens=5), loop=loop)
                   for i, p in enumerate(ids)]  # fmt: skip

        async def collect(h) -> list[int]:
            return tokens([e async for e in h])

        return await asyncio.gather(*(collect(h) for h in handles))

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == [generate_alone(am, p, "lora", 5) for p in ids]


def test_step_is_refused_while_the_thread_runs() -> None:
    engine = BatchingEngine(model_with_adapters(), tiny_tokenizer())
    engine.start()
    try:
        with pytest.raises(EngineError, match="thread is running"):
            engine.step()
    finally:
        engine.stop()


def test_greedy_on_the_packaged_smollm2() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splice.adapters import AdapterModel, make_config
    from splice.train.models import resolve_model

    folder = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    am = AdapterModel(AutoModelForCausalLM.from_pretrained(folder)).eval()
    am.add_adapter("sst", make_config("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    g = torch.Generator().manual_seed(0)
    for p in am.adapter_parameters("sst"):
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    prompts = {"a": ("The capital of France is", "sst"), "b": ("Once upon a time, a", None),
               "c": ("1, 2, 3,", "sst")}  # fmt: skip
    engine = BatchingEngine(am, tok)
    handles = {rid: engine.submit(request(rid, tok(p).input_ids, a, max_tokens=8))
               for rid, (p, a) in prompts.items()}  # fmt: skip
    events: dict = {}
    run_steps(engine, handles, events)
    for rid, (p, a) in prompts.items():
        want = generate_alone(am, tok(p).input_ids, a, 8)
        assert tokens(events[rid]) == want, rid
        assert text(events[rid]) == tok.decode(want, skip_special_tokens=True)


def test_prefill_groups_keep_within_the_token_budget() -> None:
    """Admitted requests are prefilled in groups of at most ``prefill_tokens`` padded tokens
    (a longer prompt alone); outputs are the same however they are grouped."""
    from splice.serve.engine import _prefill_groups

    am = model_with_adapters()
    engine = BatchingEngine(am, tiny_tokenizer(), prefill_tokens=12)
    specs = [(prompt(n, n), a) for n, a in [(5, "lora"), (6, None), (4, "ia3"), (13, "dora")]]
    handles = {f"p{i}": engine.submit(request(f"p{i}", ids, a, max_tokens=4))
               for i, (ids, a) in enumerate(specs)}  # fmt: skip
    seqs = [type("S", (), {"request": h.request})() for h in handles.values()]
    groups = _prefill_groups(seqs, 12)
    assert [[len(s.request.prompt_ids) for s in g] for g in groups] == [[5, 6], [4], [13]]
    events: dict = {}
    run_steps(engine, handles, events)
    for (ids, a), rid in zip(specs, handles, strict=True):
        assert tokens(events[rid]) == generate_alone(am, ids, a, 4), rid


def test_a_cancelled_waiting_request_frees_its_place_in_the_queue() -> None:
    engine = BatchingEngine(model_with_adapters(), tiny_tokenizer(), max_batch=1, max_queue=1)
    running = engine.submit(request("r", prompt(4, 1), max_tokens=30))
    engine.step()
    waiting = engine.submit(request("w", prompt(4, 2)))
    with pytest.raises(EngineError, match="queue is full"):
        engine.submit(request("x", prompt(4, 3)))
    waiting.cancel()
    engine.step()
    assert drain_events(waiting)[-1].finish_reason == "abort"
    engine.submit(request("x", prompt(4, 3)))
    assert engine.stats.waiting == 1 and not drain_events(running)[-1].finished


def test_a_request_whose_event_loop_closed_is_aborted() -> None:
    """A client gone with its event loop: the engine stops generating for it."""
    engine = BatchingEngine(model_with_adapters(), tiny_tokenizer())
    loop = asyncio.new_event_loop()
    handle = engine.submit(request("gone", prompt(4, 1), max_tokens=30), loop=loop)
    loop.close()
    engine.step()  # prefill and one step: the events find the loop closed
    assert handle.cancelled and engine.stats.running == 1
    engine.step()
    assert engine.stats.running == 0 and engine.stats.requests_finished == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_and_prefix_tuning_rows_decode_as_alone(arch: str) -> None:
    """Prompt tuning (virtual tokens) and prefix tuning (key-values) rows next to LoRA and
    base rows, at most 3 at a time so rows join a running batch mid-decode: each request
    gets the greedy tokens of generating it alone with its adapter."""
    am = model_with_adapters(arch)
    am.add_adapter("pt", make_config("prompt_tuning", {"num_virtual_tokens": 3}))
    am.add_adapter("pf", make_config("prefix_tuning", {"num_virtual_tokens": 2}))
    randomize(am.adapter_parameters("pt"), seed=31, scale=1.0)
    randomize(am.adapter_parameters("pf"), seed=32, scale=1.0)
    specs = {  # rid -> (prompt, adapter, max_tokens)
        "r0": (prompt(5, 0), "pt", 8),
        "r1": (prompt(7, 1), "pf", 9),
        "r2": (prompt(4, 2), "lora", 6),
        "r3": (prompt(6, 3), None, 7),
        "r4": (prompt(9, 4), "pt", 8),
        "r5": (prompt(3, 5), "pf", 8),
    }
    want = {rid: generate_alone(am, ids, a, n) for rid, (ids, a, n) in specs.items()}
    for rid in ("r0", "r1", "r4", "r5"):  # the adapters change what is generated
        ids, _, n = specs[rid]
        assert want[rid] != generate_alone(am, ids, None, n), rid
    engine = BatchingEngine(am, tiny_tokenizer(), max_batch=3)
    handles = {rid: engine.submit(request(rid, *specs[rid][:2], max_tokens=specs[rid][2]))
               for rid in specs}  # fmt: skip
    events: dict = {}
    run_steps(engine, handles, events)
    assert {rid: tokens(evs) for rid, evs in events.items()} == want
