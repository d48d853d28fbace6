"""The speed harnesses run end to end on a tiny model and report every side with its ratio."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from soft_prompt.tiny import save_tiny_model

ROOT = Path(__file__).parent.parent


def run(script, tmp_path, *arguments):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--output-dir", str(tmp_path), *arguments],
                   check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_bench_train_reports_every_side(tmp_path):
    # 16 rows in one batch of 16: every side computes the same batch, so the counts compare exactly.
    V = 4
    run("bench_train.py", tmp_path, "--rows", "16", "--batch-size", "16", "--num-virtual-tokens", str(V),
        "--max-batch-tokens", "40")
    results = json.loads((tmp_path / "train-tiny-bloom-v4-fp32-b16.json").read_text())["results"]
    assert list(results) == ["defaults", "defaults-no-shared-prefix", "plain", "ours", "ours-micro-batches",
                             "ours-checkpointed", "peft-trainer", "peft-loop"]
    for figures in results.values():
        assert figures["seconds_per_epoch"] > 0 and figures["peak_memory_mib"] > 0
        assert len(figures["runs"]) == 1 and figures["model_tflops_per_second"] > 0  # one seed
        # start to exit holds the loading and the epoch, and the imports besides
        assert figures["process_seconds"] > figures["seconds_per_epoch"]
    # Gradient checkpointing recomputes, it does not change the result: the same prompt, the same loss;
    # micro-batches give the same gradient up to the order of the sums.
    assert results["ours-checkpointed"]["final_train_loss"] == results["ours"]["final_train_loss"]
    assert abs(results["ours-micro-batches"]["final_train_loss"] / results["ours"]["final_train_loss"] - 1) < 1e-5
    # Same init, rows and schedule (other batch order): the trained prompts reach nearly the same loss.
    assert abs(results["ours"]["final_train_loss"] / results["peft-loop"]["final_train_loss"] - 1) < 0.05
    assert "| peft-trainer |" in (tmp_path / "train-tiny-bloom-v4-fp32-b16.md").read_text()

    # Positions: PEFT runs B x (V + T); so does ours on the plain path (asked for, or under checkpointing).
    run_of = {side: figures["runs"][0] for side, figures in results.items()}
    plain = run_of["peft-trainer"]["positions_per_epoch"]
    paths = {side: figures["loss_path"] for side, figures in results.items()}
    assert paths == {"defaults": "shared prefix", "defaults-no-shared-prefix": "plain (--no-shared-prefix)",
                     "plain": "plain (--no-shared-prefix)", "ours": "shared prefix", "ours-micro-batches": "shared prefix",
                     "ours-checkpointed": paths["ours-checkpointed"], "peft-trainer": "plain (PEFT)", "peft-loop": "plain (PEFT)"}
    assert paths["ours-checkpointed"].startswith("plain (gradient checkpointing")
    for side in ("peft-loop", "defaults-no-shared-prefix", "plain", "ours-checkpointed"):
        assert run_of[side]["positions_per_epoch"] == plain
    # The shared-prefix path computes the prompt once for the 16 rows, and the text up to the column
    # before the last label (here the longest row's last token): V + B x (T - 1).
    assert run_of["defaults"]["positions_per_epoch"] == run_of["ours"]["positions_per_epoch"] == plain - 15 * V - 16
    # Within 40 tokens every row is its own micro-batch, padded to itself: 16 prompts and every real
    # token but each row's last.
    labelled = run_of["ours"]["head_positions_per_epoch"]  # every real token is a label (--loss-on all)
    assert run_of["ours-micro-batches"]["micro_batches_per_epoch"] == 16
    assert run_of["ours-micro-batches"]["positions_per_epoch"] == 16 * V + labelled - 16
    # The same decoder passes, and the LM head on all positions (PEFT) or the labelled ones (ours):
    # 4 FLOPs per head weight and position, forward and the input's gradient.
    config = AutoConfig.from_pretrained(save_tiny_model(tmp_path / "tiny", "bloom"))
    head_flops = 4 * config.vocab_size * config.hidden_size * (plain - labelled)
    assert run_of["peft-trainer"]["head_positions_per_epoch"] == plain
    assert (run_of["peft-trainer"]["tflop_per_epoch"] - run_of["defaults-no-shared-prefix"]["tflop_per_epoch"]) * 1e12 == \
        pytest.approx(head_flops, rel=1e-9)
    assert run_of["defaults"]["tflop_per_epoch"] < run_of["defaults-no-shared-prefix"]["tflop_per_epoch"]


def test_bench_train_finds_the_largest_batch_up_to_the_limit(tmp_path):
    run("bench_train.py", tmp_path, "--num-virtual-tokens", "4", "--sides", "ours", "peft-trainer",
        "--largest-batch", "--batch-size", "4", "--batch-limit", "8")
    results = json.loads((tmp_path / "largest-batch-tiny-bloom-v4-fp32-b4.json").read_text())["results"]
    assert list(results) == ["ours", "peft-trainer"]
    for found in results.values():  # nothing runs out of memory here: both sizes train, the limit stops it
        assert [entry["batch_size"] for entry in found["tried"]] == [4, 8]
        assert found["largest"] == 8 and found["reached_limit"]


def test_bench_step_times_both_paths_on_the_same_batches(tmp_path):
    V = 4
    run("bench_step.py", tmp_path, "--rows", "24", "--num-virtual-tokens", str(V), "--repeats", "1", "--precision", "fp32")
    results = json.loads((tmp_path / "step-tiny-bloom-fp32.json").read_text())["results"]
    assert results[0]["batch"] == "prompt pass alone" and results[0]["shared_positions"] == V and results[0]["shared_ms"] > 0
    batches = results[1:]
    assert len(batches) == 5 and [line["length"] for line in batches] == sorted(line["length"] for line in batches)
    for line in batches:  # the prompt once (V + B x (T - 1): the last column predicts nothing) against in
        rows, length = line["rows"], line["length"]  # every row (B x (V + T)), on the same batch
        assert (line["shared_positions"], line["plain_positions"]) == (V + rows * (length - 1), rows * (V + length))
        assert line["shared_tflop"] < line["plain_tflop"] and line["shared_ms"] > 0 and line["plain_ms"] > 0
    assert "| prompt pass alone | 1 x 4 |" in (tmp_path / "step-tiny-bloom-fp32.md").read_text()


def test_bench_startup_stops_every_phase_at_the_first_step(tmp_path, demo_rows_file):
    # A tiny Llama trains on the shared-prefix path (the default): the timed process must stop at its
    # first step there too, and not train the whole run (which left "to the first step" unmeasured).
    model = save_tiny_model(tmp_path / "llama", "llama")
    run("bench_startup.py", tmp_path, "--model", model, "--data", demo_rows_file, "--repeats", "1", "--precision", "fp32")
    (seconds,) = [process["seconds"] for process in json.loads((tmp_path / "startup-llama-fp32.json").read_text())["runs"]["."]]
    assert list(seconds) == ["python and imports", "read rows", "load tokenizer and model", "tokenise",
                             "to the first step", "other setup"]
    assert all(value >= 0 for value in seconds.values())
    assert seconds["to the first step"] > seconds["python and imports"] + seconds["load tokenizer and model"]


def test_bench_infer_generation_agrees_with_peft_uncached(tmp_path):
    run("bench_infer.py", tmp_path, "--rows", "8", "--max-new-tokens", "4", "--num-virtual-tokens", "4")
    report = json.loads((tmp_path / "infer-tiny-llama.json").read_text())
    by_side = {(row["batch"], row["side"]): row for row in report["generation"]}
    for batch in (1, 16):
        assert by_side[(batch, "ours (no prefix cache)")]["same_tokens_as_ours"]
        assert by_side[(batch, "PEFT use_cache=False")]["same_tokens_as_ours"]
    sides = [row["side"] for row in report["classification"]]
    assert sides == ["ours classify()", "PEFT generate(max_new_tokens=3)"]
    assert report["classification"][0]["not_a_label"] == 0.0


def test_bench_infer_classification_only_skips_generation(tmp_path):
    run("bench_infer.py", tmp_path, "--rows", "4", "--num-virtual-tokens", "4", "--classification-only")
    report = json.loads((tmp_path / "infer-classification-tiny-llama.json").read_text())
    assert report["generation"] == []
    assert [row["side"] for row in report["classification"]] == ["ours classify()", "PEFT generate(max_new_tokens=3)"]
    assert not (tmp_path / "infer-tiny-llama.json").exists()

def test_bench_infer_many_prompts_gives_every_side_the_same_tokens(tmp_path):
    # About 20 s: four fresh processes (the script, then one per side, as it measures each side's own memory).
    run("bench_infer.py", tmp_path, "--many-prompts", "--rows", "6", "--max-new-tokens", "3", "--num-virtual-tokens", "4",
        "--input-tokens", "4", "--prompt-counts", "3", "--repeats", "1")
    report = json.loads((tmp_path / "infer-many-prompts-tiny-llama.json").read_text())
    results = report["results"]
    assert [row["side"] for row in results] == ["ours mixed batches", "ours switching per group", "PEFT set_adapter per group"]
    assert [row["batches"] for row in results] == [1, 3, 3]  # 6 rows: one mixed batch, or one batch per prompt
    for row in results:
        assert row["num_prompts"] == 3 and row["seconds"] > 0 and row["rows_with_same_tokens_as_mixed"] == 6
        assert row["prompt_bytes_each"] == 4 * 32 * 4  # V x D fp32
    # Ours also caches each prompt's keys and values: 2 layers x (keys, values) x 2 kv heads x V x 8 dims, fp32.
    assert results[0]["prompt_cache_bytes_each"] == 2 * 2 * 2 * 4 * 8 * 4
    assert results[2]["prompt_cache_bytes_each"] == 0
