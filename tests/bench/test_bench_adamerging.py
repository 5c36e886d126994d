"""AdaMerging rows of `splice bench` on the tiny BERT (full experts only, few steps)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bench_test_util import tiny_config
from safetensors.torch import load_file

from splice.bench import parse_bench_config, run_bench
from splice.bench.methods import select_methods
from splice.errors import SpliceError

METHODS = {
    "methods": ["task_arithmetic", "adamerging", "adamerging++"],
    "grids": {"task_arithmetic": {"lambda": [0.3]}},
    # λ stays at its init 0.3 (a vanishing lr): the task-wise merge is Task Arithmetic at 0.3
    "params": {
        "adamerging": {"steps": 1, "lr": 1e-12},
        # steps and lr auto: the budget of one expert's training passes
        "adamerging++": {"granularity": ["layer"], "density": 0.5},
    },
}


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-adamerging")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLICE_CACHE", str(root / "cache"))
        data = tiny_config(
            tiny_bert,
            tiny_tasks,
            kinds=["full"],
            merge=METHODS,
        )
        data["baselines"] = {"probe": False, "multitask": False}
        data["training"]["epochs"] = 4  # experts need not be good here: faster
        cfg = parse_bench_config(data)
        yield cfg, run_bench(cfg, root / "out", progress=False), root / "out"


def test_rows_notes_and_task_arithmetic_at_the_init(run):
    _, res, out = run
    assert res.failed == []
    rows = {(r.method, (r.params or {}).get("granularity")): r for r in res.tables["full"]}
    plain_task, plain_layer = rows[("adamerging", "task")], rows[("adamerging", "layer")]
    plus = rows[("adamerging++", "layer")]
    assert ("adamerging++", "task") not in rows
    ta = next(
        r for r in res.tables["full"] if r.method == "task_arithmetic" and r.variant == "tuned"
    )
    assert ta.params["lambda"] == 0.3
    assert plain_task.test == ta.test and plain_layer.test == ta.test
    expert_steps = [e.steps for e in res.experts["full"].values()]
    steps = math.floor(sum(expert_steps) / len(expert_steps) / 2)  # 2 experts, 1 batch each
    assert steps > 1
    lr = round(0.6 / steps, 6)
    assert plus.params == {"granularity": "layer", "steps": steps, "lr": lr, "density": 0.5}
    for r in (plain_task, plain_layer, plus):
        assert "unlabeled test inputs (labels unused" in r.note
        assert "x one expert's training" in r.note
        assert r.merge_seconds > 0
    assert "sentiment 0.300, topic 0.300" in plain_task.note
    assert (
        f"adamerging++ (full; granularity=layer, steps={steps}, lr={lr}, density=0.5): "
        f"{plus.note}." in (out / "results.md").read_text()
    )


def test_learning_lowers_the_test_entropy(run, tiny_tasks):
    """Ten steps at a larger rate: the merged model's mean entropy over all test inputs
    (through each task's head) is lower at the learned λ than at the init."""
    from splice.bench.adamerging import AdaMergingSettings, learn_merge, unlabeled_batches
    from splice.bench.backbone import load_heads, prepare_base
    from splice.bench.evaluate import EncodedSplit, Evaluator
    from splice.bench.tasks import prepare_task
    from splice.train.adamerging import entropy

    cfg, res, _ = run
    tasks = [prepare_task(str(p), cfg.data) for p in tiny_tasks]
    base = prepare_base(cfg.model, cfg.training.seed)
    for t in tasks:
        base.fresh_model(t)
    ev = Evaluator(base, tasks, cfg.training.max_length, cfg.eval_batch_size)
    names = [t.name for t in tasks]
    folders = [Path(res.experts["full"][n].folder) for n in names]
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    heads = {n: load_heads(f / "heads.safetensors")[n] for n, f in zip(names, folders)}
    base_state = base.backbone_state()
    settings = AdaMergingSettings(steps=10, lr=0.05, granularity=["task"])

    def test_entropy(state):
        ev.load_backbone(state)
        total = 0.0
        with torch.no_grad():
            for n in names:
                head = ev.head_module(n, heads[n])
                batches = unlabeled_batches(ev, n, 16, 0)
                assert all("labels" not in b for b in batches)
                test = ev.tasks[n].parts["test"]
                assert sum(len(b["input_ids"]) for b in batches) == len(test)
                feats = ev.features(EncodedSplit(batches, []))
                total += sum(float(entropy(head(f))) for f in feats) / len(feats)
        return total

    res_learned = learn_merge(ev, "adamerging", settings, "task", base_state, states, heads, names)
    init = {
        k: base_state[k] + 0.3 * sum(s[k] - base_state[k] for s in states)
        if base_state[k].is_floating_point()
        else base_state[k]
        for k in base_state
    }
    assert res_learned.coefficients.tolist() != pytest.approx([0.3, 0.3])
    assert test_entropy(res_learned.state) < test_entropy(init)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"params": {"adamerging": {"steps": 0}}}, "steps must be a positive integer or 'auto'"),
        ({"params": {"adamerging": {"lr": -0.1}}}, "lr must be a positive number or 'auto'"),
        ({"params": {"adamerging++": {"stesp": 3}}}, "did you mean 'steps'"),
        ({"params": {"adamerging": {"density": 0.2}}}, "'density' is the TIES trim"),
        ({"params": {"adamerging": {"granularity": []}}}, "granularity"),
        ({"grids": {"adamerging": {"lr": [0.1]}}}, "learns its coefficients; it has no sweep"),
    ],
)
def test_settings_errors_before_any_training(kw, match):
    with pytest.raises(SpliceError, match=match):
        select_methods(["adamerging", "adamerging++"], 2, **kw)


def test_named_only_and_planned_with_the_settings():
    planned, _ = select_methods("all", 4)
    assert not any(p.data_aware for p in planned)
    (p,) = select_methods(["adamerging++"], 3, params={"adamerging++": {"steps": 7}})[0]
    assert p.data_aware and p.sweep is None
    assert p.params["steps"] == 7 and p.params["density"] == 0.2 and p.params["init"] == 0.3
    assert p.params["lr"] == "auto"


def test_auto_schedule_is_one_experts_passes():
    """steps: auto = ⌊mean expert steps / (K · batches_per_step)⌋, lr: auto = 0.6 / steps;
    numbers given are kept; an expert without a recorded step count is skipped in the mean."""
    from splice.bench.adamerging import AdaMergingSettings, resolve_schedule

    auto = AdaMergingSettings()
    got = resolve_schedule(auto, [150, 151, 140, None])  # mean 147, K 4: 36 steps
    assert (got.steps, got.lr) == (36, 0.6 / 36)
    two = resolve_schedule(AdaMergingSettings(batches_per_step=2), [150, 150])
    assert (two.steps, two.lr) == (37, 0.6 / 37)
    assert resolve_schedule(auto, [3, 3, 3, 3, 3]).steps == 1  # never 0
    fixed = resolve_schedule(AdaMergingSettings(steps=7, lr=0.05), [150, 150])
    assert (fixed.steps, fixed.lr) == (7, 0.05)
    assert resolve_schedule(AdaMergingSettings(lr=0.05), [80, 80]).lr == 0.05
    with pytest.raises(SpliceError, match="give steps \\(and lr\\) as numbers"):
        resolve_schedule(auto, [None, None])
