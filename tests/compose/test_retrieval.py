"""Retrieval of adapters by embedding similarity: the math by hand, centroid files, a tiny
library where task-A inputs retrieve adapter A, the mixed forward it feeds, errors."""

from __future__ import annotations

import math

import pytest
import torch

from splice.adapters import AdapterModel, LoraConfig, load_adapter_model, save_adapter
from splice.compose.embedding import MeanPoolEmbedder, mean_pool
from splice.compose.library import (
    CENTROID_FILE,
    AdapterLibrary,
    RetrievalError,
    compute_centroid,
    read_centroid,
    write_centroid,
)
from splice.compose.retrieval import (
    Retriever,
    cosine_similarities,
    load_library,
    retrieve_forward,
    sets_from_scores,
    top_k_softmax,
)


def test_cosine_top_k_and_softmax_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    centroids = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    sims = cosine_similarities(queries, centroids)
    h = 1 / math.sqrt(2)
    torch.testing.assert_close(sims, torch.tensor([[1.0, h, 0.0], [0.0, h, 1.0]]))
    top, w = top_k_softmax(sims, 2, 0.5)
    assert top.tolist() == [[0, 1], [2, 1]]
    # softmax([1, 1/√2] / 0.5): w0 = 1 / (1 + e^{2(1/√2 − 1)})
    w0 = 1 / (1 + math.exp(2 * (h - 1)))
    torch.testing.assert_close(w, torch.tensor([[w0, 1 - w0], [w0, 1 - w0]]))
    sets = sets_from_scores(sims, ["a", "b", "c"], 2, 0.5)
    assert list(sets[1]) == ["c", "b"] and sets[1]["c"] == pytest.approx(w0)


def test_ties_go_to_the_earlier_adapter_and_k_is_capped():
    top, w = top_k_softmax(torch.tensor([[0.5, 0.5, 0.2]]), 1, 0.1)
    assert top.tolist() == [[0]] and w.tolist() == [[1.0]]
    top, w = top_k_softmax(torch.tensor([[0.1, 0.3]]), 5, 1.0)
    assert top.tolist() == [[1, 0]]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_mean_pool_skips_padding_and_normalises():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])
    out = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0]]) / math.sqrt(8))


def test_centroid_file_round_trip(tmp_path):
    c = compute_centroid(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(c, torch.tensor([2.0, 3.0]))
    tmp_path.joinpath("ad").mkdir()
    path = write_centroid(tmp_path / "ad", c, "minilm", 2)
    assert path == tmp_path / "ad" / CENTROID_FILE
    back = read_centroid(tmp_path / "ad")
    torch.testing.assert_close(back.vector, c)
    assert (back.embedder, back.examples, back.dim) == ("minilm", 2, 2)


# -- a tiny library ---------------------------------------------------------------------------

TASK_A = ["abc abc cab", "bca acb abc", "cab bac", "aabbcc abc"]
TASK_B = ["123 321 231", "213 132", "312 123 321", "112233 123"]


@pytest.fixture(scope="module")
def embedder():
    """A 2-layer BERT encoder (hidden 32) over the 64-id character tokenizer."""
    from transformers import BertConfig, BertModel

    from tiny_hf import tiny_tokenizer

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 48, "max_position_embeddings": 64}
    config = BertConfig(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, **sizes)
    return MeanPoolEmbedder(BertModel(config).eval(), tiny_tokenizer(), "tiny-bert")


