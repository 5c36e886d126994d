"""LoRA+ parameter groups: B at lr·ratio, same grouping as PEFT's create_loraplus_optimizer."""

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.optimizers import create_loraplus_optimizer
from tiny import tiny_bert_cls, tiny_llama

from splice.adapters import AdapterModel, LoraConfig, loraplus_param_groups


def _key_of_splice(name: str) -> str:
    path, _, suffix = name.removeprefix("model.").partition(".adapters.default.")
    suffix = suffix.removeprefix("module.")  # modules_to_save copies
    return f"{path}.{suffix.replace('base_bias', 'base_layer.bias')}"


def _key_of_peft(name: str) -> str:
    n = name.removeprefix("base_model.model.")
    for part in (".default", ".modules_to_save"):
        n = n.replace(part, "")
    return n.removesuffix(".weight") if "lora_magnitude_vector" in n else n


def _groups(names_by_param, groups):
    return [
        (g["lr"], g["weight_decay"], sorted(names_by_param[id(p)] for p in g["params"]))
        for g in groups
    ]


def _compare(make, kw, **opts):
    torch.manual_seed(0)
    pm = get_peft_model(make(), PeftLoraConfig(**kw, **opts.get("peft", {})))
    opt = create_loraplus_optimizer(
        pm,
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=opts["ratio"],
        loraplus_weight_decay=opts["wd"],
        loraplus_lr_embedding=opts["emb"],
    )
    peft_names = {id(p): _key_of_peft(n) for n, p in pm.named_parameters()}
    want = _groups(peft_names, opt.param_groups)
    am = AdapterModel(make())
    am.add_adapter("default", LoraConfig(**kw))
    groups = loraplus_param_groups(
        am, lr=1e-3, ratio=opts["ratio"], weight_decay=opts["wd"], embedding_lr=opts["emb"]
    )
    names = {id(p): _key_of_splice(n) for n, p in am.named_parameters()}
    got = _groups(names, groups)
    assert got == want
    assert sum(len(g[2]) for g in got) == sum(p.requires_grad for p in am.parameters())
    return got


def test_loraplus_llama_embedding_dora_matches_peft():
    kw = dict(r=2, use_dora=True, target_modules=["embed_tokens", "q_proj", "v_proj"])
    got = _compare(tiny_llama, kw, ratio=16, wd=0.1, emb=1e-6)
    a, emb, b, b_nd = got
    # A at lr, B (and DoRA magnitudes, 1-D) at 16·lr with decay, embeddings at their own lr
    assert a[0] == 1e-3 and b[0] == b_nd[0] == 16e-3 and emb[0] == 1e-6
    assert all("lora_A" in n for n in a[2]) and len(a[2]) == 4
    assert {n.rsplit(".", 1)[1] for n in emb[2]} == {"lora_embedding_A", "lora_embedding_B"}
    assert sum("lora_magnitude_vector" in n for n in b[2]) == 5  # 4 linear + the embedding
    assert b_nd[2] == [] and b[1] == 0.1


def test_loraplus_bert_biases_and_head_match_peft():
    kw = dict(
        r=2,
        lora_bias=True,
        bias="lora_only",
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    got = _compare(tiny_bert_cls, kw, ratio=4, wd=0.01, emb=1e-5, peft={"task_type": "SEQ_CLS"})
    b_nd = got[3]
    # biases (lora_B.bias, the trained base biases, the head's bias) never decay
    assert b_nd[1] == 0.0 and "classifier.bias" in b_nd[2]
    assert any(n.endswith("base_layer.bias") for n in b_nd[2])
    assert "classifier.weight" in got[0][2]  # a 2-D full copy trains at lr (group A)
