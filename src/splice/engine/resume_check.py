"""`--resume`, input side: are the inputs behind each finished shard unchanged by content?

While merging, the engine hashes every input tensor as it reads it (`input_digest`: XXH3-128
of dtype, shape and bytes, `splice.io.shard_record`; the bytes are read anyway, and hashing
them costs ~0.05 s of CPU a GB) and, for methods with whole-model statistics (TIES-style
trims), a digest of the keep rule each tensor was merged with. The writer keeps these in
each shard's record.

On `--resume`, `InputCheck` re-reads every input tensor behind the kept shards (each once)
and compares digests: a shard whose inputs changed in any way, even with size and mtime kept,
is redone. Cost: one read of the inputs of the finished shards, no merging; for methods with
whole-model statistics also the two statistic passes, which the resumed run needs anyway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from splice.engine.plan import MergePlan
from splice.errors import SpliceError
from splice.io.shard_record import input_digest
from splice.merge import KeepRule, TopKThreshold

Rules = dict[int, dict[TopKThreshold, KeepRule]]


def stats_key(out_name: str) -> str:
    """Record key of the whole-model keep rules output tensor `out_name` was merged with."""
    return json.dumps(["stats", out_name])


def rules_digest(rules: dict[TopKThreshold, KeepRule]) -> str:
    items = sorted((repr(k), float(r.threshold).hex(), int(r.tie_quota)) for k, r in rules.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


class InputCheck:
    """For `ShardedWriter.drop_shards`: why a shard's recorded inputs no longer hold, or None.

    `rules` gives the whole-model keep rules of the current inputs (computed at most once).
    """

    def __init__(self, plan: MergePlan, rules: Callable[[], Rules]):
        self.plan = plan
        self.rules = rules
        self._now: dict[str, str | None] = {}
        self._names: dict[str, set[str]] = {}
        self._job_of = {j.out.name: i for i, j in enumerate(plan.jobs)}

    def __call__(self, inputs: dict[str, str]) -> str | None:
        for key in sorted(inputs):
            if key not in self._now:
                self._now[key] = self._digest_now(key)
            if self._now[key] != inputs[key]:
                return _why(key)
        return None

    def _digest_now(self, key: str) -> str | None:
        try:
            kind, *rest = json.loads(key)
        except (ValueError, TypeError):
            return None
        if kind == "read" and len(rest) == 2:
            ref, name = rest
            reader = self.plan.readers.get(ref)
            if reader is None:
                return None
            if ref not in self._names:
                self._names[ref] = set(reader.names())
            if name not in self._names[ref]:
                return None
            try:
                return input_digest(reader.read(name))
            except (SpliceError, KeyError, OSError):
                return None
        if kind == "stats" and len(rest) == 1:
            index = self._job_of.get(rest[0])
            return None if index is None else rules_digest(self.rules().get(index, {}))
        return None


def _why(key: str) -> str:
    try:
        kind, *rest = json.loads(key)
    except (ValueError, TypeError):
        return "its record is unreadable"
    if kind == "read" and len(rest) == 2:
        return f"input tensor '{rest[1]}' of {rest[0]} changed since the shard was written"
    if kind == "stats":
        return "the method's whole-model statistics changed (an input changed)"
    return "its record is unreadable"
