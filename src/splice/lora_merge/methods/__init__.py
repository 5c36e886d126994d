"""Built-in low-rank (LoRA-native) merge methods, one file each; importing this package
registers them all in `splice.merge.registry` with ``representation="low_rank"``.

Each is a pure function of one module's factors, with the dense methods' signature as schema:

    @merge_method("svd", needs_base=False, representation="low_rank")
    def svd(base: None, tensors: Sequence[LowRank], *, weight: PerModel[float] = 1.0,
            rank: Rank | None = None, lambda_: float = 1.0) -> LowRank: ...

``tensors[i]`` is adapter i's (B_i, A_i, s_i) for this module, ``weight[i]`` its weight w_i;
the result is the merged (B, A, scale). Random methods draw from ``ctx.generator(i)`` (seed,
module name, index), so results are reproducible and order-independent.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
