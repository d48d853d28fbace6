"""The prompt computed once per batch gives the loss and prompt gradient of the plain path."""

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.bloom_sdpa import use_sdpa_attention
from soft_prompt.config import ModelConfig
from soft_prompt.masks import IGNORE_INDEX
from soft_prompt.prefix_attention import NAME, PrefixLayout, prefix_attention, prefix_attention_kernel, routed_to_prefix_attention
from soft_prompt.runtime import apply_speed_options
from soft_prompt.shared_prefix import batch_cost, shared_prefix_loss, shared_prefix_supported, text_columns
from tests.conftest import load

TEXTS = ["the cat is lovely", "our team made me smile and helps everyone", "those people", "this movie is fine and sounds nice"]
NUM_VIRTUAL = 5


def wrapped(directory: str, attention: str = "eager") -> tuple[SoftPromptModel, dict]:
    """A 5-token prompt (random, seeded) on the tiny model with `attention`, and a right-padded batch
    of 4 rows of different lengths with their labels."""
    base_model, tokenizer = load(directory)
    if not (attention == "sdpa" and use_sdpa_attention(base_model)):  # BLOOM's SDPA is ours
        base_model.set_attn_implementation(attention)
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    assert tokenizer.padding_side == "right" and len(set(batch["attention_mask"].sum(1).tolist())) == len(TEXTS)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return SoftPromptModel(base_model, NUM_VIRTUAL, seed=0), batch


def loss_and_gradient(model: SoftPromptModel, loss_fn, batches: list[dict], weights: list[float]):
    """The weighted sum of `loss_fn` over `batches` (micro-batches, as a training step sums them)
    and the prompt's gradient."""
    model.prompt.weight.grad = None
    total = sum(loss_fn(**batch) * weight for batch, weight in zip(batches, weights))
    total.backward()
    return total.detach(), model.prompt.weight.grad.clone()


def shared(model):
    return lambda **batch: shared_prefix_loss(model, **batch)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("labelled", ["all", "completion", "start"])
def test_equals_the_plain_loss_and_gradient(model_dir, attention, labelled):
    model, batch = wrapped(model_dir, attention)
    if labelled == "completion":
        batch["labels"][:, :2] = IGNORE_INDEX  # the first two tokens are the "prompt" of each row
    if labelled == "start":  # no label after column 3: the text stops at column 2
        batch["labels"][:, 4:] = IGNORE_INDEX
    assert shared_prefix_supported(model) == (True, "the prompt runs once per batch")
    plain_loss, plain_grad = loss_and_gradient(model, model.loss, [batch], [1.0])
    seen = []  # the decoder's inputs
    hook = model.base_model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    shared_loss, shared_grad = loss_and_gradient(model, shared(model), [batch], [1.0])
    hook.remove()
    rows, length = batch["input_ids"].shape
    columns = 3 if labelled == "start" else length - 1  # the columns after predict nothing
    assert text_columns(batch["labels"]) == columns
    if model.base_model.config.model_type == "bloom":  # the prompt once, then the rows' text against its cache
        assert seen == [(1, NUM_VIRTUAL), (rows, columns)]
    else:  # the prompt and the rows' text in one sequence
        assert seen == [(1, NUM_VIRTUAL + rows * columns)]
    assert plain_grad.abs().sum() > 0
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared_grad, plain_grad, rtol=1e-5, atol=1e-5 * plain_grad.abs().max().item())


def test_text_columns_stop_before_the_last_labelled_column():
    x = IGNORE_INDEX
    assert text_columns(torch.tensor([[5, 6, x, x, x], [x, 7, 8, x, x]])) == 2  # the last label is in column 2, predicted by column 1
    assert text_columns(torch.tensor([[5, 6, x, x, x], [x, 7, 8, 9, x]])) == 3
    assert text_columns(torch.tensor([[5, x], [x, x]])) == 1  # the prompt predicts column 0; one column still runs
    assert text_columns(torch.full((2, 4), x)) == 1


