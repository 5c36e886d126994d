"""`splice align` on checkpoint folders: read both models, weight-match, write the permuted
model atomically (`ShardedWriter`, i.e. `splice.io.output_folder`).

The output is the *other* model with its hidden units permuted: same tensor names, shapes
and dtypes, written as safetensors shards (a ``.bin`` input is written as safetensors), with
the other model's ``config.json`` and tokenizer files copied, plus ``splice_alignment.json``
(the spec, the permutations' unit counts, the objective before and after, the iterations).
Everything is checked before any output is written: both folders readable, the same tensor
names and shapes, permuted tensors floating point and finite (unless ``allow_nonfinite``),
the spec known and fitting the shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

import splice
from splice.errors import CheckpointError
from splice.io.base import TensorInfo
from splice.io.finite import check_input
from splice.io.open import TOKENIZER_FILES, model_dir_of, model_side_files, open_path
from splice.io.output_folder import OutputFolder
from splice.io.safe_paths import member
from splice.io.shard_plan import plan_shards
from splice.io.textfile import load_json_object
from splice.io.writer import ShardedWriter
from splice.merge.align.spec import (
    AlignmentError,
    PermutationSpec,
    apply_permutation,
    llama_spec,
    mlp_spec,
)
from splice.merge.align.weight_matching import MatchResult, check_pair, weight_matching

SPECS = ("mlp", "llama", "llama-residual")
RECORD_NAME = "splice_alignment.json"


def read_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of a checkpoint (file or folder), in the reader's order."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    reader = open_path(Path(path))
    try:
        return {name: reader.read(name) for name in reader.names()}
    finally:
        reader.close()


def head_counts(path: str | os.PathLike[str]) -> tuple[int | None, int | None]:
    """(num_attention_heads, num_key_value_heads) from the model folder's config.json, or
    (None, None) without one or without those keys (then attention heads are not permuted)."""
    folder = model_dir_of(path)
    config_path = member(folder, "config.json") if folder is not None else None
    if config_path is None:
        return None, None
    config = load_json_object(config_path, AlignmentError)
    if "num_attention_heads" not in config:
        return None, None
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads", heads)
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AlignmentError(f"{config_path}: '{key}' must be a positive integer")
    return heads, kv


def build_spec(
    name: str, state: dict[str, Tensor], model: str | os.PathLike[str]
) -> PermutationSpec:
    """The named spec (`SPECS`) for `state`; llama reads the head counts of `model`'s config."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if name == "mlp":
        return mlp_spec(shapes)
    if name in ("llama", "llama-residual"):
        return llama_spec(shapes, *head_counts(model), residual=name == "llama-residual")
    raise AlignmentError(f"unknown spec '{name}' (known: {', '.join(SPECS)})")


def _check_values(spec: PermutationSpec, states: dict[str, dict[str, Tensor]]) -> None:
    permuted = {ref.tensor for refs in spec.perms.values() for ref in refs}
    for source, state in states.items():
        for name in sorted(permuted):
            if not state[name].is_floating_point():
                raise AlignmentError(f"{source}: tensor '{name}' is not floating point")
            check_input(state[name], name, source)


def align_folders(
    reference: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    spec_name: str = "mlp",
    max_iter: int = 100,
    seed: int = 0,
    overwrite: int | bool = 0,
    allow_nonfinite: bool = False,
    shard_bytes: int = 2 * 1024**3,
) -> MatchResult:
    """Write `model` permuted to match `reference` into `out`; returns the match."""
    if spec_name not in SPECS:
        raise AlignmentError(f"unknown spec '{spec_name}' (known: {', '.join(SPECS)})")
    if max_iter < 1:
        raise AlignmentError(f"--max-iter must be at least 1, got {max_iter}")
    if seed < 0:
        raise AlignmentError(f"--seed must be >= 0, got {seed}")
    OutputFolder(out, overwrite=overwrite, inputs=[reference, model]).check()
    side = model_side_files(model, ("config.json", *TOKENIZER_FILES))
    ref_state, other = read_state(reference), read_state(model)
    spec = build_spec(spec_name, ref_state, model)
    counts = check_pair(spec, ref_state, other)
    if not allow_nonfinite:
        _check_values(spec, {str(reference): ref_state, str(model): other})
    result = weight_matching(spec, ref_state, other, max_iter=max_iter, seed=seed)
    aligned = apply_permutation(spec, result.perms, other)
    infos = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in aligned.items()]
    record = {
        "spec": spec_name,
        "reference": os.fspath(reference),
        "model": os.fspath(model),
        "units": counts,
        "objective_before": result.objective_before,
        "objective_after": result.objective_after,
        "iterations": result.iterations,
        "converged": result.converged,
        "seed": seed,
    }
    writer = ShardedWriter(
        out,
        plan_shards(infos, shard_bytes),
        {"format": "pt", "splice_version": splice.__version__},
        overwrite=overwrite,
        inputs=[reference, model],
    )
    try:
        for name, tensor in aligned.items():
            writer.write(name, tensor.contiguous(), allow_nonfinite=allow_nonfinite)
        writer.finalize(
            extra_files={RECORD_NAME: (json.dumps(record, indent=2) + "\n").encode()},
            copy_files=side,
        )
    except BaseException:
        writer.abort()
        raise
    return result
