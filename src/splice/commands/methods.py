"""`splice methods`: every merge method with its parameters and defaults, dense and low-rank,
and the compression methods."""

from __future__ import annotations

import argparse

LOW_RANK_INTRO = """\
Low-rank (LoRA-native) methods: inputs are PEFT LoRA adapter folders, the output is one.
A recipe whose models are all LoRA adapter folders runs the low-rank method of its name (so
`ties` there is the low-rank `ties`); `lora:NAME` asks for it explicitly. A recipe that mixes
adapters and checkpoints, or names a method without a low-rank form, folds each adapter into
its base_model (BASE+ADAPTER) and merges dense checkpoints."""


def low_rank_section() -> str:
    """The low-rank methods: what they take, one summary line each, their parameter table."""
    from splice.lora_merge import route  # noqa: F401  (registers the low-rank methods)
    from splice.merge import all_methods
    from splice.merge.reference import method_table

    methods = all_methods("low_rank")
    lines = [LOW_RANK_INTRO, ""]
    lines += [f"- `{m.label}`: {m.summary}" for m in methods]
    return "\n".join([*lines, "", method_table(methods)])


def compression_section() -> str:
    """The compression methods (`splice compress METHOD`): one summary line each and their
    parameter table, in the shape of the merge methods' listing."""
    from splice.compress import all_compression_methods
    from splice.compress.registry import COMMANDS

    methods = all_compression_methods()
    lines = [
        "Compression methods: `splice compress METHOD` takes N fine-tunes of one base and writes",
        "a shared vector + per-task masks (`splice restore` rebuilds any task); methods marked",
        "`splice lora METHOD` compress one PEFT LoRA adapter into another.",
        "",
        *(
            f"- `{m.name}`: {m.summary}"
            + ("" if m.inputs == "checkpoints" else f" (`{COMMANDS[m.inputs]} {m.name}`)")
            for m in methods
        ),
        "",
        "| method | parameter | per | type | default |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        if not m.params:
            lines.append(f"| `{m.name}` | – | | | |")
        for i, p in enumerate(m.params):
            per = "model" if p.per_model else "global"
            default = "required" if p.required else f"`{p.default!r}`"
            lines.append(
                f"|{f' `{m.name}`' if i == 0 else ''} | `{p.name}` | {per} | "
                f"{p.describe_type()} | {default} |"
            )
    return "\n".join(lines)


def _cmd_methods(args: argparse.Namespace) -> int:
    from splice.merge.reference import method_summaries, method_table

    print("Dense methods: inputs are checkpoints (or BASE+ADAPTER), the output is one.\n")
    print(method_summaries())
    print()
    print(method_table())
    print()
    print(low_rank_section())
    print()
    print(compression_section())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "methods", help="list merge and compression methods with their parameters and defaults"
    )
    r.set_defaults(fn=_cmd_methods)
