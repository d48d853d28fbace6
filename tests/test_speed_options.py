"""The training speed options change how the frozen model runs, not what it computes."""

import warnings

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.config import ModelConfig
from soft_prompt.runtime import apply_speed_options, decoder_layers, set_attention
from tests.conftest import load

TEXTS = ["the cat is lovely", "our team made me smile and helps everyone"]


def loss_and_grad(model_dir, training=True, **options):
    base, tokenizer = load(model_dir)
    apply_speed_options(base, ModelConfig(**{"device": "cpu", "precision": "fp32", **options}))
    model = SoftPromptModel(base, num_virtual_tokens=3, seed=0).train(training)
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


def test_eager_and_sdpa_attention_give_the_same_loss_and_gradient(model_dir):
    # In eval mode: GPT-2's attention dropout draws differently in the two kernels.
    eager_loss, eager_grad, eager_base = loss_and_grad(model_dir, training=False, attention="eager")
    sdpa_loss, sdpa_grad, sdpa_base = loss_and_grad(model_dir, training=False, attention="sdpa")
    assert eager_base.config._attn_implementation == "eager"
    if "bloom" not in model_dir:  # BLOOM's SDPA replaces its attention's forward (bloom_sdpa.py)
        assert sdpa_base.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sdpa_grad, eager_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device, precision, expected", [
    ("cpu", "bf16", "eager"), ("cpu", "fp16", "eager"), ("cpu", "fp32", None), ("cuda", "bf16", None),
])
def test_auto_attention_is_eager_on_cpu_at_16_bits_else_the_models_own(model_dir, device, precision, expected):
    base, _ = load(model_dir)
    loaded = base.config._attn_implementation  # sdpa for GPT-2 and Llama, eager for BLOOM
    assert set_attention(base, "auto", device, precision) == (expected or loaded)
    assert base.config._attn_implementation == (expected or loaded)
    recorded = apply_speed_options(load(model_dir)[0], ModelConfig(device=device, precision=precision))
    assert recorded == (expected or loaded)


def test_a_kernel_the_model_cannot_run_is_one_line(model_dir, monkeypatch):
    base, _ = load(model_dir)

    def refuse(implementation):
        raise ValueError(f"{implementation} is not supported\nsee the docs")

    monkeypatch.setattr(base, "set_attn_implementation", refuse)
    kernel = "sdpa" if base.config._attn_implementation == "eager" else "eager"
    if "bloom" in model_dir:
        kernel = "eager"
        monkeypatch.setattr(base.config, "_attn_implementation", "sdpa")
    with pytest.raises(ValueError, match=f"^--attention {kernel}: .* cannot run it \\({kernel} is not supported\\); "
                                         "pass --attention auto$"):
        set_attention(base, kernel, "cpu", "fp32")


def test_decoder_layers_are_found_for_compile(model_dir):
    # --compile compiles each of these, whose code they all share, instead of the decoder whole.
    base = load(model_dir)[0]
    decoder = base.get_decoder()
    layers = decoder.h if hasattr(decoder, "h") else decoder.layers  # GPT-2 and BLOOM, Llama
    assert len(layers) == base.config.num_hidden_layers > 1 and decoder_layers(base) is layers
    base.config.num_hidden_layers += 1
    with pytest.raises(ValueError, match=f"has no list of {len(layers) + 1} decoder layers"):
        decoder_layers(base)


def test_gradient_checkpointing_is_asked_for_by_transformers_current_name(bloom_dir):
    # transformers 5.23 renamed gradient_checkpointing_enable, and the old name warns on every run.
    base, _ = load(bloom_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_speed_options(base, ModelConfig(device="cpu", precision="fp32", gradient_checkpointing=True))
    assert all(layer.gradient_checkpointing is True for layer in decoder_layers(base))