def _adapter(path, seed, target=("q_proj", "v_proj"), model=None):
    from tiny_hf import tiny_llama

    am = AdapterModel(model or tiny_llama(max_position_embeddings=64).eval())
    am.add_adapter("default", LoraConfig(r=2, target_modules=list(target)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters("default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(am, path)
    return path


@pytest.fixture(scope="module")
def library_dirs(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("lib")
    dirs = []
    for name, texts, seed in (("task_a", TASK_A, 1), ("task_b", TASK_B, 2)):
        d = _adapter(root / name, seed)
        write_centroid(d, compute_centroid(embedder.embed(texts)), embedder.embedder_id, 4)
        dirs.append(d)
    return dirs


def test_inputs_of_a_task_retrieve_its_adapter(library_dirs, embedder):
    library = AdapterLibrary.load(library_dirs)
    retriever = Retriever(library, embedder, k=2, temperature=0.05)
    sets = retriever.route(["acb cba", "321 213", "bac abc"])
    assert [next(iter(s)) for s in sets] == ["task_a", "task_b", "task_a"]
    for s in sets:
        assert sum(s.values()) == pytest.approx(1.0)
        assert next(iter(s.values())) > 0.5


def test_each_row_runs_its_retrieved_adapter(library_dirs, embedder):
    from tiny_hf import tiny_llama

    library = AdapterLibrary.load(library_dirs)
    retriever = Retriever(library, embedder, k=1)
    am = AdapterModel(tiny_llama(max_position_embeddings=64).eval())
    load_library(am, library)
    ids = torch.tensor([[1, 5, 9, 12], [1, 7, 3, 30]])
    with torch.no_grad():
        got = retrieve_forward(am, retriever, ["321 123", "cab abc"], input_ids=ids).logits
        for row, d in ((0, library_dirs[1]), (1, library_dirs[0])):
            alone = load_adapter_model(tiny_llama(max_position_embeddings=64).eval(), d)
            torch.testing.assert_close(got[row], alone(input_ids=ids[row : row + 1]).logits[0])


# -- errors -------------------------------------------------------------------------------------


def test_errors(tmp_path, library_dirs, embedder):
    with pytest.raises(RetrievalError, match="empty"):
        AdapterLibrary.load([])
    bare = _adapter(tmp_path / "bare", 3)
    with pytest.raises(RetrievalError, match="no splice_centroid"):
        AdapterLibrary.load([library_dirs[0], bare])
    write_centroid(bare, torch.ones(32), "other-embedder", 1)
    with pytest.raises(RetrievalError, match="embedder 'other-embedder'"):
        AdapterLibrary.load([library_dirs[0], bare])
    write_centroid(bare, torch.ones(8), "tiny-bert", 1)
    with pytest.raises(RetrievalError, match="dimension 8"):
        AdapterLibrary.load([library_dirs[0], bare])
    with pytest.raises(RetrievalError, match="two adapters are named"):
        AdapterLibrary.load([library_dirs[0], library_dirs[0]])
    library = AdapterLibrary.load(library_dirs)
    other = MeanPoolEmbedder(embedder.model, embedder.tokenizer, "minilm")
    with pytest.raises(RetrievalError, match="come from embedder 'tiny-bert'"):
        Retriever(library, other)
    with pytest.raises(RetrievalError, match="temperature"):
        Retriever(library, embedder, temperature=0.0)
    with pytest.raises(RetrievalError, match="k must"):
        Retriever(library, embedder, k=0)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CENTROID_FILE).write_bytes(b"not safetensors")
    with pytest.raises(RetrievalError, match="not a safetensors file"):
        read_centroid(tmp_path / "junk")


def test_an_adapter_for_another_base_is_named(tmp_path, library_dirs):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_hf import tiny_llama

    tiny_gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    gpt2 = _adapter(tmp_path / "gpt2", 4, target=("c_attn",), model=tiny_gpt2)
    write_centroid(gpt2, read_centroid(library_dirs[0]).vector, "tiny-bert", 1)
    library = AdapterLibrary.load([library_dirs[0], gpt2])
    am = AdapterModel(tiny_llama(max_position_embeddings=64).eval())
    with pytest.raises(RetrievalError, match="library adapter 'gpt2' does not fit this model"):
        load_library(am, library)
    assert list(am.configs) == []  # the adapter loaded before it was removed again


def test_the_cli_defaults_are_the_apis():
    from splice.commands import retrieve
    from splice.compose import retrieval

    assert (retrieve.DEFAULT_K, retrieve.DEFAULT_TEMPERATURE) == (
        retrieval.DEFAULT_K,
        retrieval.DEFAULT_TEMPERATURE,
    )


def test_the_base_model_as_embedder_ignores_its_adapters(embedder):
    from tiny_hf import tiny_llama, tiny_tokenizer

    plain = MeanPoolEmbedder(tiny_llama().eval(), tiny_tokenizer(), "base")
    am = AdapterModel(tiny_llama().eval())
    am.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    through_adapters = MeanPoolEmbedder(am, tiny_tokenizer(), "base")
    texts = ["abc", "hello there"]
    torch.testing.assert_close(through_adapters.embed(texts), plain.embed(texts))
    with torch.no_grad():  # while the adapter itself does change the hidden states
        ids = torch.tensor([[5, 6, 7]])
        changed = am(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        base = plain.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(changed, base)
