"""Default target modules, one table: (adapter method, model type) -> module name suffixes.

Used when an adapter config leaves ``target_modules`` unset. The values follow PEFT's
``TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`` tables where PEFT has the method (a test
keeps LoRA's equal to PEFT's); BitFit's are the modules that carry biases. Adding a method or
a model type is one row here. IA3 also needs to know which targets are feed-forward layers
(their input is scaled instead of their output): ``IA3_FEEDFORWARD``.
"""

from __future__ import annotations

_QV = ["q_proj", "v_proj"]
_BERT_QV = ["query", "value"]
_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_BIASED = ["query", "key", "value", "dense", "LayerNorm"]
_LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
_ATTN_NORMS_LN_F = ["input_layernorm", "post_attention_layernorm", "ln_f"]
_LYCORIS = {
    **{t: _QV for t in ("llama", "mistral", "qwen2", "gemma", "gemma2")},
    "bert": _BERT_QV,
    "roberta": _BERT_QV,
}
_ROTATIONS = {
    **{t: _QV for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "bert": _BERT_QV,
    "roberta": _BERT_QV,
}

DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    "lora": {
        **{t: _QV for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
        **{t: _QV for t in ("gemma3_text", "opt", "bart", "gptj")},
        "phi": ["q_proj", "v_proj", "fc1", "fc2"],
        "bert": _BERT_QV,
        "roberta": _BERT_QV,
        "deberta-v2": ["query_proj", "value_proj"],
        "gpt2": ["c_attn"],
        "gpt_neox": ["query_key_value"],
        "falcon": ["query_key_value"],
        "bloom": ["query_key_value"],
        "t5": ["q", "v"],
    },
    "ia3": {
        "llama": ["k_proj", "v_proj", "down_proj"],
        "mistral": ["k_proj", "v_proj", "down_proj"],
        **{t: ["q_proj", "v_proj", "down_proj"] for t in ("qwen2", "qwen3", "gemma")},
        **{t: ["q_proj", "v_proj", "down_proj"] for t in ("gemma2", "gemma3_text")},
        "bert": ["key", "value", "output.dense"],
        "roberta": ["key", "value", "output.dense"],
        "gpt2": ["c_attn", "mlp.c_proj"],
        "t5": ["k", "v", "wo"],
        "opt": ["q_proj", "k_proj", "fc2"],
        "phi": ["q_proj", "v_proj", "fc2"],
    },
    "vera": {
        **{t: _QV for t in ("llama", "mistral", "qwen2", "gemma")},
        "bert": _BERT_QV,
        "roberta": _BERT_QV,
        "gpt2": ["c_attn"],
    },
    "loha": _LYCORIS,
    "lokr": _LYCORIS,
    "oft": _ROTATIONS,
    "hra": _ROTATIONS,
    "bitfit": {
        "bert": _BERT_BIASED,
        "roberta": _BERT_BIASED,
        "gpt2": ["c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"],
        "qwen2": ["q_proj", "k_proj", "v_proj"],
        **{t: _LLAMA_LINEAR for t in ("llama", "mistral", "gemma", "gemma2")},
    },
    "ln_tuning": {
        **{t: _LLAMA_NORMS for t in ("llama", "mistral", "gemma")},
        "gemma2": [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "norm",
        ],
        "qwen2": ["post_attention_layernorm"],
        "qwen3": ["post_attention_layernorm"],
        "bloom": _ATTN_NORMS_LN_F,
        "falcon": _ATTN_NORMS_LN_F,
        "gpt2": ["ln_1", "ln_2", "ln_f"],
        "gptj": ["ln_1", "ln_f"],
        "phi": ["input_layernorm", "final_layernorm"],
        "t5": ["layer_norm", "final_layer_norm"],
        "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
        "bert": ["LayerNorm"],
        "roberta": ["LayerNorm"],
    },
}

IA3_FEEDFORWARD: dict[str, list[str]] = {
    **{
        t: ["down_proj"]
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "gpt2": ["mlp.c_proj"],
    "t5": ["wo"],
    "opt": ["fc2"],
    "phi": ["fc2"],
}


def default_targets(method: str, model_type: str) -> list[str] | None:
    """The default target modules of ``method`` on ``model_type`` (None: no default)."""
    targets = DEFAULT_TARGETS.get(method, {}).get(model_type)
    return list(targets) if targets is not None else None
