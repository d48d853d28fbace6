"""Residual reparameterization: the prompt the model sees and saves is P + LN(MLP(P)) computed by
hand, PEFT loads it, it trains P and the MLP, and a resumed run is bit-identical."""

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.checkpoint import load_checkpoint, save_checkpoint
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.masks import right_padded
from soft_prompt.embedding import SoftPromptEmbedding
from soft_prompt.reparam import REPARAM_FILE, add_reparam, bake, reparam_files, reparam_of, restore_reparam
from soft_prompt.training_state import TrainState, restore_training_state, training_state_files
from tests.conftest import load

V, H = 4, 8
TEXTS = ["the cat is lovely", "those people are animals"]


def reparameterized(bloom_dir, seed=0):
    model, tokenizer = load(bloom_dir)
    wrapper = SoftPromptModel(model.train(), num_virtual_tokens=V, init="text", init_text="the cat", tokenizer=tokenizer, seed=seed)
    add_reparam(wrapper.prompt, H, seed=seed)
    return wrapper


def by_hand(prompt) -> torch.Tensor:
    """P + LayerNorm(Linear2(ReLU(Linear1(P)))) from the module's tensors."""
    p = prompt.parametrizations.weight.original
    reparam = reparam_of(prompt)
    first, second, norm = reparam.mlp[0], reparam.mlp[2], reparam.norm
    h = torch.relu(p @ first.weight.T + first.bias) @ second.weight.T + second.bias
    normed = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return p + normed * norm.weight + norm.bias


def batch(tokenizer):
    input_ids, attention_mask = right_padded([tokenizer(text)["input_ids"] for text in TEXTS], tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_the_saved_prompt_is_p_plus_layernorm_mlp_and_peft_loads_it(bloom_dir, tmp_path):
    from peft import PeftModel

    wrapper = reparameterized(bloom_dir)
    initial = wrapper.prompt.parametrizations.weight.original.detach().clone()
    plain = SoftPromptModel(load(bloom_dir)[0], num_virtual_tokens=V, init="text", init_text="the cat", tokenizer=wrapper.tokenizer)
    assert torch.equal(initial, plain.prompt.weight)  # P starts as the init made it
    assert torch.equal(wrapper.prompt.weight, initial)  # and so does P', the layer norm's gain starting at zero
    with torch.no_grad():  # a non-trivial layer norm, so that its gain and bias are checked too
        reparam_of(wrapper.prompt).norm.weight.uniform_(0.5, 1.5)
        reparam_of(wrapper.prompt).norm.bias.normal_()
    want = by_hand(wrapper.prompt).detach()
    torch.testing.assert_close(wrapper.prompt.weight, want, rtol=0, atol=1e-6)
    assert (want - initial).abs().max() > 0.1  # the MLP moved it
    wrapper.save_pretrained(tmp_path / "ckpt")
    saved, _ = load_checkpoint(tmp_path / "ckpt", wrapper.base_model)
    torch.testing.assert_close(saved, want, rtol=0, atol=1e-6)

    peft_model = PeftModel.from_pretrained(load(bloom_dir)[0], tmp_path / "ckpt")
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, saved)
    inputs = wrapper.tokenizer([TEXTS[0]], return_tensors="pt")
    wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, wrapper(**inputs).logits, rtol=0, atol=1e-5)


def test_training_moves_p_and_the_mlp_and_scoring_sees_each_step(bloom_dir):
    wrapper = reparameterized(bloom_dir)
    wrapper.eval()  # no dropout: the scores below compare exactly
    parameters = list(wrapper.prompt.parameters())
    assert len(parameters) == 7 and all(param.requires_grad for param in parameters)  # P, 2 x Linear, LayerNorm
    before = [param.detach().clone() for param in parameters]
    _, scores_before = wrapper.classify(TEXTS, ["no", "yes"], template=HATE_TEMPLATE)  # caches the prompt's keys and values
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # the first step moves the layer norm's gain off zero, the second the MLP too
        optimizer.zero_grad()
        wrapper.loss(**batch(wrapper.tokenizer)).backward()
        optimizer.step()
    assert all(not torch.equal(param, old) for param, old in zip(parameters, before))
    _, scores_after = wrapper.classify(TEXTS, ["no", "yes"], template=HATE_TEMPLATE)
    fresh = SoftPromptModel(load(bloom_dir)[0], num_virtual_tokens=V, seed=0, tokenizer=wrapper.tokenizer)
    with torch.no_grad():
        fresh.prompt.weight.copy_(wrapper.prompt.weight)
    torch.testing.assert_close(scores_after, fresh.classify(TEXTS, ["no", "yes"], template=HATE_TEMPLATE)[1], rtol=0, atol=1e-5)
    assert (scores_after - scores_before).abs().max() > 1e-4  # not the stale cache


