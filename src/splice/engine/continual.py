"""The OPCM streaming driver: base + previous state folder (or none) + one new model ->
a new state folder, one tensor at a time.

A state folder is a normal Hugging Face model folder (sharded safetensors, config and
tokenizer files copied from the new model's folder, else the base's) holding the merged
model, plus ``splice_continual.json`` with the scalars of `OpcmState`. It loads with
``from_pretrained`` like any merge output, and is the ``--state`` of the next step.

Memory: a few tensors at a time (base, merged, new, their SVD), independent of the number
of models merged. The whole-model normalisation needs ‖u‖ before anything is written, so
each step makes two passes over the tensors: the first computes the norms, the second
recomputes each update (the SVDs run twice) and writes it. The output is written
atomically by `ShardedWriter` (nothing appears at ``out_dir`` until it is complete).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

import splice
from splice.errors import CheckpointError, MergeValidationError
from splice.io import CheckpointReader, ShardedWriter, model_dir_of, plan_shards
from splice.io.base import TensorInfo
from splice.io.finite import numerical_errors
from splice.io.open import TOKENIZER_FILES, model_side_files
from splice.io.safe_paths import member
from splice.io.textfile import load_json_object
from splice.merge.continual.opcm import OpcmState, opcm_projected_update, projects
from splice.numbers import check_number, check_numbers
from splice.reference import open_checkpoint

STATE_FILE = "splice_continual.json"
SIDE_FILES = ("config.json", *TOKENIZER_FILES)


@dataclass(frozen=True)
class ContinualReport:
    out_dir: Path
    models_merged: int
    lambda_: float
    tensors: int


def load_state(state_dir: str | Path) -> OpcmState:
    """The scalars of a state folder written by `opcm_add`."""
    path = member(state_dir, STATE_FILE)
    if path is None:
        raise CheckpointError(f"'{state_dir}' is not a continual-merge state: no {STATE_FILE}")
    data = load_json_object(path, CheckpointError)
    try:
        if data.get("method") != "opcm":
            raise CheckpointError(f"{path}: method {data.get('method')!r} is not 'opcm'")
        state = OpcmState.from_json(data)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable continual state ({e})") from None
    # JSON may hold NaN / Infinity; a state is only usable with finite scalars.
    check_number(state.alpha, f"{path}: alpha", ge=0, le=1, error=CheckpointError)
    check_number(state.lambda_, f"{path}: lambda", error=CheckpointError)
    check_numbers(
        state.task_vector_norms, f"{path}: task_vector_norms", ge=0, error=CheckpointError
    )
    return state


def _check_same_tensors(ref: CheckpointReader, other: CheckpointReader, what: str) -> None:
    names, other_names = set(ref.names()), set(other.names())
    if names != other_names:
        diff = sorted(names ^ other_names)
        raise MergeValidationError(
            f"{what} does not have the base's tensors (first difference: '{diff[0]}')"
        )
    for n in ref.names():
        if ref.info(n).shape != other.info(n).shape:
            raise MergeValidationError(
                f"shape mismatch for tensor '{n}': base {list(ref.info(n).shape)}, "
                f"{what} {list(other.info(n).shape)}"
            )


def _updates(
    base: CheckpointReader,
    merged: CheckpointReader | None,
    new: CheckpointReader,
    state: OpcmState,
    alpha: float,
) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """(name, base tensor, task vector τ, update u) per tensor, in float32; non-float tensors
    give (name, None, None, None) and are copied from the base."""
    for name in base.names():
        if not base.info(name).dtype.is_floating_point:
            yield name, None, None, None
            continue
        b = base.read(name).to(torch.float32)
        tau = new.read(name).to(torch.float32) - b
        if merged is None:
            yield name, b, tau, tau
            continue
        prev = merged.read(name).to(torch.float32) - b
        with numerical_errors(f"tensor '{name}'"):
            u = opcm_projected_update(
                prev,
                tau,
                alpha=alpha,
                prev_lambda=state.lambda_,
                project=projects(name, b.shape),
            )
        yield name, b, tau, u


def _side_files(*refs: str) -> list[Path]:
    """The side files of the first reference with a model folder (`model_side_files`)."""
    for ref in refs:
        if model_dir_of(ref) is not None:
            return model_side_files(ref, SIDE_FILES)
    return []


def opcm_add(
    base_ref: str,
    state_ref: str | None,
    model_ref: str,
    out_dir: str | Path,
    *,
    alpha: float | None = None,
    shard_bytes: int = 2_000_000_000,
    overwrite: int | bool = False,
    progress: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
) -> ContinualReport:
    """Merge ``model_ref`` into the state ``state_ref`` (None: start with this model) and
    write the new state to ``out_dir``. ``alpha`` defaults to the state's (0.5 at first).
    NaN / ±inf in an input or the output is a NonFiniteError unless ``allow_nonfinite``."""
    state = OpcmState() if state_ref is None else load_state(state_ref)
    if alpha is not None:
        if not 0 <= alpha <= 1:  # also refuses NaN
            raise MergeValidationError(f"alpha = {alpha} is invalid: it must lie in [0, 1]")
        state.alpha = alpha
    with ExitStack() as stack:
        check = not allow_nonfinite
        base = stack.enter_context(_closing(open_checkpoint(base_ref, check_finite=check)))
        new = stack.enter_context(_closing(open_checkpoint(model_ref, check_finite=check)))
        merged = None
        if state_ref is not None:
            merged = stack.enter_context(_closing(open_checkpoint(state_ref, check_finite=check)))
            _check_same_tensors(base, merged, f"state '{state_ref}'")
        _check_same_tensors(base, new, f"model '{model_ref}'")

        infos = [TensorInfo(n, base.info(n).shape, base.info(n).dtype) for n in base.names()]
        copies = _side_files(model_ref, base_ref)  # checked before any heavy work
        writer = ShardedWriter(
            out_dir,
            plan_shards(infos, shard_bytes),
            {"format": "pt", "splice_version": splice.__version__},
            overwrite=overwrite,
            inputs=[r for r in (base_ref, state_ref, model_ref) if r is not None],
        )
        try:
            # Pass 1: ‖τ‖ and ‖u‖ over the whole model.
            tau_sq = u_sq = 0.0
            for _name, _b, tau, u in _updates(base, merged, new, state, state.alpha):
                if tau is not None and u is not None:
                    tau_sq += float(tau.double().square().sum())
                    u_sq += float(u.double().square().sum())
            if progress:
                progress("norms computed")
            new_norm, u_norm = math.sqrt(tau_sq), math.sqrt(u_sq)
            if merged is None:
                new_lambda, scale = 1.0, 1.0
            else:
                new_lambda, mean_norm = state.next_lambda(new_norm, u_norm)
                scale = mean_norm / u_norm if u_norm > 0 else 0.0
            # Pass 2: write base + u · scale.
            for name, b, _tau, u in _updates(base, merged, new, state, state.alpha):
                if b is None or u is None:
                    out = base.read(name)
                else:
                    out = b.add_(u, alpha=scale).to(base.info(name).dtype)
                writer.write(name, out.contiguous(), allow_nonfinite=allow_nonfinite)
            state.lambda_ = new_lambda
            state.task_vector_norms.append(new_norm)
            state.models.append(str(model_ref))
            side = {STATE_FILE: (json.dumps(state.to_json(), indent=2) + "\n").encode()}
            writer.finalize(extra_files=side, copy_files=copies)
        except BaseException:
            writer.abort()
            raise
    return ContinualReport(Path(out_dir), state.count, state.lambda_, len(infos))


class _closing:
    """Context manager closing a checkpoint reader."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def __enter__(self) -> CheckpointReader:
        return self.reader

    def __exit__(self, *exc: object) -> None:
        self.reader.close()
