import pytest
import torch

from soft_prompt.chance import chance_prompts, random_token_ids, random_vectors_like, text_script_shares


def test_text_script_shares_of_hand_made_strings():
    assert text_script_shares("hello world") == {"Latin": 1.0}
    assert text_script_shares("中文字") == {"Han": 1.0}
    assert text_script_shares("привет!") == {"Cyrillic": 1.0}
    # 6 Latin letters, 2 Han, 1 Cyrillic, 1 Greek; digits, spaces and punctuation are no letters
    assert text_script_shares("Hey 42, 中文 you я γ!") == {"Latin": 0.6, "Han": 0.2, "Cyrillic": 0.1, "Greek": 0.1}
    assert text_script_shares("12 + 3 = 15 ...") == {}


def test_random_vectors_keep_each_token_norm_and_repeat_by_seed():
    prompt = torch.randn(5, 16) * torch.arange(1, 6)[:, None]
    vectors = random_vectors_like(prompt, seed=3)
    assert vectors.shape == (5, 16) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=-1), prompt.norm(dim=-1))
    assert torch.equal(vectors, random_vectors_like(prompt, seed=3))
    assert not torch.equal(vectors, random_vectors_like(prompt, seed=4))
    # not the prompt's own directions
    assert torch.cosine_similarity(vectors, prompt, dim=-1).abs().max() < 0.9


def test_random_token_ids_skip_excluded_and_repeat_by_seed():
    ids = random_token_ids(200, vocab_size=10, seed=1, exclude_ids=[0, 1, 9])
    assert len(ids) == 200 and set(ids) == set(range(2, 9))  # 200 draws hit all 7 allowed ids
    assert ids == random_token_ids(200, vocab_size=10, seed=1, exclude_ids=[9, 1, 0])
    assert ids != random_token_ids(200, vocab_size=10, seed=2, exclude_ids=[0, 1, 9])
    with pytest.raises(ValueError, match="no vocabulary token"):
        random_token_ids(3, vocab_size=2, exclude_ids=[0, 1])


def test_chance_prompts_have_the_prompt_shape_and_are_vocabulary_rows():
    prompt, embeddings = torch.randn(4, 8), torch.randn(30, 8)
    chance = chance_prompts(prompt, embeddings, seed=0, vocab_size=20, exclude_ids=[0])
    assert chance["random_vectors"]["weight"].shape == (4, 8)
    ids = chance["random_tokens"]["ids"]
    assert len(ids) == 4 and all(0 < i < 20 for i in ids)
    assert torch.equal(chance["random_tokens"]["weight"], embeddings[ids])
    again = chance_prompts(prompt, embeddings, seed=0, vocab_size=20, exclude_ids=[0])
    assert again["random_tokens"]["ids"] == ids
    assert torch.equal(again["random_vectors"]["weight"], chance["random_vectors"]["weight"])
