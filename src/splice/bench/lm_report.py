"""The LM pool's results.md: one table per expert kind.

A cell is the task's test value and, after the arrow, its normalized score against the
kind's experts (`bench.lm_evaluate`): for an ``lm`` task ``loss (perplexity) → gain
share``, for an ``exact_match`` task ``exact match → merged / expert``. The last column
is the mean of the defined normalized scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splice.bench.lm_run import LMBenchResults, LMRow


def _cell(metrics: dict[str, float], norm: float | None) -> str:
    if "exact_match" in metrics:
        value = f"{metrics['exact_match']:.1%}"
    else:
        value = f"{metrics['loss']:.3f} ({metrics['perplexity']:.1f})"
    return value if norm is None else f"{value} → {norm:.2f}"


def _label(row: LMRow) -> str:
    if row.variant is None:
        return row.method
    params = ", ".join(f"{k}={v}" for k, v in (row.params or {}).items())
    return f"{row.method} ({row.variant}{': ' + params if params else ''})"


def render_markdown(results: LMBenchResults) -> str:
    names = list(results.tasks)
    lines = ["# splice bench: causal-LM pool", ""]
    lines.append(
        "Cells: lm task `loss (perplexity) → (L_pre − L)/(L_pre − L_expert)`; exact-match "
        "task `EM → EM / EM_expert`. Normalized 1 = the expert on its own task, 0 = the "
        "pretrained model (loss)."
    )
    lines.append("")
    header = [f"{n} ({results.tasks[n]['kind']})" for n in names]
    for kind in dict.fromkeys(r.kind for r in results.rows):
        lines += [f"## {kind} experts", ""]
        lines.append("| model | " + " | ".join(header) + " | avg normalized |")
        lines.append("|" + "---|" * (len(names) + 2))
        for r in (r for r in results.rows if r.kind == kind):
            cells = [_cell(r.test[n], r.normalized.get(n)) if n in r.test else "" for n in names]
            avg = "" if r.avg_normalized is None else f"{r.avg_normalized:.3f}"
            lines.append(f"| {_label(r)} | " + " | ".join(cells) + f" | {avg} |")
        lines.append("")
    notes = [r for r in results.rows if r.note is not None]
    if notes:
        lines += ["Notes:", ""]
        lines += [f"- {r.kind} {_label(r)}: {r.note}." for r in notes]
        lines.append("")
    if results.skipped:
        lines += ["Not run:", ""]
        lines += [f"- {s.name}: {s.reason}" for s in results.skipped]
        lines.append("")
    if results.failed:
        lines += ["Failed:", ""]
        lines += [f"- {f['kind']} {f['method']}: {f['error']}" for f in results.failed]
        lines.append("")
    s = results.seconds
    lines.append(f"Time: {s['total']:.0f} s (training {s['train']:.0f} s).")
    return "\n".join(lines) + "\n"
