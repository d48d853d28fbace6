import json

import pytest
import torch

from soft_prompt.description import (
    DEFAULT_TARGET,
    PLACEHOLDER,
    class_rate,
    default_layers,
    describe,
    description_of,
    generate_patched,
    layer_grid,
    rouge_l,
    stop_token_ids,
)
from soft_prompt.model import SoftPromptModel
from soft_prompt.tiny import ARCHITECTURES, build_tiny_model, build_tokenizer

TEXT = "the cat is lovely and my neighbour made me smile"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_prompted_model(architecture: str, tokenizer, **metadata) -> SoftPromptModel:
    # initializer_range 0.3: sharp enough that a patch changes the greedy tokens
    base_model = build_tiny_model(architecture, len(tokenizer), initializer_range=0.3)
    return SoftPromptModel(base_model, 4, tokenizer=tokenizer, seed=0, metadata=metadata)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_texts_own_states_patched_back_reproduce_its_continuation(architecture, tokenizer):
    model = tiny_prompted_model(architecture, tokenizer)
    ids = tokenizer(TEXT)["input_ids"]
    base_model, eos = model.base_model, tokenizer.eos_token_id
    expected = base_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    hidden = base_model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # L + 1 of [1, T, D]
    start = len(ids) - 4  # the last 4 positions, the one that predicts the next token among them
    own = torch.cat([hidden[layer][:, start:] for layer in (0, 1)])  # [2, 4, D]
    # both layers in one batch; row b is patched at layer b
    assert generate_patched(model, ids, start, own, [0, 1], 8, {eos}) == [expected, expected]
    # a patch from position 0 on (no shared text before it)
    assert generate_patched(model, ids, 0, hidden[1][:, :3], [1], 8, {eos}) == [expected]
    # the patch does act: other states in the same place change the continuation
    noise = torch.randn(own.shape, generator=torch.Generator().manual_seed(0)) * own.norm(dim=-1, keepdim=True)
    assert all(continuation != expected for continuation in generate_patched(model, ids, start, noise, [0, 1], 8, {eos}))


def test_layer_grid_respects_the_models_depth():
    assert default_layers(30) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert default_layers(24) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert default_layers(2) == [0, 1]
    assert layer_grid(2) == [0, 1]
    assert layer_grid(30, [20, 3, 20]) == [3, 20]
    for layers in ([2], [-1], []):
        with pytest.raises(ValueError, match="--layers must name layers 0..1"):
            layer_grid(2, layers)


def test_rouge_l_on_hand_examples():
    # LCS "the cat on the mat" = 5 words of 6 on both sides
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6, abs=1e-15)
    # LCS "b d" = 2: P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7, abs=1e-15)
    assert rouge_l("Hate, SPEECH!", "hate speech") == 1.0
    assert rouge_l("speech hate", "hate speech") == 0.5  # LCS 1 word: P = R = 1/2
    assert rouge_l("", "hate speech") == 0.0 and rouge_l("x y", "z") == 0.0


def test_class_rate_counts_label_words_named_in_order():
    labels = ["hate speech", "no hate speech"]
    assert class_rate("It flags hate speech.", labels) == 0.5
    assert class_rate("hate speech or no hate speech", labels) == 1.0
    assert class_rate("no hate speech", labels) == 1.0  # the longer label holds the shorter one
    assert class_rate("speech that is hateful", labels) == 0.0
    assert class_rate("anything", []) is None


def test_descriptions_end_at_the_separator(tokenizer):
    ids = tokenizer.encode(" the cat | my neighbour\nthis")
    assert description_of(tokenizer, ids) == "the cat"
    assert description_of(tokenizer, tokenizer.encode(" |\n the cat\n|")) == "the cat"  # from the first word on
    stop = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stop and tokenizer.convert_tokens_to_ids("|") in stop
    assert all("|" in tokenizer.decode([i]) or "\n" in tokenizer.decode([i]) for i in stop - {tokenizer.eos_token_id})


def test_describe_holds_every_pair_with_scores_and_the_controls(tokenizer):
    model = tiny_prompted_model("llama", tokenizer, init_text="the cat is lovely", label_words=["hate speech", "no hate speech"])
    initial = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    result = describe(model, initial_prompt=initial, max_new_tokens=6, top=3)
    json.dumps(result)  # JSON-ready
    assert result["layers"] == [0, 1] and result["num_layers"] == 2
    assert result["references"] == ["the cat is lovely"] and result["label_words"] == ["hate speech", "no hate speech"]
    assert list(result["sources"]) == ["trained", "initial", "random"]
    for name, entries in result["sources"].items():
        assert [(e["source_layer"], e["target_layer"]) for e in entries] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for entry in entries:
            assert isinstance(entry["description"], str)
            assert entry["class_rate"] == class_rate(entry["description"], result["label_words"])
            assert entry["rouge_l"] == rouge_l(entry["description"], "the cat is lovely")
        assert len(result["best"][name]) == 3 and all(entry in entries for entry in result["best"][name])
    assert set(result["unpatched"]) == {"description", "class_rate", "rouge_l"}
    # without an initial prompt or references: the random control stays, ROUGE-L is None
    bare = describe(tiny_prompted_model("llama", tokenizer), layers=[1], max_new_tokens=2)
    assert list(bare["sources"]) == ["trained", "random"] and bare["sources"]["trained"][0]["rouge_l"] is None


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_layer_zero_pair_is_the_prompt_in_place_of_the_placeholders(architecture, tokenizer):
    """(0, 0) against an independent reference: generate() on the target text's embeddings with
    the prompt vectors where the placeholders would be."""
    model = tiny_prompted_model(architecture, tokenizer)
    result = describe(model, layers=[0], max_new_tokens=10)
    prefix = torch.tensor([tokenizer(DEFAULT_TARGET.rstrip())["input_ids"]])
    embeddings = model.base_model.get_input_embeddings()
    prompt = model.prompt.weight.detach()  # [V, D]
    if architecture == "gpt2":
        # GPT-2's layer inputs hold its absolute position embeddings: the source states carry
        # positions 0..V-1's, and generate() adds T..T+V-1's to what stands in their place.
        positions = model.base_model.transformer.wpe.weight
        prompt = prompt + positions[:4] - positions[prefix.shape[1] : prefix.shape[1] + 4]
    inputs_embeds = torch.cat([embeddings(prefix), prompt[None]], dim=1)  # [1, T + V, D]
    tokens = model.base_model.generate(inputs_embeds=inputs_embeds, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert result["sources"]["trained"][0]["description"] == description_of(tokenizer, tokens[0].tolist())
    # and the unpatched control is the text with its placeholders
    placeholder = tokenizer.encode(PLACEHOLDER)[-1]
    plain = torch.cat([prefix, torch.full((1, 4), placeholder)], dim=1)
    tokens = model.base_model.generate(plain, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, plain.shape[1]:]
    assert result["unpatched"]["description"] == description_of(tokenizer, tokens.tolist())


def test_plot_descriptions_writes_a_png(tmp_path):
    from soft_prompt.analysis_plots import plot_descriptions

    entries = [{"source_layer": s, "target_layer": t, "description": "d", "class_rate": 0.5, "rouge_l": None}
               for s in (0, 2) for t in (0, 2)]
    result = {"layers": [0, 2], "sources": {"trained": entries, "random": entries}}
    path = plot_descriptions(result, tmp_path / "descriptions.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for entry in entries:
        entry["class_rate"] = None
    with pytest.raises(ValueError, match="no scores to plot"):
        plot_descriptions(result, tmp_path / "none.png")
