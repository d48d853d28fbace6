"""Memory per GPU for the frozen weights, computed from the architectures (no weights, no GPU):
one GPU, data parallel and --fsdp on 2, 4 and 8 GPUs, in bf16.

    python benchmarks/memory_table.py     # writes benchmarks/results/memory-per-gpu.md

Each model is built from its config on the meta device and its parameters counted. Per GPU:

    one GPU, data parallel:  2 bytes x all parameters
    --fsdp on N GPUs:        2 bytes x (input embedding + LM head, kept whole)
                             + 2 bytes x (everything else) / N
                             + 2 bytes x 2 blocks (FSDP2 gathers a block for its forward and
                               backward, and prefetches the next)

Left out: activations (they grow with rows x length; each rank holds those of its share of the
batch, so they fall as 1/N in both modes), the CUDA context and allocator slack, the chunked
loss's logits block (about 256 MiB), and the prompt with its gradient and AdamW moments
(16 bytes x V x D: 1.3 MiB at V = 20, D = 4096).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
BYTES = 2  # bf16
WORLD_SIZES = (2, 4, 8)
MODELS = {
    # bigscience/bloomz-560m and bloomz-7b1 (their config.json); the LM head is tied to the embedding.
    "bloomz-560m": BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "bloomz-7b1": BloomConfig(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32),
    # Llama-3.1-8B: an untied LM head.
    "Llama-3.1-8B": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),  # fmt: skip
}


def parameter_counts(config) -> dict[str, int]:
    """(all, kept whole: input embedding and LM head, one transformer block) parameter counts."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    whole = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    whole[id(model.get_output_embeddings().weight)] = model.get_output_embeddings().weight  # once if tied
    block = next(module for module in model.modules() if type(module).__name__ in model._no_split_modules)
    return {
        "all": sum(p.numel() for p in model.parameters()),
        "whole": sum(p.numel() for p in whole.values()),
        "block": sum(p.numel() for p in block.parameters()),
    }


def main() -> None:
    header = ["model", "parameters", "kept whole (embedding + head)", "one GPU / data parallel"]
    header += [f"--fsdp, {n} GPUs" for n in WORLD_SIZES]
    lines = [
        "# Frozen weights per GPU in bf16 (computed, not measured)",
        "",
        "`python benchmarks/memory_table.py`: parameter counts from the architectures (built on the meta",
        "device); GiB per GPU. One GPU and data parallel hold every weight on each GPU; --fsdp holds the",
        "input embedding and LM head whole, 1/N of the rest, and up to two gathered blocks. Activations,",
        "the CUDA context and the prompt's few MiB are left out (see the script's docstring).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for name, config in MODELS.items():
        counts = parameter_counts(config)
        single = BYTES * counts["all"] / GIB
        sharded = [
            BYTES * (counts["whole"] + (counts["all"] - counts["whole"]) / n + 2 * counts["block"]) / GIB for n in WORLD_SIZES
        ]
        row = [name, f"{counts['all'] / 1e9:.2f} B", f"{counts['whole'] / 1e9:.2f} B", f"{single:.2f}"]
        lines.append("| " + " | ".join(row + [f"{value:.2f}" for value in sharded]) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory-per-gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
