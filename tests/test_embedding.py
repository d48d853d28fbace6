"""The soft prompt's initialisers: exact rows, seeds, and the errors for bad input."""

import pytest
import torch
from torch import nn

from soft_prompt import SoftPromptEmbedding
from soft_prompt.embedding import text_init_ids

INIT_TEXT = "Indicates whether the sentence contains hate speech or not"


def word_embeddings(model) -> nn.Embedding:
    return model.get_input_embeddings()


def test_random_equals_peft_nn_embedding_under_the_same_seed():
    # PEFT's RANDOM is nn.Embedding's own init (normal(0, 1)) drawn from the global RNG.
    torch.manual_seed(7)
    reference = nn.Embedding(5, 16).weight.detach()
    prompt = SoftPromptEmbedding(5, 16, "random", seed=7)
    assert torch.equal(prompt.weight.detach(), reference)
    assert prompt.weight.dtype == torch.float32


def test_seed_decides_the_rows():
    for init in ("random", "uniform"):
        a, b = SoftPromptEmbedding(4, 8, init, seed=1), SoftPromptEmbedding(4, 8, init, seed=1)
        c = SoftPromptEmbedding(4, 8, init, seed=2)
        assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_uniform_is_lester_range():
    prompt = SoftPromptEmbedding(50, 40, "uniform", seed=3)
    expected = torch.rand((50, 40), generator=torch.Generator().manual_seed(3)) - 0.5
    assert torch.equal(prompt.weight.detach(), expected)
    assert prompt.weight.min() >= -0.5 and prompt.weight.max() < 0.5


def test_text_longer_than_prompt_keeps_the_first_ids(bloom):
    model, tokenizer = bloom
    ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    prompt = SoftPromptEmbedding(4, 32, "text", word_embeddings=word_embeddings(model), tokenizer=tokenizer, init_text=INIT_TEXT)
    assert torch.equal(prompt.weight.detach(), model.get_input_embeddings().weight[ids[:4]].detach())


@pytest.mark.parametrize("text_fill", ["pad", "repeat"])
def test_text_shorter_than_prompt_is_filled(bloom, text_fill):
    model, tokenizer = bloom
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    num_virtual_tokens = len(ids) * 2 + 1
    if text_fill == "pad":
        expected_ids = ids + [tokenizer.pad_token_id] * (len(ids) + 1)
    else:
        expected_ids = ids + ids + ids[:1]
    prompt = SoftPromptEmbedding(
        num_virtual_tokens, 32, "text", word_embeddings=word_embeddings(model), tokenizer=tokenizer,
        init_text="the cat", text_fill=text_fill,
    )
    table = model.get_input_embeddings().weight.detach()
    assert torch.equal(prompt.weight.detach(), table[expected_ids])


def test_text_init_takes_no_special_tokens(bloom):
    _, tokenizer = bloom
    tokenizer.add_special_tokens({"bos_token": "<s>"})  # a tokenizer that would add BOS must not here
    ids = text_init_ids(tokenizer, "the cat", 2, "pad")
    assert ids == tokenizer("the cat", add_special_tokens=False)["input_ids"][:2]


