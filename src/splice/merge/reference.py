"""The recipe reference, generated from the registry (so docs cannot drift from code).

`splice methods` prints it; the README embeds it between markers and a test checks the two
agree.
"""

from __future__ import annotations

import inspect

from splice.merge.registry import MergeMethod, all_methods


def _fmt(value: object) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def method_table(methods: list[MergeMethod] | None = None) -> str:
    """A markdown table: one row per parameter of every data-free method (the data-aware
    ones, `MergeMethod.needs_data`, need statistics collected in Python first and are
    documented in docs/data-aware-merging.md)."""
    rows = [
        "| method | base | inputs | parameter | per | type | default | mergekit-dialect default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods or [m for m in all_methods() if not m.needs_data]:
        n = (
            f"{m.min_models}"
            if m.max_models == m.min_models
            else f"≥{m.min_models}" + (f", ≤{m.max_models}" if m.max_models else "")
        )
        head = f"| `{m.name}` | {'yes' if m.needs_base else 'no'} | {n} "
        if not m.params:
            rows.append(head + "| – | | | | |")
        for i, p in enumerate(m.params):
            mk = m.default(p, "mergekit")
            mk_s = _fmt(mk) if mk != p.default or p.name in m.mergekit_defaults else "same"
            prefix = head if i == 0 else "| | | "
            rows.append(
                prefix + f"| `{p.name}` | {'model' if p.per_model else 'global'} | "
                f"{p.describe_type()} | {_fmt(p.default)} | {mk_s} |"
            )
    return "\n".join(rows)


def method_summaries() -> str:
    return "\n".join(f"- `{m.name}`: {m.summary}" for m in all_methods() if not m.needs_data)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the block between the methods markers of the README."""
    from splice.readme_blocks import update_block

    update_block(path, "methods", method_table())


if __name__ == "__main__":
    update_readme()
