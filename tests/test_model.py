"""The wrapper: frozen weights, masks, labels, positions, and equality with hand-fed and PEFT models."""

import pytest
import torch

from soft_prompt import SoftPromptModel

V = 5


def batch(tokenizer, texts, padding_side="right"):
    tokenizer.padding_side = padding_side
    return tokenizer(texts, return_tensors="pt", padding=True)


TEXTS = ["the cat is lovely", "our team made me smile and helps everyone"]


def test_only_the_prompt_trains_and_the_frozen_weights_stay_bit_identical(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    assert [name for name, p in wrapper.named_parameters() if p.requires_grad] == ["prompts.default.weight"]
    prompt_before = wrapper.prompt.weight.detach().clone()
    optimizer = torch.optim.AdamW([wrapper.prompt.weight], lr=1e-2)
    inputs = batch(tokenizer, TEXTS)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    for _ in range(3):
        loss = wrapper(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(wrapper.prompt.weight, prompt_before)
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen_before[name]), name
        assert p.grad is None


def test_masks_labels_and_positions_given_to_the_frozen_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    seen = {}
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    inputs = batch(tokenizer, TEXTS)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    wrapper(**inputs, labels=labels)
    batch_size, length = inputs["input_ids"].shape
    assert seen["inputs_embeds"].shape == (batch_size, V + length, 32)
    assert torch.equal(seen["attention_mask"], torch.cat([torch.ones(batch_size, V, dtype=torch.long), inputs["attention_mask"]], 1))
    assert torch.equal(seen["labels"], torch.cat([torch.full((batch_size, V), -100), labels], 1))
    if "position_ids" in seen:  # GPT-2 and Llama: prompt at 0..V-1, real tokens after it
        real_lengths = inputs["attention_mask"].sum(1)
        for row in range(batch_size):
            assert seen["position_ids"][row, : V + real_lengths[row]].tolist() == list(range(V + real_lengths[row]))
    else:
        assert type(model).__name__ == "BloomForCausalLM"  # ALiBi takes its positions from the mask


def test_equals_the_frozen_model_fed_by_hand(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    input_ids = tokenizer(TEXTS[1], return_tensors="pt")["input_ids"]
    labels = input_ids.clone()
    ours = wrapper(input_ids, labels=labels)
    embeds = torch.cat([wrapper.prompt.weight[None], model.get_input_embeddings()(input_ids)], dim=1)
    by_hand = model(inputs_embeds=embeds, labels=torch.cat([torch.full((1, V), -100), labels], 1))
    torch.testing.assert_close(ours.logits, by_hand.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.loss, by_hand.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_changes_nothing_at_real_positions(model_and_tokenizer, padding_side):
    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    inputs = batch(tokenizer, TEXTS, padding_side)
    with torch.no_grad():
        prepared = wrapper.prepare_inputs(**inputs, prompt_first=padding_side == "right")
        padded_logits = model(**prepared).logits
        for row, text in enumerate(TEXTS):
            alone = wrapper(tokenizer(text, return_tensors="pt")["input_ids"]).logits[0]
            real = prepared["attention_mask"][row].bool()
            torch.testing.assert_close(padded_logits[row][real], alone, rtol=0, atol=1e-5)


def test_left_padding_goes_before_the_prompt(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    inputs = batch(tokenizer, TEXTS, "left")
    prepared = wrapper.prepare_inputs(**inputs, prompt_first=False)
    num_pad = int((inputs["attention_mask"][0] == 0).sum())
    assert num_pad > 0
    assert prepared["attention_mask"][0].tolist() == [0] * num_pad + [1] * (prepared["attention_mask"].shape[1] - num_pad)
    torch.testing.assert_close(prepared["inputs_embeds"][0, num_pad : num_pad + V], wrapper.prompt.weight, rtol=0, atol=0)


def test_logits_equal_peft_prompt_tuning(model_dir, model_and_tokenizer):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    with torch.no_grad():
        ours = wrapper(**batch(tokenizer, TEXTS)).logits
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=V))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(wrapper.prompt.weight)
        inputs = batch(tokenizer, TEXTS)
        theirs = peft_model(**inputs).logits
    real = torch.cat([torch.ones(2, V, dtype=torch.bool), inputs["attention_mask"].bool()], 1)
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_bf16_model_keeps_an_fp32_prompt_and_fp32_gradient(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model.to(torch.bfloat16), num_virtual_tokens=V, seed=0)
    input_ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    loss = wrapper(input_ids, labels=input_ids).loss
    loss.backward()
    assert wrapper.prompt.weight.dtype == torch.float32 and wrapper.prompt.weight.grad.dtype == torch.float32
    assert wrapper.prompt.weight.grad.abs().sum() > 0


def test_a_model_without_input_embeddings_is_refused():
    with pytest.raises(ValueError, match="no get_input_embeddings"):
        SoftPromptModel(torch.nn.Linear(2, 2))
