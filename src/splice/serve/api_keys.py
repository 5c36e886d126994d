"""Bearer API keys: a keys file of SHA-256 hashes, per-key allowed adapters and rate limits.

The keys file (YAML, strict)::

    keys:
      - name: alice                   # shown in logs and errors, never the key
        sha256: 9f86d081884c7d65...   # hex SHA-256 of the key (`splice serve-key` makes one)
        adapters: [support, legal]    # models this key may use; "*" (default): all
        rate_limit: 60                # requests per minute (a token bucket); null: no limit
        admin: false                  # may call /v1/load_lora_adapter and unload

Only hashes are stored: a leaked keys file gives no usable key. A presented key is hashed
and compared with every stored hash by `hmac.compare_digest` (constant time, and the loop
never stops early), so the answer's timing does not depend on how much of a key matched.
The base model is always allowed.

Rate limit: a token bucket per key holding at most ``rate_limit`` requests (and at least one),
refilled at ``rate_limit / 60`` per second; a request takes one token or is refused (HTTP 429)
with the seconds until the next token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from splice.config_errors import StrictConfig, parse_config
from splice.errors import SpliceError
from splice.io.textfile import load_yaml

KEY_PREFIX = "sk-splice-"


class ApiKeysError(SpliceError):
    """A bad keys file."""


class KeyEntry(StrictConfig):
    name: str = Field(min_length=1)
    sha256: str
    adapters: list[str] | str = "*"
    rate_limit: float | None = Field(None, gt=0)
    admin: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("expected 64 hex digits (the SHA-256 of the key)")
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and value != "*":
            raise ValueError('expected a list of model names or "*"')
        return value

    def allows(self, model: str, base_id: str) -> bool:
        return model == base_id or self.adapters == "*" or model in self.adapters


class KeysFile(StrictConfig):
    keys: list[KeyEntry] = Field(min_length=1)


def hash_key(key: str) -> str:
    """The hex SHA-256 of ``key`` (UTF-8): what the keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class ApiKeys:
    """The keys of a keys file: `identify` a bearer token, `take` a rate-limit token."""

    def __init__(self, entries: list[KeyEntry], clock: Callable[[], float] = time.monotonic):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ApiKeysError("two keys share a name")
        self.entries = entries
        self._digests = [bytes.fromhex(e.sha256) for e in entries]
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        if not Path(path).exists():
            raise ApiKeysError(f"keys file {path} does not exist")
        data = load_yaml(path, ApiKeysError)
        return cls(parse_config(KeysFile, data, str(path), ApiKeysError, list_valid=True).keys)

    def identify(self, token: str) -> KeyEntry | None:
        """The entry whose hash matches ``token``; None when none does."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: KeyEntry | None = None
        for entry, stored in zip(self.entries, self._digests, strict=True):
            if hmac.compare_digest(digest, stored) and found is None:
                found = entry
        return found

    def take(self, entry: KeyEntry) -> float | None:
        """Take one request from ``entry``'s bucket: None when allowed, else the seconds
        until the next request would be."""
        if entry.rate_limit is None:
            return None
        capacity, per_second = max(1.0, entry.rate_limit), entry.rate_limit / 60.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(entry.name, _Bucket(capacity, now))
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / per_second
