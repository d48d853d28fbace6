import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from soft_prompt.tiny import ARCHITECTURES, demo_rows, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=ARCHITECTURES)
def model_dir(request, tmp_path_factory) -> str:
    """A tiny model folder (BLOOM, GPT-2 and Llama in turn) with its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def bloom_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("bloom"), "bloom")


@pytest.fixture(scope="session")
def demo_rows_file(tmp_path_factory) -> str:
    """40 ETHOS-shaped rows (`tiny.demo_rows`) as a .jsonl file, shared by the tests that train."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(40)))
    return str(path)


def load(directory: str):
    """The model (fp32, eval mode) and tokenizer from a folder, through the real from_pretrained."""
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def model_and_tokenizer(model_dir):
    return load(model_dir)


@pytest.fixture
def bloom(bloom_dir):
    return load(bloom_dir)
