"""Units of work as Ray tasks: the connection, a pool that runs them with a CPU limit each
and reports progress on the driver, and the parallel candidate evaluation of a coefficient
search (`splice bench --ray`, `splice search --ray`; docs/ray.md).

    with ray_session("local"):                 # or "HOST:6379", "ray://HOST:10001", "auto"
        pool = RayPool(cpus=1)
        values = pool.map(fn, [(a,), (b,)], on_done=lambda i: bar.update())

`ray_session(address)` joins the cluster at ``address`` (``local``: ``RAY_ADDRESS`` if set,
else a new local instance, stopped at the end); when Ray is already initialized in this
process (a test, a notebook) it is used as it is and left running. Ray missing is a
`SpliceError` with the install hint; an address that does not answer is one too, checked by
a TCP connection (3 s) before Ray is asked, so nothing has started when it is refused.

Each unit is a module-level function run by `_call` in a worker: ``cpus`` CPUs reserved
(Ray's ``num_cpus``) and as many torch threads, so units do not oversubscribe the cores.
`RayPool.map` returns the results in the order of the arguments, whatever order the units
finish in: the driver assembles exactly what a local loop would have.

Candidate search: `candidate_evaluator(pool, factory, key)` gives a function of a list of
candidate recipes (mappings) to their objective values, one Ray task per candidate. A
worker builds the objective once per search (``factory()``, remembered under ``key`` in the
worker process, with the search's open checkpoint readers and whole-model trim thresholds,
as `search_coefficients` keeps them), merges the candidate in memory with the engine and
returns ``objective(state)``. The values are the ones the local search computes, so the
same seed gives the same search.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from splice.errors import SpliceError

LOCAL = "local"  # `--ray` alone: RAY_ADDRESS if set, else a new local Ray instance
INSTALL_HINT = "pip install 'splice[ray]'"
CONNECT_TIMEOUT_S = 3.0


def require_ray(flag: str = "--ray") -> None:
    """A one-line error, before any work, when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise SpliceError(f"{flag} needs Ray, which is not installed: {INSTALL_HINT}")


def check_reachable(address: str, flag: str = "--ray") -> None:
    """``HOST:PORT`` or ``ray://HOST:PORT`` must accept a TCP connection (``auto`` and
    ``local`` are left to Ray)."""
    if address in (LOCAL, "auto"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise SpliceError(
            f"{flag} {address}: expected HOST:PORT, ray://HOST:PORT, 'auto' or nothing"
        )
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise SpliceError(
            f"{flag} {address}: no Ray cluster answers at {host}:{port} ({e.strerror or e}); "
            "start one (`ray start --head`) or give its address"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None, flag: str = "--ray") -> Iterator[None]:
    """Ray connected for the block (see the module docstring)."""
    require_ray(flag)
    import ray

    address = address or LOCAL
    check_reachable(address, flag)
    if ray.is_initialized():
        yield
        return
    fresh = address == LOCAL and not os.environ.get("RAY_ADDRESS")
    local = {"include_dashboard": False, "log_to_driver": False} if fresh else {}
    try:
        ray.init(address=None if address == LOCAL else address, **local)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError ...
        raise SpliceError(f"{flag} {address}: cannot connect to Ray: {_one_line(e)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _call(fn: Callable[..., Any], threads: int, args: tuple) -> Any:
    """In the worker: ``threads`` torch threads, then the unit."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


class RayPool:
    """Submit units as Ray tasks of ``cpus`` CPUs each; collect them in order."""

    def __init__(self, cpus: int = 1):
        import ray

        if cpus < 1:
            raise SpliceError(f"CPUs per Ray task must be at least 1 (got {cpus})")
        self.cpus = cpus
        self._remote = ray.remote(_call).options(num_cpus=cpus)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start one unit; its Ray object reference."""
        return self._remote.remote(fn, self.cpus, args)

    def map(
        self,
        fn: Callable[..., Any],
        arglists: Sequence[tuple],
        on_done: Callable[[int], None] | None = None,
    ) -> list[Any]:
        """``[fn(*a) for a in arglists]`` as parallel tasks; ``on_done(i)`` on the driver as
        unit ``i`` finishes."""
        return self.gather([self.submit(fn, *a) for a in arglists], on_done)

    def gather(self, refs: list[Any], on_done: Callable[[int], None] | None = None) -> list[Any]:
        """The results of ``refs`` in their order. A unit's exception is raised here: a
        `SpliceError` as itself (its one-line message), anything else as Ray's error."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    ray.get(ref)  # raise a failed unit's error now
                    if on_done is not None:
                        on_done(index[ref])
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:  # a unit's own one-line error, as locally
            if isinstance(e.cause, SpliceError):
                raise e.cause from None
            raise


# -- candidate evaluation of a coefficient search ------------------------------------------
# the current search of this worker process: key -> (objective, readers, trim thresholds)
_SEARCHES: dict[str, tuple[Callable[[Any], float], dict, dict]] = {}


def evaluate_candidate(
    factory: Callable[[], Callable[[Any], float]], key: str, recipe: Any
) -> float:
    """In the worker: the objective of one candidate recipe (a mapping)."""
    from splice.engine.in_memory import merge_to_memory
    from splice.engine.plan import plan_merge
    from splice.recipe.schema import parse_recipe

    if key not in _SEARCHES:  # a new search: the previous one's readers closed
        for _, old_readers, _ in _SEARCHES.values():
            for r in old_readers.values():
                r.close()
        _SEARCHES.clear()
        _SEARCHES[key] = (factory(), {}, {})
    objective, readers, rules_cache = _SEARCHES[key]
    plan = plan_merge(parse_recipe(recipe, "candidate recipe"), readers)
    readers.update(plan.readers)
    return float(objective(merge_to_memory(plan, rules_cache)))


def candidate_evaluator(
    pool: RayPool, factory: Callable[[], Callable[[Any], float]], key: str
) -> Callable[[list[Mapping[str, Any]]], list[float]]:
    """Candidate recipes -> objective values, one Ray task each (``key``: the search's
    identity in the workers, unique per search)."""

    def evaluate_many(recipes: list[Mapping[str, Any]]) -> list[float]:
        return pool.map(evaluate_candidate, [(factory, key, dict(r)) for r in recipes])

    return evaluate_many