def test_the_one_pass_stands_in_only_for_the_kernels_it_reproduces(model_dir):
    model, batch = wrapped(model_dir)
    base_model = model.base_model
    if base_model.config.model_type == "bloom":  # BLOOM's attention does not call the interface
        assert prefix_attention_kernel(base_model) is None
        return
    assert prefix_attention_kernel(base_model) == "eager"
    base_model.set_attn_implementation("sdpa")
    assert prefix_attention_kernel(base_model) == "sdpa"
    base_model.config._attn_implementation = "flash_attention_2"  # set by hand: no flash-attn package here
    assert prefix_attention_kernel(base_model) is None
    base_model.config._attn_implementation = "sdpa"
    # The setting is the model's own again after the block, also after an error inside it.
    with pytest.raises(RuntimeError, match="inside"):
        with routed_to_prefix_attention(base_model):
            assert base_model.config._attn_implementation == NAME
            raise RuntimeError("inside")
    assert base_model.config._attn_implementation == "sdpa"
    # Outside shared_prefix_loss (no layout), or with dropout, it refuses in one line.
    query = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="only inside shared_prefix_loss"):
        prefix_attention(None, query, query, query, None)
    layout = PrefixLayout.build(1, torch.ones(1, 2, dtype=torch.long), "eager")
    with pytest.raises(ValueError, match="no dropout"):
        prefix_attention(None, query, query, query, None, dropout=0.1, prefix_layout=layout)


def test_micro_batches_add_up_to_the_whole_batch(model_dir):
    """Each call builds its own cache: micro-batches (each cut to its own length), weighted by
    their share of the labelled tokens, give the whole batch's plain loss and gradient."""
    model, batch = wrapped(model_dir)
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):
        half = {key: value[rows] for key, value in batch.items()}
        length = int(half["attention_mask"].sum(1).max())
        halves.append({key: value[:, :length] for key, value in half.items()})
    labelled = [int((half["labels"] != IGNORE_INDEX).sum()) for half in halves]
    weights = [count / sum(labelled) for count in labelled]
    assert halves[0]["input_ids"].shape[1] != halves[1]["input_ids"].shape[1]
    plain_loss, plain_grad = loss_and_gradient(model, model.loss, [batch], [1.0])
    shared_loss, shared_grad = loss_and_gradient(model, shared(model), halves, weights)
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared_grad, plain_grad, rtol=1e-5, atol=1e-5 * plain_grad.abs().max().item())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bf16_autocast_stays_within_the_bf16_tolerance(model_dir, attention):
    model, batch = wrapped(model_dir, attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grad = loss_and_gradient(model, model.loss, [batch], [1.0])
        shared_loss, shared_grad = loss_and_gradient(model, shared(model), [batch], [1.0])
    assert shared_grad.dtype == torch.float32  # the fp32 master copy's gradient
    torch.testing.assert_close(shared_loss, plain_loss, rtol=2e-2, atol=0)  # test_train's bf16 tolerance
    assert (shared_grad - plain_grad).norm() <= 2e-2 * plain_grad.norm()


def test_a_compiled_decoder_still_takes_the_one_pass(tmp_path):
    """--compile compiles the decoder's layers once the attention setting is read: the one pass's
    switch to the prefix attention must reach the compiled graph (a graph compiled for the model's
    own attention would run the flat sequence as one causal row and give another loss)."""
    from soft_prompt.tiny import save_tiny_model

    model, batch = wrapped(save_tiny_model(tmp_path, "llama"))
    plain_loss, plain_grad = loss_and_gradient(model, model.loss, [batch], [1.0])
    apply_speed_options(model.base_model, ModelConfig(attention="eager", device="cpu", precision="fp32", compile=True))
    with torch.no_grad():  # compiled for eager first (forward only: a shorter compile)
        compiled_plain_loss = model.loss(**batch)
    shared_loss, shared_grad = loss_and_gradient(model, shared(model), [batch], [1.0])
    torch.testing.assert_close(compiled_plain_loss, plain_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared_grad, plain_grad, rtol=1e-4, atol=1e-5 * plain_grad.abs().max().item())


def test_evaluation_without_gradients(model_dir):
    model, batch = wrapped(model_dir)
    with torch.no_grad():
        plain, shared_loss = model.loss(**batch), shared_prefix_loss(model, **batch)
    assert not shared_loss.requires_grad
    torch.testing.assert_close(shared_loss, plain, rtol=1e-5, atol=0)
    # Without labels, every real token is labelled, as model.loss does it.
    del batch["labels"]
    with torch.no_grad():
        torch.testing.assert_close(shared_prefix_loss(model, **batch), model.loss(**batch), rtol=1e-5, atol=0)


def test_training_mode_without_dropout_is_supported_and_exact(bloom_dir):
    model, batch = wrapped(bloom_dir)
    model.train()
    assert shared_prefix_supported(model)[0]
    plain_loss, plain_grad = loss_and_gradient(model, model.loss, [batch], [1.0])
    shared_loss, shared_grad = loss_and_gradient(model, shared(model), [batch], [1.0])
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared_grad, plain_grad, rtol=1e-5, atol=1e-5 * plain_grad.abs().max().item())


