"""The OPCM streaming driver: base + previous state folder (or none) + one new model ->
a new state folder, one tensor at a time.

A state folder is a normal Hugging Face model folder (sharded safetensors, config and
tokenizer files copied from the new model's folder, else the base's) holding the merged
model, plus ``splice_continual.json`` with the scalars of `OpcmState`. It loads with
``from_pretrained`` like any merge output, and is the ``--state`` of the next step.

It runs on the streaming driver (`splice.engine.driver`). Memory: a few tensors at a time
(base, merged, new, their SVD), independent of the number of models merged. The
whole-model normalisation needs ‖τ‖ and ‖u‖ before anything is written: a statistic pass
computes them (the squares summed in tensor order, in float64), then the write pass
recomputes each update (the SVDs run twice) and writes it. The output is written atomically
(nothing appears at ``out_dir`` until it is complete).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from splice.engine.driver import Output, Sources, Stream, passes, side_files, write_stream
from splice.errors import CheckpointError, MergeValidationError
from splice.io.finite import numerical_errors
from splice.io.safe_paths import member
from splice.io.textfile import load_json_object
from splice.merge.continual.opcm import OpcmState, opcm_projected_update, projects
from splice.numbers import check_number, check_numbers

STATE_FILE = "splice_continual.json"


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


def _update(
    src: Sources, refs: list[str], name: str, state: OpcmState
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(base tensor, task vector τ, update u) of one tensor in float32, from the references
    (base, new model) or (base, previous state, new model); None for a non-float tensor,
    which is copied from the base."""
    base = refs[0]
    if not src[base].info(name).dtype.is_floating_point:
        return None
    b = src.read(base, name).to(torch.float32)
    tau = src.read(refs[-1], name).to(torch.float32) - b
    if len(refs) == 2:
        return b, tau, tau
    prev = src.read(refs[1], name).to(torch.float32) - b
    with numerical_errors(f"tensor '{name}'"):
        u = opcm_projected_update(
            prev,
            tau,
            alpha=state.alpha,
            prev_lambda=state.lambda_,
            project=projects(name, b.shape),
        )
    return b, tau, u


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
    refs = [os.fspath(r) for r in (base_ref, state_ref, model_ref) if r is not None]
    with Sources.open(refs, allow_nonfinite=allow_nonfinite) as src:
        if state_ref is not None:
            src.check_same_tensors(refs[0], refs[1], f"state '{state_ref}'")
        src.check_same_tensors(refs[0], refs[-1], f"model '{model_ref}'")
        base = src[refs[0]]
        names = base.names()
        found: dict[str, float] = {"scale": 1.0}

        def norms(pending: list[int]) -> None:
            """‖τ‖ and ‖u‖ over the whole model: the scale of u and the next λ."""

            def squares(i: int) -> tuple[float, float]:
                upd = _update(src, refs, names[i], state)
                if upd is None:
                    return 0.0, 0.0
                _b, tau, u = upd
                return float(tau.double().square().sum()), float(u.double().square().sum())

            tau_sq = u_sq = 0.0
            for t, u in passes(squares, range(len(names))):
                tau_sq += t
                u_sq += u
            if progress:
                progress("norms computed")
            new_norm, u_norm = math.sqrt(tau_sq), math.sqrt(u_sq)
            found.update(norm=new_norm, lambda_=1.0)
            if state_ref is not None:
                found["lambda_"], mean_norm = state.next_lambda(new_norm, u_norm)
                found["scale"] = mean_norm / u_norm if u_norm > 0 else 0.0

        def step(i: int) -> list[Output]:
            """base + u · scale (the update recomputed with the previous state's λ)."""
            name = names[i]
            upd = _update(src, refs, name, state)
            out = base.read(name) if upd is None else upd[0].add_(upd[2], alpha=found["scale"])
            return [Output(name, out.to(base.info(name).dtype).contiguous())]

        def next_state() -> dict[str, bytes]:
            state.lambda_ = found["lambda_"]
            state.task_vector_norms.append(found["norm"])
            state.models.append(str(model_ref))
            return {STATE_FILE: (json.dumps(state.to_json(), indent=2) + "\n").encode()}

        spec = Stream(
            outputs=[base.info(n) for n in names],
            metadata={},
            shard_bytes=shard_bytes,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            side_files=side_files(model_ref, base_ref),  # checked before any heavy work
        )
        write_stream(
            out_dir,
            spec,
            src,
            step,
            before=norms,
            extra_files=next_state,
        )
    return ContinualReport(Path(out_dir), state.count, state.lambda_, len(names))
