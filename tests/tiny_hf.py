"""The shared tiny Hugging Face models of the test suite, built from configs (seeded, no
download). One definition each; tests that need a variant pass config overrides."""

from __future__ import annotations

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaConfig(**{**kw, **overrides})


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama causal LM (hidden 32, vocab 64), weights from ``torch.manual_seed(seed)``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def tiny_bert_config(**overrides):
    """A 2-layer BERT config (hidden 32, 4 heads, vocab 64, 64 positions)."""
    from transformers import BertConfig

    kw = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return BertConfig(**{**kw, **overrides})


def tiny_qwen2(seed: int = 0):
    """A 2-layer Qwen2 causal LM (hidden 32, vocab 64, q/k/v biases), from ``manual_seed(seed)``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    sizes = {"hidden_size": 32, "intermediate_size": 48, "vocab_size": 64}
    config = Qwen2Config(**sizes, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(config).eval()


def tiny_vit(seed: int = 0):
    """A 1-layer ViT image classifier (8×8 RGB images, 4×4 patches: a Conv2d patch embedding,
    hidden 16, 3 labels), in eval mode."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    sizes = {"image_size": 8, "patch_size": 4, "hidden_size": 16, "intermediate_size": 24}
    config = ViTConfig(**sizes, num_hidden_layers=1, num_attention_heads=2, num_labels=3)
    return ViTForImageClassification(config).eval()


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer():
    """A character-level fast tokenizer with exactly 64 ids (tiny_llama's vocab): 4 specials
    (<pad> 0, <s> 1, </s> 2 = EOS, <unk> 3), lowercase letters, digits, punctuation, space,
    newline and A-N; a plain "role: content" chat template. Built in code, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?'-:;\nABCDEFGHIJKLMN")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    assert len(vocab) == 64
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def save_tiny_llama_folder(path, seed: int = 0):
    """An HF model folder (config, safetensors weights, tokenizer) holding `tiny_llama(seed)`
    with `tiny_tokenizer()` (eos/pad ids set in the config), for commands that load a BASE."""
    model = tiny_llama(seed, eos_token_id=2, pad_token_id=0, bos_token_id=1).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_llama_classifier_folder(path, seed: int = 0, labels=("neg", "pos")):
    """An HF folder holding a 2-layer Llama sequence classifier (`tiny_llama_config`, a
    ``score`` head over ``labels``, id2label set) with `tiny_tokenizer()`."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_llama_config(
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