def test_vocab_draws_seeded_ids_below_the_limit(bloom):
    model, _ = bloom
    table = model.get_input_embeddings().weight.detach()
    prompt = SoftPromptEmbedding(6, 32, "vocab", word_embeddings=word_embeddings(model), seed=5, vocab_size=50)
    expected_ids = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(prompt.weight.detach(), table[expected_ids])
    # Default: Lester et al.'s first 5000 ids, capped by the vocabulary (400 here).
    default = SoftPromptEmbedding(6, 32, "vocab", word_embeddings=word_embeddings(model), seed=5)
    expected_ids = torch.randint(0, 400, (6,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(default.weight.detach(), table[expected_ids])


LABELS = ["no hate speech", "hate speech"]


def test_labels_put_each_label_words_mean_embedding_on_a_token(bloom):
    model, tokenizer = bloom
    table = model.get_input_embeddings().weight.detach()
    means = [table[tokenizer(word, add_special_tokens=False)["input_ids"]].mean(0) for word in LABELS]
    assert all(len(tokenizer(word, add_special_tokens=False)["input_ids"]) > 1 for word in LABELS)  # a mean, not a row
    common = dict(word_embeddings=word_embeddings(model), tokenizer=tokenizer, label_words=LABELS)
    # The rest: vocabulary rows drawn as "vocab" draws them, ...
    prompt = SoftPromptEmbedding(5, 32, "labels", seed=5, vocab_size=50, **common)
    drawn = torch.randint(0, 50, (3,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(prompt.weight.detach(), torch.cat([torch.stack(means), table[drawn]]))
    # ... or the init text's first rows.
    text_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"][:3]
    prompt = SoftPromptEmbedding(5, 32, "labels", init_text=INIT_TEXT, **common)
    assert torch.equal(prompt.weight.detach(), torch.cat([torch.stack(means), table[text_ids]]))
    assert torch.equal(SoftPromptEmbedding(2, 32, "labels", **common).weight.detach(), torch.stack(means))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(label_words=None), "needs the label words"),
        (dict(label_words=["a", "b", "c"], num_virtual_tokens=2), "pass --num-virtual-tokens 3 or more"),
        (dict(tokenizer=None), "init='labels' needs a tokenizer"),
    ],
)
def test_labels_init_errors_name_the_fix(bloom, kwargs, message):
    model, tokenizer = bloom
    arguments = dict(num_virtual_tokens=4, embed_dim=32, init="labels", word_embeddings=word_embeddings(model),
                     tokenizer=tokenizer, label_words=LABELS)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SoftPromptEmbedding(**arguments)


def test_the_model_makes_a_labels_prompt(bloom):
    from soft_prompt import SoftPromptModel

    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=4, init="labels", tokenizer=tokenizer, label_words=LABELS,
                              init_text="the cat", seed=1)
    direct = SoftPromptEmbedding(4, 32, "labels", word_embeddings=word_embeddings(model), tokenizer=tokenizer,
                                 label_words=LABELS, init_text="the cat", seed=1)
    assert torch.equal(wrapper.prompt.weight, direct.weight)
    assert wrapper.metadata["init"] == "labels" and wrapper.metadata["init_text"] == "the cat"


def test_forward_is_a_view_of_the_fp32_weight():
    prompt = SoftPromptEmbedding(3, 8, seed=0)
    batch = prompt(4)
    assert batch.shape == (4, 3, 8) and batch.dtype == torch.float32
    assert batch.data_ptr() == prompt.weight.data_ptr()  # expanded, not copied
    assert torch.equal(batch[2], prompt.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
        (dict(init="zeros"), "unknown init 'zeros'"),
        (dict(init="text", init_text="   "), "needs a non-empty init_text"),
        (dict(init="text", init_text="the cat", tokenizer=None), "needs a tokenizer"),
        (dict(init="text", init_text="the cat", text_fill="zeros"), "text_fill must be one of"),
    ],
)
def test_bad_input_names_the_fix(bloom, kwargs, message):
    model, tokenizer = bloom
    arguments = dict(num_virtual_tokens=4, embed_dim=32, init="random", word_embeddings=word_embeddings(model), tokenizer=tokenizer)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SoftPromptEmbedding(**arguments)


def test_pad_fill_without_pad_token_says_what_to_do(bloom):
    model, tokenizer = bloom
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*text_fill='repeat'"):
        SoftPromptEmbedding(10, 32, "text", word_embeddings=word_embeddings(model), tokenizer=tokenizer, init_text="the cat")
    # repeat needs no pad token
    SoftPromptEmbedding(10, 32, "text", word_embeddings=word_embeddings(model), tokenizer=tokenizer, init_text="the cat", text_fill="repeat")


def test_text_and_vocab_need_the_word_embeddings():
    with pytest.raises(ValueError, match="needs the frozen model's word_embeddings"):
        SoftPromptEmbedding(4, 8, "vocab")
