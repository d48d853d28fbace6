"""The chunked frozen-head loss equals the model's own loss and gradient, without the full logits."""

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.loss import frozen_head_cross_entropy, softmax_piece_rows

TEXTS = ["the cat is lovely", "our team made me smile and helps everyone"]


def loss_and_grad(loss_fn):
    loss = loss_fn()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("completion_only", [False, True])
def test_equals_the_models_own_loss_and_gradient(model_and_tokenizer, completion_only):
    model, tokenizer = model_and_tokenizer
    wrapper = SoftPromptModel(model, num_virtual_tokens=3, seed=0)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    if completion_only:
        labels[:, :3] = -100
    hf_loss = loss_and_grad(lambda: wrapper(**inputs, labels=labels).loss)
    hf_grad = wrapper.prompt.weight.grad.clone()
    wrapper.prompt.weight.grad = None
    our_loss = loss_and_grad(lambda: wrapper.loss(**inputs, labels=labels))
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wrapper.prompt.weight.grad, hf_grad, rtol=1e-5, atol=1e-7)


def test_chunks_and_pieces_do_not_change_the_result():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=True).requires_grad_(False)
    targets = torch.randint(0, 50, (11,))
    reference = torch.nn.functional.cross_entropy(head(hidden), targets)
    (reference_grad,) = torch.autograd.grad(reference, hidden)
    for chunk_rows, piece_rows in [(1, 1), (4, 1), (4, 3), (11, 4), (100, 100)]:
        loss = frozen_head_cross_entropy(hidden, head, targets, chunk_rows=chunk_rows, piece_rows=piece_rows)
        (grad,) = torch.autograd.grad(3 * loss, hidden)  # the upstream gradient is applied
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, 3 * reference_grad, rtol=1e-5, atol=1e-7)


def test_softmax_pieces_hold_4_mib_of_scores_in_the_softmax_dtype():
    # bf16 and fp32 logits are scored in fp32 (4 bytes), fp64 ones in fp64 (8 bytes): half the rows.
    assert softmax_piece_rows(49152, torch.bfloat16) == softmax_piece_rows(49152, torch.float32) == 21
    assert softmax_piece_rows(49152, torch.float64) == 10
    assert softmax_piece_rows(2**21, torch.float32) == 1  # a vocabulary over 4 MiB still gets one row


def test_bf16_autocast_is_close_to_fp32(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=3, seed=0)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    fp32 = wrapper.loss(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = wrapper.loss(**inputs)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)


def test_a_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen LM head"):
        frozen_head_cross_entropy(torch.randn(2, 4), torch.nn.Linear(4, 5), torch.tensor([0, 1]))


def test_fp64_equals_the_exact_cross_entropy(bloom):
    # An fp64 model is an exact reference: HF's own loss casts logits to fp32, this one must not.
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model.double(), num_virtual_tokens=3, seed=0)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    logits = wrapper(**inputs).logits[:, 2:-1]  # positions V-1 .. V+T-2 predict the T text tokens
    exact = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    (exact_grad,) = torch.autograd.grad(exact, wrapper.prompt.weight)
    ours = wrapper.loss(**inputs, labels=labels)
    (our_grad,) = torch.autograd.grad(ours, wrapper.prompt.weight)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, exact_grad, rtol=1e-9, atol=1e-12)


def test_a_target_far_below_the_maximum_keeps_a_finite_exact_loss():
    # p(target) = exp(-200) underflows fp32; the loss is read through p(argmax) instead.
    hidden = torch.eye(3)
    head = torch.nn.Linear(3, 3, bias=False).requires_grad_(False)
    head.weight.copy_(torch.diag(torch.tensor([200.0, 0.0, 0.0])))
    loss = frozen_head_cross_entropy(hidden[:1], head, torch.tensor([1]))
    exact = torch.nn.functional.cross_entropy(head(hidden[:1]).double(), torch.tensor([1]))
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
