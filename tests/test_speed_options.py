"""The training speed options change how the frozen model runs, not what it computes."""

from types import SimpleNamespace

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.training import apply_speed_options
from tests.conftest import load

TEXTS = ["the cat is lovely", "our team made me smile and helps everyone"]


def loss_and_grad(model_dir, **options):
    base, tokenizer = load(model_dir)
    apply_speed_options(base, SimpleNamespace(**{"attention": "eager", "gradient_checkpointing": False, "compile": False, **options}))
    model = SoftPromptModel(base, num_virtual_tokens=3, seed=0).train()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    loss = model.loss(**inputs)
    loss.backward()
    return loss.detach(), model.prompt.weight.grad, base


@pytest.mark.parametrize("options", [{"gradient_checkpointing": True}, {"attention": "sdpa"}, {"compile": True}])
def test_same_loss_and_gradient(bloom_dir, options):
    loss, grad, _ = loss_and_grad(bloom_dir)
    fast_loss, fast_grad, base = loss_and_grad(bloom_dir, **options)
    if options.get("gradient_checkpointing"):
        assert base.is_gradient_checkpointing
    torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-4, atol=1e-7)


def test_sdpa_on_a_model_that_is_not_bloom_is_refused(model_dir):
    if "bloom" in model_dir:
        pytest.skip("BLOOM takes it")
    with pytest.raises(ValueError, match="--attention sdpa is for BLOOM"):
        loss_and_grad(model_dir, attention="sdpa")
