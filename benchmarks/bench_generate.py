"""Generation time with and without the prefix cache (the soft prompt's keys/values computed once).

    python benchmarks/bench_generate.py [--model FOLDER] [--virtual-tokens 20] [--batches 5]

Without --model it builds a tiny Llama. Both paths give the same tokens (checked here too); the
cache saves the prompt's share of every prefill.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_prompt import SoftPromptModel
from soft_prompt.tiny import build_model, build_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--virtual-tokens", type=int, default=20)
parser.add_argument("--batches", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=8)
args = parser.parse_args()

if args.model:
    base, tokenizer = AutoModelForCausalLM.from_pretrained(args.model).eval(), AutoTokenizer.from_pretrained(args.model)
else:
    tokenizer = build_tokenizer()
    base = build_model("llama", len(tokenizer))
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
tokenizer.padding_side = "left"
model = SoftPromptModel(base, num_virtual_tokens=args.virtual_tokens, seed=0)
texts = ["Sentence : the cat is lovely Label :", "Act as a fitness Trainer. Prompt: "] * (args.batch_size // 2)
batch = tokenizer(texts, return_tensors="pt", padding=True)

torch.set_num_threads(torch.get_num_threads())
results = {}
for prefix_cache in (False, True, False, True):  # twice each: the first calls warm up
    start = time.perf_counter()
    for _ in range(args.batches):
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, prefix_cache=prefix_cache)
    results[prefix_cache] = (time.perf_counter() - start) / args.batches, out
assert torch.equal(results[False][1], results[True][1]), "the two paths disagree"
print(f"V={args.virtual_tokens} batch={args.batch_size} x T={batch['input_ids'].shape[1]} new={args.max_new_tokens}")
print(f"without prefix cache: {results[False][0] * 1000:.1f} ms/batch")
print(f"with prefix cache:    {results[True][0] * 1000:.1f} ms/batch  ({results[False][0] / results[True][0]:.2f}x)")
