"""Several prompts on one frozen model: named prompts, training one leaves the others alone, and
mixed batches in which every row gives what it gives alone (logits, loss, tokens, label scores)."""

import pytest
import torch

from soft_prompt import CheckpointError, SoftPromptModel
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.tiny import build_tiny_model
from tests.test_generate import left_padded, sharpen

LABELS = ["no hate speech", "hate speech", "fine"]  # label words of 1 to 3 tokens
# Three prompts of different lengths and the frozen model alone; the same text under several of them.
TEXTS = ["the cat is lovely", "our team made me smile and helps everyone", "the cat is lovely", "that song",
         "the cat is lovely"]
NAMES = ["short", "long", None, "default", "default"]
NEW = 8


def three_prompts(model, tokenizer=None) -> SoftPromptModel:
    """The model with prompts default (V=3), short (V=2) and long (V=5), distinct random rows."""
    wrapper = SoftPromptModel(model, num_virtual_tokens=3, seed=0, tokenizer=tokenizer, metadata={"template": HATE_TEMPLATE})
    wrapper.add_prompt("short", 2, seed=1)
    wrapper.add_prompt("long", 5, seed=2)
    return wrapper


def prompt_weight(wrapper, name) -> torch.Tensor:
    """A row's prompt `[V, D]`; no rows for the frozen model alone."""
    return wrapper.prompts[name].weight if name is not None else torch.zeros(0, wrapper.prompt.embed_dim)


@pytest.fixture
def sharp(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return three_prompts(sharpen(model), tokenizer), tokenizer


# -- named prompts ------------------------------------------------------------------------------


def test_named_prompts_add_load_set_and_delete(bloom, tmp_path):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=3, seed=0, metadata={"template": HATE_TEMPLATE})
    assert wrapper.prompt_names == ["default"] and wrapper.active_prompt == "default"
    other = SoftPromptModel(model, num_virtual_tokens=6, seed=7)
    other.save_pretrained(tmp_path / "six", label_words=["yes", "no"])
    # PEFT's spelling, as the tutorial calls it.
    wrapper.load_adapter(tmp_path / "six", adapter_name="six")
    assert wrapper.prompt_names == ["default", "six"] and wrapper.active_prompt == "default"
    assert torch.equal(wrapper.prompts["six"].weight, other.prompt.weight)
    assert wrapper.prompts["six"].num_virtual_tokens == 6 and wrapper.num_virtual_tokens == 3
    wrapper.set_adapter("six")
    assert wrapper.prompt is wrapper.prompts["six"] and wrapper.num_virtual_tokens == 6
    assert wrapper.metadata["label_words"] == ["yes", "no"] and "template" not in wrapper.metadata
    assert [name for name, p in wrapper.named_parameters() if p.requires_grad] == ["prompts.six.weight"]
    # save_pretrained writes one prompt: the active one, or the one named.
    wrapper.save_pretrained(tmp_path / "saved-default", name="default")
    reloaded = SoftPromptModel.from_pretrained(model, tmp_path / "saved-default")
    assert torch.equal(reloaded.prompt.weight, wrapper.prompts["default"].weight)
    assert reloaded.metadata["template"] == HATE_TEMPLATE
    wrapper.set_prompt("default")
    wrapper.delete_prompt("six")
    assert wrapper.prompt_names == ["default"]
    with pytest.raises(ValueError, match="init='text' needs a tokenizer"):  # the model was made without one
        wrapper.add_prompt("text", 4, init="text", init_text="the cat")
    wrapper.tokenizer = tokenizer
    added = wrapper.add_prompt("text", 4, init="text", init_text="the cat", text_fill="repeat")
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    assert torch.equal(added.weight, model.get_input_embeddings().weight[(ids * 4)[:4]])
    assert wrapper.prompt_names == ["default", "text"] and not added.weight.requires_grad


