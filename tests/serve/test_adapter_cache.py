"""The adapter cache: load on first use, LRU eviction under a count and a byte budget, never
evicting a held adapter, one load for concurrent requests, and malformed folders failing
their load only. `run_between_steps` is a stand-in that runs the call on another thread."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch

from splice.adapters import AdapterModel
from splice.serve.adapter_cache import (
    AdapterBusyError,
    AdapterCache,
    AdapterCacheFullError,
    AdapterLoadError,
)
from splice.serve.adapter_sources import AdapterSources, UnknownAdapterError
from tiny_hf import tiny_llama

POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fake-decode")


def _cache(adapter_root, **kw) -> AdapterCache:
    am = AdapterModel(tiny_llama(0, eos_token_id=2, pad_token_id=0, bos_token_id=1).eval())
    calls = []

    def between(fn):
        calls.append(fn)
        return POOL.submit(fn)

    cache = AdapterCache(am, AdapterSources({}, [str(adapter_root)]), between, **kw)
    cache.calls = calls
    return cache


def _bytes(adapter_root, name):
    from splice.peft.files import read_weights

    return sum(t.numel() * t.element_size() for t in read_weights(adapter_root / name).values())


def test_load_on_first_use_and_lru_eviction(adapter_root):
    cache = _cache(adapter_root, max_loaded=2)

    async def go():
        await cache.acquire("lora")
        cache.release("lora")
        assert list(cache.am.configs) == ["lora"] and cache.am.active == []
        await cache.acquire("dora")
        cache.release("dora")
        await cache.acquire("lora")  # a hit: no load; lora becomes the most recent
        cache.release("lora")
        assert cache.loads == 2 and len(cache.calls) == 2
        await cache.acquire("ia3")  # evicts dora, the least recently used
        cache.release("ia3")
        assert list(cache.loaded) == ["lora", "ia3"]
        assert sorted(cache.am.configs) == ["ia3", "lora"] and cache.evictions == 1

    asyncio.run(go())


def test_byte_budget(adapter_root):
    sizes = {n: _bytes(adapter_root, n) for n in ("lora", "dora", "ia3")}
    cache = _cache(adapter_root, max_loaded=8, max_bytes=sizes["lora"] + sizes["ia3"])

    async def go():
        for name in ("lora", "ia3", "dora"):
            await cache.acquire(name)
            cache.release(name)
        # dora did not fit beside lora + ia3; evicting lora (the oldest) made room
        assert cache.loaded_bytes <= cache.max_bytes
        assert "dora" in cache.loaded and "lora" not in cache.loaded

    assert sizes["dora"] < sizes["lora"]  # so that evicting lora alone makes room
    asyncio.run(go())
    small = _cache(adapter_root, max_bytes=sizes["ia3"])
    with pytest.raises(AdapterLoadError, match="more than the server's max_loaded_bytes"):
        asyncio.run(small.acquire("lora"))


def test_a_held_adapter_is_never_evicted(adapter_root):
    cache = _cache(adapter_root, max_loaded=1)

    async def go():
        await cache.acquire("lora")  # held
        with pytest.raises(AdapterCacheFullError, match="in use"):
            await cache.acquire("dora")
        assert list(cache.loaded) == ["lora"] and "lora" in cache.am.configs
        with pytest.raises(AdapterBusyError):
            await cache.unload("lora")
        cache.release("lora")
        await cache.acquire("dora")
        assert list(cache.loaded) == ["dora"]

    asyncio.run(go())


def test_concurrent_requests_share_one_load(adapter_root):
    cache = _cache(adapter_root)

    async def go():
        await asyncio.gather(*(cache.acquire("lora") for _ in range(5)))
        assert cache.loads == 1 and cache.loaded["lora"].users == 5

    asyncio.run(go())


def test_loaded_values_equal_the_folder(adapter_root, reference):
    cache = _cache(adapter_root)
    asyncio.run(cache.acquire("dora"))
    got = dict(cache.am.named_parameters())
    want = dict(reference.named_parameters())
    names = [n for n in got if ".dora." in n or "lora_" in n]
    assert names
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_malformed_folders_fail_their_load_only(adapter_root, tmp_path):
    cache = _cache(adapter_root)
    with pytest.raises(AdapterLoadError, match="adapter 'broken'") as e:
        asyncio.run(cache.acquire("broken"))  # rank 8 config, rank 4 tensors
    assert "shape" in str(e.value)
    assert "broken" not in cache.am.configs and not cache.loaded
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        asyncio.run(cache.load("bad", bad))
    with pytest.raises(UnknownAdapterError):
        asyncio.run(cache.acquire("absent"))
    asyncio.run(cache.acquire("lora"))  # still serving
    assert list(cache.loaded) == ["lora"]