def test_unsupported_models_and_modes_say_why(tmp_path):
    from soft_prompt.tiny import save_tiny_model

    gpt2, _ = wrapped(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    llama_dir = save_tiny_model(tmp_path / "llama", "llama")
    gpt2.train()  # GPT-2's dropout is 0.1
    assert shared_prefix_supported(gpt2) == (
        False, "dropout is active in training mode, and the rows would share the prompt's dropout"
    )
    checkpointed, _ = wrapped(llama_dir)
    apply_speed_options(checkpointed.base_model, ModelConfig(device="cpu", precision="fp32", gradient_checkpointing=True))
    assert shared_prefix_supported(checkpointed)[0]  # evaluation keeps the cache
    checkpointed.train()
    assert shared_prefix_supported(checkpointed) == (
        False, "gradient checkpointing drops the prompt's cache in transformers' layers"
    )
    reasons = {
        "final_logit_softcapping": (30.0, "the LM head is not a plain linear layer over the decoder's output, which the chunked loss needs"),
        "sliding_window": (4, "llama has sliding-window or other non-full attention layers"),
        "is_encoder_decoder": (True, "llama is an encoder-decoder model"),
    }  # fmt: skip
    for name, (value, reason) in reasons.items():
        base_model, _ = load(llama_dir)
        setattr(base_model.config, name, value)
        assert shared_prefix_supported(SoftPromptModel(base_model, NUM_VIRTUAL, seed=0)) == (False, reason)
    no_positions, _ = wrapped(llama_dir)
    no_positions.takes_position_ids = False
    assert shared_prefix_supported(no_positions) == (
        False, "llama takes no position ids, so its positions would count the cache's slots"
    )


def test_batch_cost_counts_the_positions_and_matmuls_that_run(tmp_path):
    from soft_prompt.tiny import save_tiny_model

    model, _ = wrapped(save_tiny_model(tmp_path / "llama", "llama"))
    base_model = model.base_model
    vocab = base_model.config.vocab_size
    # tiny Llama: 2 layers, width 32, 4 query heads and 2 key/value heads of 8, MLP 64
    weights_per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)
    V, B, T, labelled = 5, 3, 7, 10
    head = 2 * labelled * 32 * vocab
    for shared_prefix, positions, pairs in [(False, B * (V + T), B * (V + T) ** 2), (True, V + B * T, V * V + B * T * (V + T))]:
        linear, attention = 2 * 2 * weights_per_layer * positions, 4 * 32 * 2 * pairs
        cost = batch_cost(base_model, V, B, T, labelled, shared_prefix, backward=False)
        assert (cost.positions, cost.flops) == (positions, linear + attention + head)
        trained = batch_cost(base_model, V, B, T, labelled, shared_prefix)
        assert (trained.positions, trained.flops) == (positions, 2 * linear + 3 * attention + 2 * head)