def test_named_prompt_errors_say_what_to_change(bloom, tmp_path):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=3, seed=0, tokenizer=tokenizer)
    wrapper.add_prompt("a", 2, seed=1)
    with pytest.raises(ValueError, match="a prompt named 'a' is loaded already"):
        wrapper.add_prompt("a", 2)
    with pytest.raises(ValueError, match=r"no prompt named 'b': the loaded prompts are \['default', 'a'\]"):
        wrapper.set_prompt("b")
    with pytest.raises(ValueError, match="'default' is the active prompt"):
        wrapper.delete_prompt("default")
    with pytest.raises(ValueError, match="cannot name a prompt"):
        wrapper.add_prompt("a.b", 2)
    with pytest.raises(ValueError, match=r"row 1 names prompt 'b', but the loaded prompts are"):
        wrapper.generate(torch.tensor([[5, 6], [7, 8]]), prompt_names=["a", "b"], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_names has 1 names for a batch of 2 rows"):
        wrapper(torch.tensor([[5, 6], [7, 8]]), prompt_names=["a"])
    wide = tmp_path / "wide"  # a prompt for a model with another embedding size
    SoftPromptModel(build_tiny_model("bloom", 400, hidden_size=48), num_virtual_tokens=2, seed=0).save_pretrained(wide)
    with pytest.raises(CheckpointError, match="embedding size 48 but the model has 32"):
        wrapper.load_prompt(wide, "wide")
    assert wrapper.prompt_names == ["default", "a"]


def test_training_one_prompt_never_changes_another(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    wrapper = three_prompts(model, tokenizer)
    wrapper.set_prompt("long")
    before = {name: prompt.weight.detach().clone() for name, prompt in wrapper.prompts.items()}
    # The optimizer gets whatever requires grad, as a training loop would.
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    tokenizer.padding_side = "right"
    inputs = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    for prompt_names in (None, ["short", "long", "default", None]):  # a mixed batch too
        wrapper.loss(**inputs, prompt_names=prompt_names).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(wrapper.prompts["long"].weight, before["long"])
    for name in ("default", "short"):
        assert torch.equal(wrapper.prompts[name].weight, before[name]), name
        assert wrapper.prompts[name].weight.grad is None and not wrapper.prompts[name].weight.requires_grad


# -- mixed batches: each row as alone ------------------------------------------------------------


@torch.no_grad()
def logits_alone(wrapper, ids, name) -> torch.Tensor:
    """The frozen model's logits `[V + T, vocab]` on one unpadded row after its prompt, fed by hand."""
    model = wrapper.base_model
    embeds = torch.cat([prompt_weight(wrapper, name), model.get_input_embeddings()(torch.tensor(ids))])
    return model(inputs_embeds=embeds[None]).logits[0]


def test_mixed_forward_and_loss_equal_each_row_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    wrapper = three_prompts(model, tokenizer)
    tokenizer.padding_side = "right"
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = wrapper(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100),
                         prompt_names=NAMES)
        mixed_loss = wrapper.loss(**inputs, prompt_names=NAMES)
    num_virtual = output.logits.shape[1] - inputs["input_ids"].shape[1]
    assert num_virtual == 5  # the longest prompt
    total, count = 0.0, 0
    for row, (text, name) in enumerate(zip(TEXTS, NAMES)):
        ids = tokenizer(text)["input_ids"]
        alone = logits_alone(wrapper, ids, name)  # [V_row + T, vocab]
        # Row r's real positions in the batch: its prompt ends at column V, its text follows.
        start = num_virtual - prompt_weight(wrapper, name).shape[0]
        torch.testing.assert_close(output.logits[row, start : num_virtual + len(ids)], alone, rtol=0, atol=5e-5)
        # Its loss alone: every text token that something before it predicts.
        predicted_from = alone[-len(ids) - 1 : -1] if name is not None else alone[:-1]
        targets = torch.tensor(ids if name is not None else ids[1:])
        total += torch.nn.functional.cross_entropy(predicted_from, targets, reduction="sum").item()
        count += len(targets)
    torch.testing.assert_close(output.loss.item(), total / count, rtol=1e-5, atol=0)
    torch.testing.assert_close(mixed_loss.item(), total / count, rtol=1e-5, atol=0)


def test_one_name_for_every_row_is_the_active_prompt_exactly(bloom):
    model, tokenizer = bloom
    wrapper = three_prompts(model, tokenizer)
    inputs = left_padded(tokenizer, TEXTS)
    with torch.no_grad():
        named = wrapper.prepare_inputs(**inputs, prompt_first=False, prompt_names=["default"] * len(TEXTS))
        active = wrapper.prepare_inputs(**inputs, prompt_first=False)
    for key in active:
        assert torch.equal(named[key], active[key]), key


@torch.no_grad()
def generated_alone(wrapper, ids, name, penalty) -> list[int]:
    """Greedy decoding of one unpadded row after its prompt, recomputing everything at each step."""
    model, sequence = wrapper.base_model, list(ids)
    for _ in range(NEW):
        embeds = torch.cat([prompt_weight(wrapper, name), model.get_input_embeddings()(torch.tensor(sequence))])
        logits = model(inputs_embeds=embeds[None], use_cache=False).logits[0, -1]
        for token in set(sequence):  # the real input and generated ids, never the virtual tokens
            logits[token] = logits[token] * penalty if logits[token] < 0 else logits[token] / penalty
        sequence.append(int(logits.argmax()))
    return sequence[len(ids) :]


@pytest.mark.parametrize("penalty", [1.0, 3.0])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_mixed_generation_gives_each_row_its_tokens_alone(sharp, prefix_cache, penalty):
    wrapper, tokenizer = sharp
    inputs = left_padded(tokenizer, TEXTS)
    out = wrapper.generate(**inputs, prompt_names=NAMES, max_new_tokens=NEW, eos_token_id=None,
                           repetition_penalty=penalty, prefix_cache=prefix_cache)
    want = [generated_alone(wrapper, tokenizer(text)["input_ids"], name, penalty) for text, name in zip(TEXTS, NAMES)]
    assert out[:, -NEW:].tolist() == want
    # The prompt decides: the same text continues differently under each prompt and without one.
    same_text = [want[row] for row, text in enumerate(TEXTS) if text == TEXTS[0]]
    assert len({tuple(tokens) for tokens in same_text}) == 3


def test_prefix_cache_keeps_one_entry_per_prompt(sharp):
    wrapper, tokenizer = sharp
    forwards = []  # the prompt-only forwards: batch 1, no text
    wrapper.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(kwargs["inputs_embeds"].shape[1])
        if kwargs.get("inputs_embeds") is not None and kwargs.get("attention_mask") is None else None,
        with_kwargs=True,
    )
    inputs = left_padded(tokenizer, TEXTS)
    first = wrapper.generate(**inputs, prompt_names=NAMES, max_new_tokens=NEW)
    wrapper.generate(**left_padded(tokenizer, TEXTS[:2]), prompt_names=NAMES[:2], max_new_tokens=NEW)
    assert sorted(forwards) == [2, 3, 5]  # each prompt once, whatever the batches
    with torch.no_grad():
        wrapper.prompts["long"].weight.mul_(-1)  # in place, as an optimizer step
    changed = wrapper.generate(**inputs, prompt_names=NAMES, max_new_tokens=NEW)
    assert sorted(forwards) == [2, 3, 5, 5]  # only the changed prompt again
    assert changed[1].tolist() != first[1].tolist()
    assert torch.equal(torch.cat([changed[:1], changed[2:]]), torch.cat([first[:1], first[2:]]))
    assert torch.equal(changed, wrapper.generate(**inputs, prompt_names=NAMES, max_new_tokens=NEW, prefix_cache=False))


def test_mixed_label_scores_equal_each_row_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    wrapper = three_prompts(sharpen(model), tokenizer)
    predictions, scores = wrapper.classify(TEXTS, LABELS, HATE_TEMPLATE, prompt_names=NAMES, batch_size=4)
    assert scores.shape == (len(TEXTS), len(LABELS))
    for row, (text, name) in enumerate(zip(TEXTS, NAMES)):
        if name is None:
            _, alone = wrapper.classify([text], LABELS, HATE_TEMPLATE, use_prompt=False)
        else:
            wrapper.set_prompt(name)
            _, alone = wrapper.classify([text], LABELS, HATE_TEMPLATE)
        torch.testing.assert_close(scores[row], alone[0], rtol=0, atol=1e-4)
        assert predictions[row] == LABELS[int(alone[0].argmax())]
    assert (scores[0] - scores[2]).abs().max() > 1e-2 and (scores[2] - scores[4]).abs().max() > 1e-2
