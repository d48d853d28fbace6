"""BLOOM's SDPA attention equals the eager one, with padding, with the soft prompt, with a cache."""

import torch

from soft_prompt import SoftPromptModel
from soft_prompt.bloom_sdpa import use_sdpa_attention
from tests.conftest import load

TEXTS = ["the cat is lovely", "our team made me smile and helps everyone"]


def test_sdpa_matches_eager_logits_loss_gradient_and_generation(bloom_dir):
    eager, tokenizer = load(bloom_dir)
    sdpa, _ = load(bloom_dir)
    assert use_sdpa_attention(sdpa) == 2
    tokenizer.padding_side = "left"
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    results = []
    for base in (eager, sdpa):
        model = SoftPromptModel(base, num_virtual_tokens=3, seed=0)
        prepared = model.prepare_inputs(**inputs, prompt_first=False)
        logits = base(**prepared).logits
        loss = model.loss(**inputs)
        loss.backward()
        with torch.no_grad():
            generated = base.generate(**prepared, max_new_tokens=6, do_sample=False, pad_token_id=0)
        results.append((logits, loss, model.prompt.weight.grad, generated))
    real = prepared["attention_mask"].bool()
    torch.testing.assert_close(results[1][0][real], results[0][0][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-4, atol=1e-7)
    assert torch.equal(results[1][3], results[0][3])


def test_other_architectures_are_left_alone(model_and_tokenizer):
    model, _ = model_and_tokenizer
    switched = use_sdpa_attention(model)
    assert switched == (2 if type(model).__name__ == "BloomForCausalLM" else 0)
