"""Generation: cached, batched, left-padded output equals an uncached one-at-a-time reference loop,
with and without the prefix cache; the repetition penalty counts real tokens only, as PEFT's."""

import pytest
import torch

from soft_prompt import SoftPromptModel

V = 4
NEW = 8
TEXTS = ["the cat is lovely", "our team made me smile and helps everyone", "that song"]


def sharpen(model):
    """The tiny model with larger weights. At their init (std 0.02) attention is near-uniform and the
    prompt barely moves an argmax, so a wrong prompt cache could pass; at std 0.3 every token counts
    (another prompt changes most greedy tokens) and no top-2 logits are near a tie."""
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
    return model


@pytest.fixture
def sharp(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return sharpen(model), tokenizer


def left_padded(tokenizer, texts):
    """A left-padded batch of texts, or of token id lists."""
    tokenizer.padding_side = "left"
    if isinstance(texts[0], str):
        return tokenizer(texts, return_tensors="pt", padding=True)
    return tokenizer.pad({"input_ids": texts}, return_tensors="pt")


@torch.no_grad()
def reference(wrapper, ids, max_new_tokens=NEW, eos=(), pad=0, penalty=1.0, penalise_input=True):
    """Greedy decoding of one unpadded sequence, recomputing [P][x][new] in full at every step.

    The penalty divides positive (multiplies negative) logits of every token seen so far: the real
    input ids (unless `penalise_input=False`) and the generated ids."""
    model, prompt = wrapper.base_model, wrapper.prompt.weight
    sequence, finished = list(ids), False
    for _ in range(max_new_tokens):
        if finished:
            sequence.append(pad)
            continue
        embeds = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(sequence))])[None]
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        seen = sequence if penalise_input else sequence[len(ids) :]
        for token in set(seen):
            logits[token] = logits[token] * penalty if logits[token] < 0 else logits[token] / penalty
        sequence.append(int(logits.argmax()))
        finished = sequence[-1] in eos
    return sequence


def expected(wrapper, tokenizer, texts, **kwargs):
    """Reference rows laid out like generate's output: left padding, then the new tokens."""
    id_lists = [tokenizer(text)["input_ids"] if isinstance(text, str) else text for text in texts]
    rows = [reference(wrapper, ids, **kwargs) for ids in id_lists]
    inputs = left_padded(tokenizer, texts)
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    return [inputs["input_ids"][i, : pads[i]].tolist() + row for i, row in enumerate(rows)]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_left_padded_greedy_equals_the_uncached_reference(sharp, prefix_cache):
    model, tokenizer = sharp
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    inputs = left_padded(tokenizer, TEXTS)
    assert (inputs["attention_mask"] == 0).any()
    out = wrapper.generate(**inputs, max_new_tokens=NEW, eos_token_id=None, prefix_cache=prefix_cache)
    assert out.tolist() == expected(wrapper, tokenizer, TEXTS)


def test_eos_ends_a_row_and_pads_it_on_both_paths(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(sharpen(model), num_virtual_tokens=V, seed=0)
    inputs = left_padded(tokenizer, TEXTS)
    eos = reference(wrapper, tokenizer(TEXTS[0])["input_ids"])[-NEW]  # row 0's first new token
    want = expected(wrapper, tokenizer, TEXTS, eos=(eos,), pad=tokenizer.pad_token_id)
    # Row 0 ends at once and is padded; row 1 runs to the end.
    assert want[0][-NEW:] == [eos] + [tokenizer.pad_token_id] * (NEW - 1) and eos not in want[1][-NEW:]
    for prefix_cache in (True, False):
        out = wrapper.generate(**inputs, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                               prefix_cache=prefix_cache)
        assert out.tolist() == want


def test_right_padding_is_moved_before_the_prompt(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    tokenizer.padding_side = "right"
    right = wrapper.generate(**tokenizer(TEXTS, return_tensors="pt", padding=True), max_new_tokens=NEW)
    assert torch.equal(right, wrapper.generate(**left_padded(tokenizer, TEXTS), max_new_tokens=NEW))


def test_prefix_cache_is_computed_once_and_again_only_when_the_prompt_changes(sharp):
    model, tokenizer = sharp
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    prompt_forwards = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_forwards.append(1)
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] == V else None,
        with_kwargs=True,
    )
    inputs = left_padded(tokenizer, TEXTS)
    first = wrapper.generate(**inputs, max_new_tokens=NEW)
    wrapper.generate(**left_padded(tokenizer, TEXTS[:2]), max_new_tokens=NEW)
    assert len(prompt_forwards) == 1  # two batches of different sizes, one prompt forward
    with torch.no_grad():
        # In place, as an optimizer step updates it.
        wrapper.prompt.weight.copy_(torch.randn(V, 32, generator=torch.Generator().manual_seed(5)))
    changed = wrapper.generate(**inputs, max_new_tokens=NEW)
    assert len(prompt_forwards) == 2
    assert not torch.equal(changed, first)
    assert torch.equal(changed, wrapper.generate(**inputs, max_new_tokens=NEW, prefix_cache=False))


