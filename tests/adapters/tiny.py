"""Tiny Hugging Face models built from configs (seeded), for adapter tests."""

from __future__ import annotations

import torch

import tiny_hf


def tiny_llama(seed: int = 0):
    return tiny_hf.tiny_llama(seed, intermediate_size=48, max_position_embeddings=64).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_hf.tiny_bert_config(num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


FACTORIES = {"llama": tiny_llama, "bert": tiny_bert_cls, "gpt2": tiny_gpt2}


def inputs(seed: int = 1, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 64, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


@torch.no_grad()
def logits(model, **extra) -> torch.Tensor:
    return model(**inputs(), **extra).logits


@torch.no_grad()
def randomize(params, seed: int = 3, scale: float = 0.1) -> None:
    """Give adapter parameters non-trivial values (B = 0 at init would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g) * scale)


TINY_WORDS = ["<s>", "<unk>"] + [f"w{i}" for i in range(2, 64)]


def tiny_tokenizer_dir(path) -> str:
    """A word-level tokenizer over the tiny models' 64 ids ("<s>"=0, "<unk>"=1, "w2".."w63"),
    adding "<s>" in front like Llama's, saved as a HF tokenizer folder (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return str(path)
