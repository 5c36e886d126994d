"""API keys: hashes at rest, identification, per-key models, the token-bucket rate limit."""

from __future__ import annotations

import hashlib

import pytest

from splice.serve.api_keys import ApiKeys, ApiKeysError, KeyEntry, hash_key


def test_hash_is_sha256_hex():
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _keys(clock=None, **extra):
    entries = [
        KeyEntry(name="a", sha256=hash_key("key-a"), adapters=["x"], **extra),
        KeyEntry(name="b", sha256=hash_key("key-b").upper()),
    ]
    return ApiKeys(entries, clock=clock) if clock else ApiKeys(entries)


def test_identify_and_allowed_models():
    keys = _keys()
    a, b = keys.identify("key-a"), keys.identify("key-b")
    assert a.name == "a" and b.name == "b"  # an upper-case hash is accepted
    assert keys.identify("key-c") is None and keys.identify("") is None
    assert a.allows("x", "base") and a.allows("base", "base") and not a.allows("y", "base")
    assert b.allows("anything", "base")


def test_rate_limit_token_bucket():
    now = [100.0]
    keys = _keys(clock=lambda: now[0], rate_limit=3)  # 3 per minute: one each 20 s
    a = keys.identify("key-a")
    assert [keys.take(a) for _ in range(3)] == [None, None, None]
    assert keys.take(a) == pytest.approx(20.0)
    now[0] += 10
    assert keys.take(a) == pytest.approx(10.0)
    now[0] += 10
    assert keys.take(a) is None
    assert keys.take(keys.identify("key-b")) is None  # no limit


def test_keys_file(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - name: a\n    sha256: {hash_key('k')}\n    rate_limit: 10\n")
    keys = ApiKeys.load(f)
    assert keys.identify("k").rate_limit == 10
    for text, message in [
        (f"keys: [{{name: a, sha256: {hash_key('k')}, rate: 1}}]", "'keys.0.rate'"),
        ("keys: [{name: a, sha256: xyz}]", "64 hex digits"),
        ("keys: []", "'keys'"),
        (f"keys: [{{name: a, sha256: {hash_key('k')}, rate_limit: .inf}}]", "rate_limit"),
        (f"keys: [{{name: a, sha256: {hash_key('k')}, adapters: x}}]", '"*"'),
    ]:
        f.write_text(text)
        with pytest.raises(ApiKeysError) as e:
            ApiKeys.load(f)
        assert message in str(e.value)
    with pytest.raises(ApiKeysError, match="share a name"):
        ApiKeys(
            [KeyEntry(name="a", sha256=hash_key("1")), KeyEntry(name="a", sha256=hash_key("2"))]
        )
