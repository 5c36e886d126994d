"""The adapter reference, generated from the registry (so docs cannot drift from code).

`splice adapters` prints it; the README embeds it between ``<!-- adapters:begin -->`` and
``<!-- adapters:end -->`` and a test checks the two agree
(``python -m splice.adapters.reference`` rewrites the block).
"""

from __future__ import annotations

from pydantic_core import PydanticUndefined

from splice.adapters.registry import AdapterMethod, all_adapter_methods

# Targeting fields every layer method shares (documented once, not per method).
_COMMON = ("target_modules", "exclude_modules", "modules_to_save")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            return f"`{field.default_factory()!r}`"
        return "required"
    return f"`{field.default!r}`"


def adapter_table(methods: list[AdapterMethod] | None = None) -> str:
    """A markdown table: one row per method with its parameters and defaults."""
    rows = [
        "| method | acts on | saved as (`peft_type`) | loads in PEFT | parameters (default) |",
        "|---|---|---|---|---|",
    ]
    for m in methods or all_adapter_methods():
        fields = m.config_cls.model_fields
        params = ", ".join(
            f"`{name}` {_default(f)}" for name, f in fields.items() if name not in _COMMON
        )
        if m.kind != "layer":
            kind = "inputs (virtual tokens / KV prefix)"
        else:
            kind = "weights, folds" if m.folds else "activations (wraps layer outputs)"
        rows.append(
            f"| `{m.name}` | {kind} | `{m.peft_type}` | {'yes' if m.in_peft else 'no'} | "
            f"{params or '–'} |"
        )
    return "\n".join(rows)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the block between the adapters markers of the README."""
    from splice.readme_blocks import update_block

    update_block(path, "adapters", adapter_table())


if __name__ == "__main__":
    update_readme()
