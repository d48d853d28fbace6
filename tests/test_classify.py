"""Label scoring: exact scores against the frozen model fed by hand, batching, fields, truncation."""

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.config import HATE_TEMPLATE

V = 3
LABELS = ["no hate speech", "hate speech"]
TEXTS = ["the cat is lovely", "those people are animals", "that song"]


@torch.no_grad()
def by_hand(wrapper, tokenizer, text, label, use_prompt=True):
    """log p(label tokens | [P] "Sentence : text Label :"), one unpadded sequence, summed by hand."""
    model = wrapper.base_model
    prompt_ids = tokenizer(f"Sentence : {text} Label :")["input_ids"]
    label_ids = tokenizer(f" {label}", add_special_tokens=False)["input_ids"]
    embeds = model.get_input_embeddings()(torch.tensor(prompt_ids + label_ids))
    if use_prompt:
        embeds = torch.cat([wrapper.prompt.weight, embeds])
    log_probs = model(inputs_embeds=embeds[None]).logits[0].log_softmax(-1)
    start = len(embeds) - len(label_ids)  # the first label token's position
    return sum(log_probs[start + i - 1, token].item() for i, token in enumerate(label_ids))


@pytest.mark.parametrize("use_prompt", [True, False])
def test_scores_equal_the_frozen_model_fed_by_hand(model_and_tokenizer, use_prompt):
    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0, tokenizer=tokenizer, metadata={"template": HATE_TEMPLATE})
    predictions, scores = wrapper.classify(TEXTS, LABELS, batch_size=4, use_prompt=use_prompt)  # 6 pairs: 2 batches
    want = torch.tensor([[by_hand(wrapper, tokenizer, t, label, use_prompt) for label in LABELS] for t in TEXTS])
    torch.testing.assert_close(scores, want, rtol=0, atol=1e-4)
    assert predictions == [LABELS[i] for i in want.argmax(1).tolist()]


def test_the_prompt_changes_the_scores_and_batch_size_does_not(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0, tokenizer=tokenizer)
    _, batched = wrapper.classify(TEXTS, LABELS, template=HATE_TEMPLATE, batch_size=6)
    _, one_by_one = wrapper.classify(TEXTS, LABELS, template=HATE_TEMPLATE, batch_size=1)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    _, without = wrapper.classify(TEXTS, LABELS, template=HATE_TEMPLATE, use_prompt=False)
    assert (batched - without).abs().max() > 1e-3


def test_multi_field_templates_take_dicts(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0, tokenizer=tokenizer)
    two_fields = "Topic : {topic} Sentence : {text} Label : {label_text}"
    rows = [{"topic": "music", "text": "that song"}]
    _, scores = wrapper.classify(rows, LABELS, template=two_fields)
    _, same = wrapper.classify(["music Sentence : that song"], LABELS, template="Topic : {text} Label : {label_text}")
    torch.testing.assert_close(scores, same, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="missing \\['topic'\\]"):
        wrapper.classify([{"text": "that song"}], LABELS, template=two_fields)


def test_long_inputs_are_cut_from_the_left_with_a_warning(model_dir):
    from tests.conftest import load

    model, tokenizer = load(model_dir)
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0, tokenizer=tokenizer, metadata={"template": HATE_TEMPLATE})
    if wrapper.context_length is None:
        pytest.skip("ALiBi (BLOOM) has no context limit")
    long_text = " ".join(["the cat is lovely"] * 200)
    with pytest.warns(UserWarning, match="keeping its last"):
        _, scores = wrapper.classify([long_text], LABELS)
    # The kept tail is exactly what fits: the context less the prompt and the label.
    label_ids = tokenizer(" hate speech", add_special_tokens=False)["input_ids"]
    kept = tokenizer(f"Sentence : {long_text} Label :")["input_ids"][-(wrapper.context_length - V - len(label_ids)) :]
    want = wrapper.completion_log_probs([(kept, label_ids)])
    torch.testing.assert_close(scores[0, 1:], want, rtol=0, atol=1e-5)


def test_missing_template_tokenizer_or_labels_are_clear_errors(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    with pytest.raises(ValueError, match="no template"):
        wrapper.classify(TEXTS, LABELS, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        wrapper.classify(TEXTS, LABELS, template=HATE_TEMPLATE)
    with pytest.raises(ValueError, match="non-empty strings"):
        wrapper.classify(TEXTS, ["", "hate speech"], template=HATE_TEMPLATE, tokenizer=tokenizer)


MANY_LABELS = ["no", "hate speech", "no hate speech", "the cat is lovely", "people", "fine", "music and more",
               "animals", "those people are animals", "lovely"]  # 1 to 5 tokens each


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_shared_prefix_scores_equal_whole_sequences(model_and_tokenizer, batch_size):
    from soft_prompt.scoring import label_sequences, shared_prefix_log_probs, whole_sequence_log_probs
    from tests.test_generate import sharpen

    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(sharpen(model), num_virtual_tokens=V, seed=0, tokenizer=tokenizer)
    wrapper.add_prompt("long", 6, seed=1)
    sequences = label_sequences(TEXTS, MANY_LABELS, HATE_TEMPLATE, tokenizer)
    names = [name for name in ("default", "long", None) for _ in MANY_LABELS]  # one prompt per text
    lengths = {len(completion) for _, completion in sequences}
    assert min(lengths) == 1 and max(lengths) >= 4  # labels of different token lengths
    shared = shared_prefix_log_probs(wrapper, sequences, names, tokenizer.pad_token_id, batch_size)
    whole = whole_sequence_log_probs(wrapper, sequences, names, tokenizer.pad_token_id, 4)
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-4)
    assert whole.abs().max() > 10  # sharpened: scores far apart, so a wrong position could not pass


def test_each_text_runs_once_whatever_its_labels(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0, tokenizer=tokenizer, metadata={"template": HATE_TEMPLATE})
    passes = []  # (rows, positions) of each forward: the prompt, the texts, the labels
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(tuple((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                                          else kwargs["inputs_embeds"]).shape[:2])),
        with_kwargs=True,
    )
    wrapper.classify(TEXTS, MANY_LABELS, batch_size=100)
    text_lengths = [len(tokenizer(f"Sentence : {text} Label :")["input_ids"]) for text in TEXTS]
    label_lengths = [len(tokenizer(f" {label}", add_special_tokens=False)["input_ids"]) for label in MANY_LABELS]
    assert passes == [
        (1, V),  # the soft prompt's keys and values, once
        (len(TEXTS), max(text_lengths)),  # each text once, not once per label
        # then every label longer than one token, after a copy of its text's keys and values
        (len(TEXTS) * sum(length > 1 for length in label_lengths), max(label_lengths) - 1),
    ]