def run_steps(wrapper, optimizer, steps):
    for _ in range(steps):
        wrapper.loss(**batch(wrapper.tokenizer)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_resume_restores_p_the_mlp_and_adamw_bit_exactly(bloom_dir, tmp_path):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    wrapper = reparameterized(bloom_dir)
    optimizer = torch.optim.AdamW(wrapper.prompt.parameters(), lr=1e-2)
    run_steps(wrapper, optimizer, 2)
    state = TrainState(model="tiny", num_virtual_tokens=V, step=2).to_dict()
    save_checkpoint(tmp_path / "last", wrapper.prompt.weight, wrapper.base_model, {"step": 2},
                    extra_files={**reparam_files(wrapper.prompt), **training_state_files(state, optimizer, scaler)})
    run_steps(wrapper, optimizer, 2)
    uninterrupted = [param.detach().clone() for param in wrapper.prompt.parameters()]

    resumed = reparameterized(bloom_dir)
    optimizer = torch.optim.AdamW(resumed.prompt.parameters(), lr=1e-2)
    restore_reparam(resumed.prompt, tmp_path / "last")
    assert restore_training_state(tmp_path / "last", optimizer, scaler)["step"] == 2
    assert torch.equal(resumed.prompt.weight, load_checkpoint(tmp_path / "last", resumed.base_model)[0])
    run_steps(resumed, optimizer, 2)
    for param, want in zip(resumed.prompt.parameters(), uninterrupted, strict=True):
        assert torch.equal(param, want)


def test_restore_checks_the_file_and_the_hidden_size(bloom_dir, tmp_path):
    wrapper = reparameterized(bloom_dir)
    save_checkpoint(tmp_path / "plain", wrapper.prompt.weight, wrapper.base_model, {})
    with pytest.raises(ValueError, match=f"{REPARAM_FILE} is missing or corrupt"):
        restore_reparam(wrapper.prompt, tmp_path / "plain")
    save_checkpoint(tmp_path / "wide", wrapper.prompt.weight, wrapper.base_model, {}, extra_files=reparam_files(wrapper.prompt))
    narrow = SoftPromptModel(load(bloom_dir)[0], num_virtual_tokens=V, seed=0)
    add_reparam(narrow.prompt, H // 2, seed=0)
    with pytest.raises(ValueError, match="pass the same --reparam-hidden"):
        restore_reparam(narrow.prompt, tmp_path / "wide")


def test_seeded_init_leaves_the_global_rng_and_bake_keeps_the_result(bloom_dir):
    first, second = (SoftPromptModel(load(bloom_dir)[0], num_virtual_tokens=V, seed=0) for _ in range(2))
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    add_reparam(first.prompt, H, seed=1)
    add_reparam(second.prompt, H, seed=1)
    assert torch.equal(torch.rand(3), want)
    assert torch.equal(first.prompt.weight, second.prompt.weight)
    result = first.prompt.weight.detach().clone()
    bake(first.prompt)
    assert reparam_of(first.prompt) is None and isinstance(first.prompt.weight, torch.nn.Parameter)
    assert torch.equal(first.prompt.weight, result) and list(first.prompt.parameters()) == [first.prompt.weight]
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        add_reparam(SoftPromptEmbedding(2, 4), 0)
    with pytest.raises(ValueError, match="reparameterized already"):
        add_reparam(second.prompt, H)
