import torch

from soft_prompt.chance import text_script_shares
from soft_prompt.model import SoftPromptModel
from soft_prompt.probe import probe
from soft_prompt.tiny import build_tiny_model, build_tokenizer


def reference_continuation(model: SoftPromptModel, text: str, max_new_tokens: int, penalty: float) -> list[int]:
    """Greedy decoding by full recomputation at each step, Hugging Face's repetition penalty over
    the text's ids and the generated ones (never the virtual tokens)."""
    ids = model.tokenizer(text)["input_ids"]
    generated = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + generated])).logits[0, -1]
        seen = torch.tensor(sorted(set(ids + generated)))
        logits[seen] = torch.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        generated.append(int(logits.argmax()))
        if generated[-1] == model.tokenizer.eos_token_id:
            break
    return generated


def test_probe_gives_the_greedy_continuation_and_its_scripts():
    tokenizer = build_tokenizer()
    model = SoftPromptModel(build_tiny_model("llama", len(tokenizer), initializer_range=0.3), 4, tokenizer=tokenizer, seed=0)
    model.train()
    texts = ["the cat is lovely", "my neighbour"]  # different lengths: one row is padded
    lines = probe(model, texts, max_new_tokens=12)
    assert model.training  # left as it was found
    assert [line["text"] for line in lines] == texts
    for line, text in zip(lines, texts):
        model.eval()
        expected = tokenizer.decode(reference_continuation(model, text, 12, 1.5), skip_special_tokens=True)
        assert line["continuation"] == expected
        assert line["scripts"] == text_script_shares(expected)
    assert probe(model, []) == []
