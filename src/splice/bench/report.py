"""The bench's outputs: the results table, results.json, and two plots.

Table (one section per expert kind): a row per model (baselines, then merges ranked by
normalized accuracy), a column per task's test accuracy, the average accuracy, and the
normalized accuracy = mean over tasks of acc(row, task) / acc(the kind's expert for that
task, task) (`splice.data.mean_normalized_accuracy`; Ilharco et al. 2023). Baselines
(linear probe, multi-task) appear in every section, normalized by that section's experts.

Plots (matplotlib, Agg backend, PNG): ``accuracy_by_method.png`` (average test accuracy
per merge, default and tuned, with the experts / multi-task / probe as reference lines)
and ``accuracy_vs_coefficient.png`` (average validation accuracy over each swept grid).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from splice.bench.results import BenchResults, Row, Score
from splice.data import mean_normalized_accuracy, normalized_accuracy


def score_row(test: Mapping[str, float], experts: Mapping[str, float]) -> Score:
    """Average accuracy, normalized accuracy per task and on average, for one row."""
    tasks = list(experts)
    return Score(
        avg=sum(test[t] for t in tasks) / len(tasks),
        normalized={t: normalized_accuracy(test[t], experts[t]) for t in tasks},
        avg_normalized=mean_normalized_accuracy({t: test[t] for t in tasks}, experts),
    )


def section_rows(rows: Sequence[Row], kind: str, experts: Mapping[str, float]) -> list[Row]:
    """The rows of ``kind``'s section, scored against its experts: baselines in order,
    then merges, then composition rows, each group by normalized accuracy (best first)."""
    out = [
        dataclasses.replace(r, score=score_row(r.test, experts))
        for r in rows
        if r.kind in (kind, "shared")
    ]
    base = [r for r in out if r.group == "baseline"]
    ranked = [
        sorted((r for r in out if r.group == g), key=lambda r: -_score(r).avg_normalized)
        for g in ("merged", "composed")
    ]
    return base + ranked[0] + ranked[1]


def _score(r: Row) -> Score:
    assert r.score is not None, "an unscored row (report.section_rows scores them)"
    return r.score


def row_label(r: Row) -> tuple[str, str]:
    setting = ", ".join(f"{k}={v}" for k, v in (r.params or {}).items())
    if r.variant:
        setting = f"{r.variant}: {setting}" if setting else r.variant
    return r.method, setting


def markdown_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """The section's table; with composition rows, a ``rel. cost`` column: their measured
    forward time relative to the pretrained model's, 1.00 for a merge (the same model)."""
    with_cost = any(r.inference_cost is not None for r in rows)
    head = ["model", "setting", *tasks, "avg acc", "norm. acc"] + ["rel. cost"] * with_cost
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name, setting = row_label(r)
        cells = [name, setting]
        cells += [f"{100 * r.test[t]:.1f}" for t in tasks]
        cells += [f"{100 * _score(r).avg:.1f}", f"{100 * _score(r).avg_normalized:.1f}"]
        if with_cost:
            cost = 1.0 if r.group == "merged" else r.inference_cost
            cells.append("" if cost is None else f"{cost:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tables(results: BenchResults) -> str:
    """Markdown: one table per kind, with the chance level of each task under it."""
    tasks = list(results.tasks)
    parts = []
    for kind, section in results.tables.items():
        parts.append(f"### {kind} experts\n")
        parts.append(markdown_table(section, tasks))
        parts.append("")
    chance = ", ".join(f"{t} {100 / results.tasks[t].classes:.1f}" for t in tasks)
    parts.append(f"Test accuracy in %; chance (balanced test sets): {chance}.")
    for kind, section in results.tables.items():
        for r in section:
            if r.routing is not None:
                share = ", ".join(f"{t} {100 * r.routing[t]:.1f}" for t in tasks)
                parts.append(
                    f"{r.method} ({kind}): share of test examples whose top-1 expert is "
                    f"their own task's, in %: {share}; rows use the true task's head."
                )
    for kind, section in results.tables.items():
        for r in section:
            if r.note is not None:
                setting = row_label(r)[1]
                parts.append(f"{r.method} ({kind}; {setting}): {r.note}.")
    edges = [f"{s.kind} {s.method} ({s.param}={s.best})" for s in results.sweeps if s.at_grid_edge]
    if edges:
        parts.append(
            "Tuned at an end of its grid (the optimum may lie outside): " + ", ".join(edges) + "."
        )
    skipped = [f"{s.name} ({s.reason})" for s in results.skipped]
    if skipped:
        parts.append("Not applicable: " + "; ".join(skipped) + ".")
    for f in results.failed:
        parts.append(f"Failed on the {f.kind} experts, no row: {f.method} ({f.error}).")
    return "\n".join(parts) + "\n"


def print_results(results: BenchResults, out: str | Path) -> None:
    """The tables and the time taken, as `splice bench` and `splice demo` end."""
    t = results.timing
    assert t is not None
    print(f"\n{render_tables(results)}")
    print(
        f"total {t.total_s:.0f} s (training {t.train_s:.0f} s; experts are cached for "
        f"the next run); results in {out}/ (results.json, results.md, *.png)"
    )


def write_outputs(out: Path, results: BenchResults) -> None:
    """results.json, results.md and the plots (the sweep plot when something was swept)."""
    text = json.dumps(results.to_json(), indent=2, default=str)
    (out / "results.json").write_text(text + "\n")
    (out / "results.md").write_text(render_tables(results))
    plot_methods(out / "accuracy_by_method.png", results)
    if results.sweeps:
        plot_sweeps(out / "accuracy_vs_coefficient.png", results)


def plot_methods(path: Path, results: BenchResults) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results.tables)
    n = max(len([r for r in results.tables[k] if r.group == "merged"]) for k in kinds)
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(6.5 * len(kinds), 1.2 + 0.3 * max(n, 4)), squeeze=False
    )
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in results.tables[kind] if r.group == "merged"][::-1]
        labels = [" ".join(x for x in row_label(r) if x) for r in rows]
        colors = ["tab:orange" if r.variant == "tuned" else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), [100 * _score(r).avg for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        styles = {"experts": "k-", "multi-task": "g--", "linear probe": "r:"}
        for r in results.tables[kind]:
            if r.group == "baseline" and r.method in styles:
                ax.axvline(
                    100 * _score(r).avg,
                    linestyle=styles[r.method][1:],
                    color=styles[r.method][0],
                    label=r.method,
                )
        ax.set_xlabel("average test accuracy (%)")
        ax.set_title(f"{kind} experts (blue: default, orange: tuned on validation)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweeps(path: Path, results: BenchResults) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results.tables)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for s in results.sweeps:
            if s.kind != kind:
                continue
            xs = [p.value for p in s.points]
            ys = [100 * p.avg for p in s.points]
            ax.plot(xs, ys, marker="o", label=f"{s.method} ({s.param})")
        ax.set_xlabel("coefficient")
        ax.set_ylabel("average validation accuracy (%)")
        ax.set_title(f"{kind} experts: sweep on validation", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