def test_prompt_cache_keeps_one_entry_per_prompt_and_forgets_a_replaced_one(sharp):
    model, tokenizer = sharp
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    wrapper.add_prompt("other", num_virtual_tokens=V + 1, seed=1)
    cache = wrapper.prompt_cache
    assert cache.size() == 0
    wrapper.generate(**left_padded(tokenizer, TEXTS[:2]), max_new_tokens=2, prompt_names=["default", "other"])
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # Llama's are grouped
    per_position = config.num_hidden_layers * 2 * kv_heads * head_dim * 4  # keys and values, fp32
    assert cache.size() == (V + (V + 1)) * per_position
    default = cache.get("default", wrapper.prompts["default"], model.dtype)
    assert cache.get("default", wrapper.prompts["default"], model.dtype) is default  # not recomputed
    assert cache.get("default", wrapper.prompts["default"], torch.bfloat16) is not default  # another dtype
    wrapper.delete_prompt("other")
    assert cache.size() == V * per_position
    cache.clear()
    assert cache.size() == 0


def test_repetition_penalty_counts_real_input_tokens_never_virtual_ones(sharp):
    model, tokenizer = sharp
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    # Inputs holding half the vocabulary, so that the generated tokens are among them.
    inputs = [list(range(100, 300)), list(range(150, 250))]
    want = expected(wrapper, tokenizer, inputs, penalty=5.0)
    assert want != expected(wrapper, tokenizer, inputs, penalty=5.0, penalise_input=False)
    for prefix_cache in (True, False):
        out = wrapper.generate(**left_padded(tokenizer, inputs), max_new_tokens=NEW, eos_token_id=None,
                               repetition_penalty=5.0, prefix_cache=prefix_cache)
        assert out.tolist() == want


def test_repetition_penalty_equals_peft_generation(bloom):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, tokenizer = bloom
    model = sharpen(model)
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    inputs = tokenizer(["the cat is lovely the cat"], return_tensors="pt")
    ours = wrapper.generate(**inputs, max_new_tokens=NEW, eos_token_id=None, repetition_penalty=3.0)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=V))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(wrapper.prompt.weight)
    # PEFT's cached generate is broken on transformers 5.24 (the cache argument was renamed): uncached.
    theirs = peft_model.generate(**inputs, max_new_tokens=NEW, eos_token_id=None, repetition_penalty=3.0, use_cache=False)
    assert ours.tolist() == theirs.tolist()


def test_sampling_on_the_prefix_cache_loop_equals_generate(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(sharpen(model), num_virtual_tokens=V, seed=0)
    inputs = left_padded(tokenizer, TEXTS)
    options = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    outputs = []
    for prefix_cache in (True, False):
        torch.manual_seed(1)
        outputs.append(wrapper.generate(**inputs, **options, prefix_cache=prefix_cache))
    assert torch.equal(*outputs)
    torch.manual_seed(2)
    assert not torch.equal(outputs[0], wrapper.generate(**inputs, **options))  # the seed matters: really sampled


def test_beam_search_returns_real_inputs_for_each_returned_sequence(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    inputs = left_padded(tokenizer, TEXTS)
    out = wrapper.generate(**inputs, max_new_tokens=NEW, num_beams=3, num_return_sequences=2,
                           repetition_penalty=1.5, eos_token_id=None)
    length = inputs["input_ids"].shape[1]
    assert out.shape == (2 * len(TEXTS), length + NEW)
    assert torch.equal(out[:, :length], inputs["input_ids"].repeat_interleave(2, dim=0))
    # With one beam, beam search is greedy search.
    one_beam = wrapper.generate(**inputs, max_new_tokens=NEW, num_beams=1, eos_token_id=None, prefix_cache=False)
    assert one_beam.tolist() == expected(wrapper, tokenizer, TEXTS)


def test_an_empty_input_is_refused(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, seed=0)
    with pytest.raises(ValueError, match="empty input"):
        wrapper.generate(torch.tensor([[0, 5]]), torch.tensor([[0, 0]]), max_new_tokens=2)
